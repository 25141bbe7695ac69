"""The gate: rules, the champion re-scored, the decision (`decision.json`), its report and review images."""
