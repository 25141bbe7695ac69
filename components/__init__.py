"""Pipeline steps as plain functions: paths and typed config in, results out. No KFP here."""
