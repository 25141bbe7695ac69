"""One loaded SavedModel version: its signatures, input validation, calls and warm-up.

Any SavedModel that TF Serving can serve is accepted: the callable signatures come from
`tf.saved_model.load`, the `SignatureDef`s reported by GetModelMetadata from the MetaGraphDef in
`saved_model.pb`, exactly as TF Serving reports them.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_log_pb2

from tumorflow.core import serving_layout
from tumorflow.serving.status import ServingError, code_from_number, failed_precondition
from tumorflow.serving.status import invalid_argument as invalid

logger = logging.getLogger(__name__)

SERVE_TAG = "serve"
DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
WARMUP_FILE = posixpath.join(serving_layout.ASSETS_EXTRA, serving_layout.WARMUP_FILE)
# TF Serving reads at most this many warm-up records.
MAX_WARMUP_RECORDS = 1000


def tensor_dtype(array: np.ndarray) -> tf.DType:
    """The TensorFlow dtype of a request array (object and bytes arrays are strings)."""
    if array.dtype == object or array.dtype.kind in "SU":
        return tf.string
    return tf.as_dtype(array.dtype)


def op_error_message(message: str) -> str:
    """The line of a TensorFlow runtime error that says what went wrong (no node dump, no trace)."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "\t", "  File", "[[")
    lines = [line.strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(noise)]
    return (useful[-1] if useful else message.strip()).split(" [[")[0]


def _shape_text(shape: tf.TensorShape | tuple[int, ...]) -> str:
    dims = tf.TensorShape(shape).as_list() if tf.TensorShape(shape).rank is not None else None
    if dims is None:
        return "<unknown rank>"
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


@dataclass(frozen=True)
class Signature:
    """A callable serving signature with the specs of its named inputs and outputs."""

    name: str
    method_name: str
    inputs: Mapping[str, tf.TensorSpec]
    outputs: Mapping[str, tf.TensorSpec]
    function: Any = field(repr=False, compare=False)

    @property
    def batchable(self) -> bool:
        """Whether requests can be merged along dim 0 (every input has an unknown leading dim)."""
        return all(
            spec.shape.rank is not None and spec.shape.rank >= 1 and spec.shape[0] is None
            for spec in self.inputs.values()
        )

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise INVALID_ARGUMENT unless the inputs match this signature by name, dtype and shape."""
        expected = sorted(self.inputs)
        for name in inputs:
            if name not in self.inputs:
                raise invalid(
                    f"input tensor alias not found in signature: {name}. "
                    f"Inputs expected to be in the set {{{','.join(expected)}}}."
                )
        missing = sorted(set(self.inputs) - set(inputs))
        if missing:
            raise invalid(
                f"signature '{self.name}' needs inputs {{{','.join(expected)}}}; "
                f"missing {{{','.join(missing)}}}"
            )
        sizes = set()
        for name, array in inputs.items():
            spec = self.inputs[name]
            got = tensor_dtype(array)
            if got != spec.dtype:
                raise invalid(
                    f"input '{name}' expects dtype {spec.dtype.name} but {got.name} was given"
                )
            if not spec.shape.is_compatible_with(array.shape):
                raise invalid(
                    f"input '{name}' expects shape {_shape_text(spec.shape)} "
                    f"but got {_shape_text(array.shape)}"
                )
            if array.ndim:
                sizes.add(array.shape[0])
        if self.batchable and len(sizes) > 1:
            raise invalid(
                f"inputs of signature '{self.name}' differ in batch size: {sorted(sizes)}"
            )

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature; graph errors caused by the input become INVALID_ARGUMENT."""
        tensors = {
            name: tf.convert_to_tensor(array, dtype=self.inputs[name].dtype)
            for name, array in inputs.items()
        }
        try:
            result = self.function(**tensors)
        except tf.errors.InvalidArgumentError as exc:
            raise invalid(op_error_message(exc.message)) from exc
        except tf.errors.OpError as exc:
            raise ServingError(
                code_from_number(exc.error_code), op_error_message(exc.message)
            ) from exc
        except UnicodeDecodeError as exc:
            # TF raises this instead of the op's error when the message quotes input bytes that
            # are not UTF-8, e.g. image bytes sent to an input that parses tf.Examples.
            raise invalid(
                f"signature '{self.name}' could not read its input (the model's error quotes "
                "binary input bytes); check that each input holds what the signature expects"
            ) from exc
        return {name: tensor.numpy() for name, tensor in result.items()}


def _read_signature_defs(path: str) -> dict[str, meta_graph_pb2.SignatureDef]:
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString(
        tf.io.gfile.GFile(posixpath.join(path, "saved_model.pb"), "rb").read()
    )
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{path}: saved_model.pb has no MetaGraph tagged '{SERVE_TAG}'")


class Servable:
    """A SavedModel version loaded for serving."""

    def __init__(self, name: str, version: int, path: str) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.signature_defs = _read_signature_defs(path)
        loaded = tf.saved_model.load(path, tags=[SERVE_TAG])
        self._loaded = loaded
        self.signatures: dict[str, Signature] = {}
        for key, function in loaded.signatures.items():
            _, input_specs = function.structured_input_signature
            outputs = {
                out: tf.TensorSpec(value.shape, value.dtype, out)
                for out, value in function.structured_outputs.items()
            }
            method = self.signature_defs[key].method_name if key in self.signature_defs else ""
            self.signatures[key] = Signature(
                key, method or PREDICT_METHOD, dict(input_specs), outputs, function
            )
        if not self.signatures:
            raise ValueError(f"{path}: the SavedModel has no serving signatures")

    def signature(self, name: str) -> Signature:
        """The signature called `name` ('' means serving_default), else FAILED_PRECONDITION."""
        key = name or DEFAULT_SIGNATURE
        if key not in self.signatures:
            raise failed_precondition(f'Serving signature name: "{key}" not found in signature def')
        return self.signatures[key]

    def signature_def_map(self) -> get_model_metadata_pb2.SignatureDefMap:
        """The SignatureDefMap GetModelMetadata returns, as read from saved_model.pb."""
        result = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in self.signature_defs.items():
            result.signature_def[key].CopyFrom(signature_def)
        return result

    def warm_up(self) -> int:
        """Replay `assets.extra/tf_serving_warmup_requests`, else call each signature once.

        A failing recorded warm-up request fails the load, as in TF Serving; a synthetic input
        the model rejects (say, bytes that are no image) is only logged. Returns requests run.
        """
        warmup_path = posixpath.join(self.path, WARMUP_FILE)
        if tf.io.gfile.exists(warmup_path):
            return self._replay_warmup(warmup_path)
        count = 0
        for signature in self.signatures.values():
            try:
                signature(_synthetic_inputs(signature))
                count += 1
            except Exception as exc:
                logger.debug(
                    "synthetic warm-up of %s/%s skipped: %s", self.name, signature.name, exc
                )
        return count

    def _replay_warmup(self, warmup_path: str) -> int:
        count = 0
        for record in tf.data.TFRecordDataset(warmup_path).take(MAX_WARMUP_RECORDS):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if log.WhichOneof("log_type") != "predict_log":
                continue
            request = log.predict_log.request
            signature = self.signature(request.model_spec.signature_name)
            inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
            signature.validate(inputs)
            signature(inputs)
            count += 1
        return count


def _synthetic_inputs(signature: Signature) -> dict[str, np.ndarray]:
    """One example per input: zeros; for string inputs an empty tf.Example where the signature
    classifies or regresses Examples, else a tiny PNG (the usual image bytes)."""
    if signature.method_name in (CLASSIFY_METHOD, REGRESS_METHOD):
        string_value = tf.train.Example().SerializeToString()
    else:
        string_value = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    inputs = {}
    for name, spec in signature.inputs.items():
        dims = [
            1 if d is None else d
            for d in (spec.shape.as_list() if spec.shape.rank is not None else [1])
        ]
        if spec.dtype == tf.string:
            inputs[name] = np.full(dims, string_value, dtype=object)
        else:
            inputs[name] = np.zeros(dims, dtype=spec.dtype.as_numpy_dtype)
    return inputs
