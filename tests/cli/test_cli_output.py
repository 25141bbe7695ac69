"""Quiet by default: MLflow's own INFO lines (database creation, migrations) stay off the
terminal even where MLflow was imported, and configured, before the command started."""

from __future__ import annotations

import logging

import pytest

from tumorflow.cli.main import configure_output


@pytest.mark.parametrize(("given", "expected"), [(None, logging.WARNING), ("ERROR", logging.ERROR)])
def test_mlflow_logs_are_quiet_unless_asked_for(monkeypatch, given, expected):
    mlflow_logger = logging.getLogger("mlflow")
    monkeypatch.setattr(mlflow_logger, "level", logging.INFO)  # as mlflow's import leaves it
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    if given:
        monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", given)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_output(verbose=False)
    assert mlflow_logger.getEffectiveLevel() == expected
    assert not mlflow_logger.isEnabledFor(logging.INFO)
