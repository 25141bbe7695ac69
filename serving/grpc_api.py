"""TF Serving's gRPC services (PredictionService, ModelService) over the inference core.

Messages are the generated ones of tensorflow-serving-api, so the official client stubs talk to
this server exactly as they talk to `tensorflow_model_server`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tumorflow.core.errors import ConfigError
from tumorflow.serving.inference import (
    Classification,
    InferenceService,
    Regression,
    with_context,
)
from tumorflow.serving.repository import VersionStatus
from tumorflow.serving.servable import CLASSIFY_METHOD, REGRESS_METHOD, Servable
from tumorflow.serving.status import ServingError, invalid_argument

logger = logging.getLogger(__name__)


def _spec_choice(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _fill_spec(spec: model_pb2.ModelSpec, servable: Servable, signature_name: str = "") -> None:
    spec.name = servable.name
    spec.version.value = servable.version
    if signature_name:
        spec.signature_name = signature_name


def status_proto(version: int, status: VersionStatus) -> get_model_status_pb2.ModelVersionStatus:
    proto = get_model_status_pb2.ModelVersionStatus(version=version, state=status.state)
    proto.status.error_code = status.error_code.value[0]
    proto.status.error_message = status.error_message
    return proto


# Numeric dtypes whose values travel as raw little-endian bytes in `tensor_content`, as
# tf.make_tensor_proto writes them.
_CONTENT_DTYPES = {
    np.dtype(name): tf.as_dtype(name).as_datatype_enum
    for name in ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16")
}
_CONTENT_NUMPY = {number: dtype for dtype, number in _CONTENT_DTYPES.items()}


def tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """The TensorProto of a response array, as tf.make_tensor_proto encodes it (numbers as
    tensor_content, booleans as bool_val, strings as string_val) but without its per-call Python
    overhead, which costs more than the rest of a response; other dtypes go through
    tf.make_tensor_proto."""
    content_type = _CONTENT_DTYPES.get(array.dtype)
    if content_type is None and array.dtype not in (object, np.bool_):
        return tf.make_tensor_proto(array)
    if content_type is None:
        content_type = types_pb2.DT_BOOL if array.dtype == np.bool_ else types_pb2.DT_STRING
    proto = tensor_pb2.TensorProto(dtype=content_type)
    proto.tensor_shape.dim.extend(
        tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape
    )
    if content_type == types_pb2.DT_BOOL:
        proto.bool_val.extend(array.ravel().tolist())
        return proto
    if content_type != types_pb2.DT_STRING:
        proto.tensor_content = array.tobytes()
        return proto
    values = array.ravel().tolist()
    if not all(isinstance(value, bytes) for value in values):
        return tf.make_tensor_proto(array)
    proto.string_val.extend(values)
    return proto


def request_array(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The array of a request TensorProto, as tf.make_ndarray reads it, but numbers in
    tensor_content are a read-only view of the request's bytes (no copy) and a string tensor is
    one list conversion; any other encoding goes through tf.make_ndarray."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if proto.dtype == types_pb2.DT_STRING and len(proto.string_val) == np.prod(shape, dtype=int):
        return np.array(proto.string_val, dtype=object).reshape(shape)
    dtype = _CONTENT_NUMPY.get(proto.dtype)
    if dtype is not None and proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    return tf.make_ndarray(proto)


def _examples(request_input: input_pb2.Input) -> list[tf.train.Example]:
    """The Examples of a Classify/Regress/MultiInference input, each merged with the context."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        return list(request_input.example_list.examples)
    if kind == "example_list_with_context":
        listed = request_input.example_list_with_context
        return with_context(listed.context, listed.examples)
    raise invalid_argument("the request's input holds no examples")


def _fill_classifications(
    result: classification_pb2.ClassificationResult, classification: Classification
) -> None:
    for pairs in classification.results:
        classifications = result.classifications.add()
        for name, score in pairs:
            classifications.classes.add(label=name, score=score)


def _fill_regressions(result: regression_pb2.RegressionResult, regression: Regression) -> None:
    for value in regression.values:
        result.regressions.add(value=value)


