from __future__ import annotations

import numpy as np
import pytest

from tumorflow.components.training.ood import fit_mahalanobis, with_threshold
from tumorflow.core.errors import ModelError


def _clusters(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes in 32-D with correlated features (a shared covariance)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(32, 32)) / 6
    means = np.random.default_rng(98).normal(0, 3, size=(3, 32))
    labels = np.repeat(np.arange(3), n_per_class)
    return means[labels] + rng.normal(size=(len(labels), 32)) @ mixing, labels


def test_the_threshold_rejects_the_stated_share_of_validation_and_flags_far_points():
    train, labels = _clusters(60, seed=0)
    validation, _ = _clusters(200, seed=1)
    detector = with_threshold(fit_mahalanobis(train, labels), validation, 0.05)
    assert np.mean(~detector.in_distribution(validation)) <= 0.05
    unseen, _ = _clusters(200, seed=2)
    assert np.mean(~detector.in_distribution(unseen)) < 0.15
    far = np.random.default_rng(3).normal(0, 3, size=(100, 32)) + 10
    assert detector.in_distribution(far).sum() == 0


def test_the_score_is_the_distance_to_the_nearest_class():
    train, labels = _clusters(60, seed=0)
    detector = fit_mahalanobis(train, labels)
    at_means = detector.scores(detector.class_means)
    np.testing.assert_allclose(at_means, 0, atol=1e-9)
    # scores grow with the distance along any direction
    direction = np.ones(32) / np.sqrt(32)
    steps = detector.class_means[0] + np.outer([0.5, 1, 2], direction)
    assert np.all(np.diff(detector.scores(steps)) > 0)


def test_more_dimensions_than_images_still_give_a_usable_covariance():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20, 200))
    labels = np.repeat([0, 1], 10)
    detector = with_threshold(fit_mahalanobis(train, labels), rng.normal(size=(50, 200)), 0.02)
    assert np.isfinite(detector.threshold)
    assert not detector.in_distribution(rng.normal(size=(5, 200)) * 10).any()


def test_a_rate_outside_zero_to_one_is_refused():
    train, labels = _clusters(10, seed=0)
    with pytest.raises(ModelError, match="false-rejection rate"):
        with_threshold(fit_mahalanobis(train, labels), train, 1.0)
