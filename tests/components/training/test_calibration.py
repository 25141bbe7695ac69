from __future__ import annotations

import numpy as np
import pytest

from tumorflow.components.training.calibration import (
    MIN_TEMPERATURE,
    fit_temperature,
    log_probabilities,
    negative_log_likelihood,
    tempered_softmax,
)
from tumorflow.core.errors import ModelError


def _overconfident(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the model answers logits temperature * z (over-confident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 2, size=(n, 4))
    probs = tempered_softmax(true_logits, 1.0)
    labels = np.array([rng.choice(4, p=row) for row in probs])
    return true_logits * temperature, labels


def test_the_fit_recovers_the_temperature_that_made_a_model_overconfident():
    logits, labels = _overconfident(4000, temperature=2.5)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(2.5, rel=0.1)
    before = negative_log_likelihood(logits, labels, 1.0)
    after = negative_log_likelihood(logits, labels, fitted)
    assert after < before - 0.1
    # the fit is the minimum: a step either way is worse
    assert after <= negative_log_likelihood(logits, labels, fitted * 1.05)
    assert after <= negative_log_likelihood(logits, labels, fitted / 1.05)


def test_an_underconfident_model_is_sharpened():
    logits, labels = _overconfident(4000, temperature=0.5, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.1)


def test_scaling_never_changes_the_predicted_class_and_log_probabilities_are_logits():
    logits, _ = _overconfident(200, temperature=3.0)
    probs = tempered_softmax(logits, 1.0)
    calibrated = tempered_softmax(log_probabilities(probs), 2.0)
    np.testing.assert_allclose(calibrated, tempered_softmax(logits, 2.0), atol=1e-12)
    assert (calibrated.argmax(axis=1) == probs.argmax(axis=1)).all()


def test_a_perfectly_separated_split_stops_at_the_lowest_temperature():
    logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    labels = np.array([0, 1] * 10)
    assert fit_temperature(logits, labels) == MIN_TEMPERATURE


def test_an_empty_validation_split_is_refused():
    with pytest.raises(ModelError, match="validation split must not be empty"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
