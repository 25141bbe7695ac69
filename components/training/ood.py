"""Out-of-distribution score: the Mahalanobis distance of an image's `embedding` to the nearest
training class (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks"), with one covariance shared by the classes.

The class means and the shared covariance are fitted on the training split's embeddings; the
covariance is shrunk (Ledoit-Wolf), because a few hundred images do not determine the covariance
of a 192- to 2048-dimensional embedding. The threshold is the validation split's score quantile
that rejects `false_rejection_rate` of those in-distribution images. The export folds all three
into the SavedModel, which answers `ood_score` and `in_distribution` per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tumorflow.core.errors import ModelError

DEFAULT_FALSE_REJECTION_RATE = 0.01


@dataclass(frozen=True)
class MahalanobisDetector:
    """Class means [C, D], the shared precision matrix [D, D] and the score threshold."""

    class_means: np.ndarray
    precision: np.ndarray
    threshold: float = float("inf")

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each embedding to its nearest class mean [n]."""
        diff = np.asarray(embeddings, dtype=np.float64)[:, None, :] - self.class_means[None]
        distances = np.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return distances.min(axis=1)

    def in_distribution(self, embeddings: np.ndarray) -> np.ndarray:
        """True where the score is at or below the threshold."""
        return self.scores(embeddings) <= self.threshold


def fit_mahalanobis(embeddings: np.ndarray, labels: np.ndarray) -> MahalanobisDetector:
    """Class means and the Ledoit-Wolf shrunk shared covariance of the class-centred training
    embeddings (no threshold yet: `with_threshold`)."""
    from sklearn.covariance import LedoitWolf

    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    classes = np.unique(labels)
    if len(embeddings) != len(labels) or len(classes) < 1 or len(embeddings) < 2:
        raise ModelError(
            "the OOD detector needs training embeddings with their labels (at least two images); "
            f"got {embeddings.shape} and {labels.shape}"
        )
    means = np.zeros((int(labels.max()) + 1, embeddings.shape[1]))
    for label in classes:
        means[label] = embeddings[labels == label].mean(axis=0)
    centred = embeddings - means[labels]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    precision = np.linalg.pinv(covariance, hermitian=True)
    # Classes absent from the training split have no mean: no image is near them.
    return MahalanobisDetector(means[classes], precision)


def with_threshold(
    detector: MahalanobisDetector,
    validation_embeddings: np.ndarray,
    false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
) -> MahalanobisDetector:
    """The detector with the threshold that flags at most `false_rejection_rate` of the
    validation images (the empirical (1 - rate) quantile of their scores, rounded up)."""
    if not 0 <= false_rejection_rate < 1:
        raise ModelError(f"the false-rejection rate must be in [0, 1), got {false_rejection_rate}")
    scores = detector.scores(validation_embeddings)
    if len(scores) == 0:
        raise ModelError("the validation split is empty: no OOD threshold can be chosen")
    threshold = float(np.quantile(scores, 1 - false_rejection_rate, method="higher"))
    return MahalanobisDetector(detector.class_means, detector.precision, threshold)
