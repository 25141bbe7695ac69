"""Evaluation: the metric formulas, scoring the exported model on the test split, overlays."""
