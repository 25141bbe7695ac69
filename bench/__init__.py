"""Benchmarks: commands that measure the steps and the server against baselines measured in the same run. Not steps."""