@contextmanager
def _answer(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn a ServingError into the gRPC status of the call; unexpected errors into INTERNAL."""
    try:
        yield
    except ServingError as exc:
        context.abort(exc.code, exc.message)
    except ConfigError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Exception as exc:
        logger.exception("request failed")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService: Predict, Classify, Regress, MultiInference,
    GetModelMetadata."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def _tracked(
        self,
        model_name: str,
        api: str,
        context: grpc.ServicerContext,
        body: Callable[[], Any],
    ) -> Any:
        with _answer(context), self.service.metrics.track(model_name, api, "grpc"):
            return body()

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        def body() -> predict_pb2.PredictResponse:
            inputs = {}
            for key, proto in request.inputs.items():
                try:
                    inputs[key] = request_array(proto)
                except (TypeError, ValueError) as exc:
                    raise invalid_argument(
                        f"input '{key}' is not a valid TensorProto: {exc}"
                    ) from exc
            version, label = _spec_choice(request.model_spec)
            prediction = self.service.predict(
                request.model_spec.name,
                inputs,
                version=version,
                label=label,
                signature_name=request.model_spec.signature_name,
                output_filter=list(request.output_filter),
            )
            response = predict_pb2.PredictResponse()
            _fill_spec(response.model_spec, prediction.servable, prediction.signature_name)
            for key, array in prediction.outputs.items():
                response.outputs[key].CopyFrom(tensor_proto(array))
            return response

        return self._tracked(request.model_spec.name, "predict", context, body)

    def _on_examples(
        self,
        request: Any,
        context: grpc.ServicerContext,
        api: str,
        response: Any,
        fill: Callable[[Any, Any], None],
    ) -> Any:
        """Classify or Regress: run the request's Examples, fill `response`."""

        def body() -> Any:
            result = self._run_task(api, request.model_spec, _examples(request.input))
            _fill_spec(response.model_spec, result.servable, result.signature_name)
            fill(response.result, result)
            return response

        return self._tracked(request.model_spec.name, api, context, body)

    def _run_task(
        self, api: str, spec: model_pb2.ModelSpec, examples: list[tf.train.Example]
    ) -> Classification | Regression:
        version, label = _spec_choice(spec)
        run = self.service.classify if api == "classify" else self.service.regress
        return run(
            spec.name, examples, version=version, label=label, signature_name=spec.signature_name
        )

    def Classify(
        self, request: classification_pb2.ClassificationRequest, context: grpc.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        return self._on_examples(
            request,
            context,
            "classify",
            classification_pb2.ClassificationResponse(),
            _fill_classifications,
        )

    def Regress(
        self, request: regression_pb2.RegressionRequest, context: grpc.ServicerContext
    ) -> regression_pb2.RegressionResponse:
        return self._on_examples(
            request, context, "regress", regression_pb2.RegressionResponse(), _fill_regressions
        )

    def MultiInference(
        self, request: inference_pb2.MultiInferenceRequest, context: grpc.ServicerContext
    ) -> inference_pb2.MultiInferenceResponse:
        """Several classify/regress signatures of one model on the same Examples, as TF Serving:
        every task names the same model and a distinct signature."""

        def body() -> inference_pb2.MultiInferenceResponse:
            if not request.tasks:
                raise invalid_argument("MultiInferenceRequest has no tasks")
            if len({task.model_spec.name for task in request.tasks}) != 1:
                raise invalid_argument(
                    "All ModelSpecs in a MultiInferenceRequest must access the same model name"
                )
            signatures = [task.model_spec.signature_name or "" for task in request.tasks]
            duplicate = next((s for s in signatures if signatures.count(s) > 1), None)
            if duplicate is not None:
                raise invalid_argument(
                    f"Duplicate evaluation of signature: {duplicate or 'serving_default'}"
                )
            examples = _examples(request.input)
            response = inference_pb2.MultiInferenceResponse()
            for task in request.tasks:
                if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                    raise invalid_argument(
                        f"Unsupported signature method_name: {task.method_name!r} "
                        f"(MultiInference runs {CLASSIFY_METHOD} and {REGRESS_METHOD})"
                    )
                api = "classify" if task.method_name == CLASSIFY_METHOD else "regress"
                result = self._run_task(api, task.model_spec, examples)
                answer = response.results.add()
                _fill_spec(answer.model_spec, result.servable, result.signature_name)
                if isinstance(result, Classification):
                    _fill_classifications(answer.classification_result, result)
                else:
                    _fill_regressions(answer.regression_result, result)
            return response

        name = request.tasks[0].model_spec.name if request.tasks else ""
        return self._tracked(name, "multi_inference", context, body)

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        def body() -> get_model_metadata_pb2.GetModelMetadataResponse:
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise invalid_argument(
                    f"Metadata field {fields[0] if fields else '(none)'} is not supported; "
                    "request metadata_field 'signature_def'"
                )
            version, label = _spec_choice(request.model_spec)
            servable = self.service.metadata(request.model_spec.name, version=version, label=label)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            _fill_spec(response.model_spec, servable)
            response.metadata["signature_def"].Pack(servable.signature_def_map())
            return response

        return self._tracked(request.model_spec.name, "metadata", context, body)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        with _answer(context):
            version, label = _spec_choice(request.model_spec)
            statuses = self.service.status(request.model_spec.name, version=version, label=label)
            response = get_model_status_pb2.GetModelStatusResponse()
            for number, status in statuses.items():
                response.model_version_status.append(status_proto(number, status))
            return response

    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        response = model_management_pb2.ReloadConfigResponse()
        try:
            self.service.repository.reload_config(request.config)
        except ConfigError as exc:
            response.status.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            response.status.error_message = str(exc)
        return response
