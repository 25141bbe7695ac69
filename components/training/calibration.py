"""Temperature scaling (Guo et al. 2017): one temperature T, fitted on the validation split after
training, divides the classifier's logits so that its probabilities say how often it is right.

T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the predicted class
never changes (argmax is unchanged). The export folds T into the SavedModel, so every signature
and every server answers the calibrated probabilities. The model's head is a softmax, so its
log-probabilities are its logits up to a per-image constant, which temperature scaling ignores:
softmax(log(p) / T) = softmax(logits / T).
"""

from __future__ import annotations

import numpy as np

from tumorflow.core.errors import ModelError

# The temperatures the fit may choose: beyond these the model's scores carry no usable ranking.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
# Probabilities below this are treated as this before taking the log (float32 softmax underflow).
_SMALLEST_PROBABILITY = 1e-300


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """The logits of softmax probabilities, up to a per-image constant: log(p) in float64."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), _SMALLEST_PROBABILITY))


def tempered_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), row by row."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of the true labels under softmax(logits / T)."""
    probs = tempered_softmax(logits, temperature)
    rows = np.arange(len(labels))
    return float(-np.mean(np.log(np.maximum(probs[rows, labels], _SMALLEST_PROBABILITY))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the NLL of `labels` under softmax(logits / T).

    The NLL is convex in beta = 1/T, with derivative mean(E_softmax[z] - z_label), increasing in
    beta; bisection on its sign finds the minimum to float precision within
    [MIN_TEMPERATURE, MAX_TEMPERATURE]. A split the model classifies perfectly pushes T to the low
    end: the fit then returns that bound.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ModelError(
            f"temperature scaling needs logits [n, classes] and n labels, got {logits.shape} and "
            f"{labels.shape}; the validation split must not be empty"
        )
    logits = logits - logits.max(axis=1, keepdims=True)
    true_logit = logits[np.arange(len(labels)), labels]

    def slope(beta: float) -> float:
        probs = tempered_softmax(logits, 1.0 / beta)
        return float(np.mean((probs * logits).sum(axis=1) - true_logit))

    low, high = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    if slope(low) >= 0:
        return MAX_TEMPERATURE
    if slope(high) <= 0:
        return MIN_TEMPERATURE
    for _ in range(100):
        middle = 0.5 * (low + high)
        if slope(middle) < 0:
            low = middle
        else:
            high = middle
    return float(1.0 / (0.5 * (low + high)))
