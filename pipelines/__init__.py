"""The retraining DAG, its configuration model and the `tumorflow` command line."""
