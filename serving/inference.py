"""Predict, Classify, Regress, metadata and status on numpy arrays: the core both API front ends
call."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tensorflow as tf

from tumorflow.serving.batching import BatchScheduler
from tumorflow.serving.prometheus import ServerMetrics
from tumorflow.serving.repository import ModelRepository, VersionStatus
from tumorflow.serving.servable import CLASSIFY_METHOD, REGRESS_METHOD, Servable, Signature
from tumorflow.serving.status import invalid_argument

logger = logging.getLogger(__name__)


class RequestLog(Protocol):
    def log(
        self,
        *,
        model_name: str,
        model_version: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Prediction:
    """What Predict answers: the version and signature that ran, and the requested outputs."""

    servable: Servable
    signature_name: str
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class Classification:
    """What Classify answers: per example, (label, score) pairs."""

    servable: Servable
    signature_name: str
    results: list[list[tuple[str, float]]]


@dataclass(frozen=True)
class Regression:
    """What Regress answers: one value per example."""

    servable: Servable
    signature_name: str
    values: list[float]


class InferenceService:
    """Resolves the model version, validates inputs, runs (batched or not), logs requests."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        scheduler: BatchScheduler | None = None,
        request_log: RequestLog | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.scheduler = scheduler
        self.request_log = request_log

    def predict(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "",
        output_filter: Sequence[str] = (),
    ) -> Prediction:
        servable = self.repository.resolve(name, version, label)
        signature = servable.signature(signature_name)
        unknown = sorted(set(output_filter) - set(signature.outputs))
        if unknown:
            raise invalid_argument(
                f"output tensor alias not found in signature: {unknown[0]} Outputs expected to "
                f"be in the set {{{','.join(sorted(signature.outputs))}}}."
            )
        signature.validate(inputs)
        outputs = self._run(servable, signature, inputs)
        if self.request_log is not None:
            self._log(servable, inputs, outputs)
        if output_filter:
            outputs = {key: outputs[key] for key in output_filter}
        return Prediction(servable, signature.name, outputs)

    def _run(
        self, servable: Servable, signature: Signature, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if self.scheduler is None or not signature.batchable:
            return signature(inputs)
        shapes = tuple(
            sorted((key, array.dtype.str, array.shape[1:]) for key, array in inputs.items())
        )
        key = (servable.name, servable.version, signature.name, shapes)
        return self.scheduler.run(key, signature, inputs)

    def _log(
        self, servable: Servable, inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray]
    ) -> None:
        assert self.request_log is not None
        try:
            self.request_log.log(
                model_name=servable.name,
                model_version=servable.version,
                inputs=inputs,
                outputs=outputs,
            )
        except Exception:
            logger.exception("request logging failed; the prediction is still answered")

    def classify(
        self,
        name: str,
        examples: Sequence[tf.train.Example],
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "",
    ) -> Classification:
        """Classify tf.Examples with a classify signature, or a predict signature with class outputs.

        A predict signature is fed one feature per input, named like the input (tumorflow's
        `image_bytes`), and must output `scores` (and optionally `classes`) of shape [batch, C].
        """
        servable = self.repository.resolve(name, version, label)
        signature = servable.signature(signature_name)
        if "scores" not in signature.outputs and "classes" not in signature.outputs:
            raise invalid_argument(
                f"signature '{signature.name}' has neither 'classes' nor 'scores' outputs; "
                "it cannot answer Classify"
            )
        if not examples:
            raise invalid_argument("Classify needs at least one example in input.example_list")
        if signature.method_name == CLASSIFY_METHOD:
            if len(signature.inputs) != 1:
                raise invalid_argument(f"classify signature '{signature.name}' must have one input")
            (input_name,) = signature.inputs
            inputs = {input_name: np.array([e.SerializeToString() for e in examples], dtype=object)}
        else:
            inputs = {
                key: _feature_array(examples, key, spec) for key, spec in signature.inputs.items()
            }
        signature.validate(inputs)
        outputs = self._run(servable, signature, inputs)
        return Classification(servable, signature.name, _class_pairs(outputs, len(examples)))

    def regress(
        self,
        name: str,
        examples: Sequence[tf.train.Example],
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "",
    ) -> Regression:
        """Regress tf.Examples with a regress signature: serialized Examples in, `outputs` out.

        As in TF Serving, any other signature is INVALID_ARGUMENT, and `outputs` must be one value
        per example ([batch] or [batch, 1]).
        """
        servable = self.repository.resolve(name, version, label)
        signature = servable.signature(signature_name)
        if signature.method_name != REGRESS_METHOD:
            raise invalid_argument(
                f"Expected regression signature method_name to be {REGRESS_METHOD}. "
                f"Was: {signature.method_name}"
            )
        if len(signature.inputs) != 1 or "outputs" not in signature.outputs:
            raise invalid_argument(
                f"regress signature '{signature.name}' must have one input and an 'outputs' output"
            )
        if not examples:
            raise invalid_argument("Regress needs at least one example in input.example_list")
        (input_name,) = signature.inputs
        inputs = {input_name: np.array([e.SerializeToString() for e in examples], dtype=object)}
        signature.validate(inputs)
        values = np.asarray(self._run(servable, signature, inputs)["outputs"])
        if values.ndim == 0 or values.shape[0] != len(examples) or values.size != len(examples):
            raise invalid_argument(
                "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
                f"but got {list(values.shape)}"
            )
        return Regression(servable, signature.name, values.reshape(-1).astype(float).tolist())

    def metadata(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> Servable:
        return self.repository.resolve(name, version, label)

    def status(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> dict[int, VersionStatus]:
        return self.repository.statuses(name, version, label)


def with_context(
    context: tf.train.Example, examples: Sequence[tf.train.Example]
) -> list[tf.train.Example]:
    """Each example merged over the shared context (an example's own feature wins), as TF Serving
    reads `example_list_with_context`."""
    merged = []
    for example in examples:
        full = tf.train.Example()
        full.CopyFrom(context)
        full.MergeFrom(example)
        merged.append(full)
    return merged


def _feature_array(
    examples: Sequence[tf.train.Example], key: str, spec: tf.TensorSpec
) -> np.ndarray:
    """Stack feature `key` of every example into the input `spec` describes."""
    rows = []
    for index, example in enumerate(examples):
        if key not in example.features.feature:
            raise invalid_argument(
                f"example {index} has no feature '{key}' (an input of the signature)"
            )
        feature = example.features.feature[key]
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        if not values:
            raise invalid_argument(f"feature '{key}' of example {index} is empty")
        rows.append(values)
    if spec.dtype == tf.string:
        array = np.array(rows, dtype=object)
    else:
        try:
            array = np.array(rows, dtype=spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError) as exc:
            raise invalid_argument(
                f"feature '{key}' cannot be read as {spec.dtype.name}: {exc}"
            ) from exc
    tail = spec.shape[1:]
    if spec.shape.rank == 1:
        return array.reshape(len(examples)) if array.shape[1] == 1 else array
    if tail.is_fully_defined() and array.shape[1] == tail.num_elements():
        return array.reshape([len(examples), *tail.as_list()])
    return array


def _class_pairs(outputs: Mapping[str, np.ndarray], count: int) -> list[list[tuple[str, float]]]:
    scores = outputs.get("scores")
    classes = outputs.get("classes")
    results = []
    for row in range(count):
        row_scores = [] if scores is None else np.reshape(scores[row], -1).tolist()
        row_classes = [] if classes is None else np.reshape(classes[row], -1).tolist()
        width = max(len(row_scores), len(row_classes))
        # Without a `classes` output the labels are empty, as TF Serving answers.
        labels = [c.decode() if isinstance(c, bytes) else str(c) for c in row_classes] or [
            ""
        ] * width
        values = row_scores or [0.0] * width
        results.append(list(zip(labels, (float(v) for v in values), strict=True)))
    return results
