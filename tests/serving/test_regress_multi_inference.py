"""Regress, MultiInference and classify-method signatures, as TF Serving answers them, through the
official stubs and the REST API against a live server with a TF1-style half_plus_three model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tensorflow as tf
from helpers import free_port, image_bytes
from tensorflow_serving.apis import (
    classification_pb2,
    inference_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tumorflow.serving.servable import CLASSIFY_METHOD, REGRESS_METHOD

pytestmark = pytest.mark.service


def build_half_plus_three(path: Path) -> Path:
    """TF Serving's test model: y = 0.5 x + 3 behind regress, classify and predict signatures.

    `tf.saved_model.save` marks every signature `predict`; the method names are then set as the
    TF1 `regression_signature_def` / `classification_signature_def` exporters write them.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    spec = {"x": tf.io.FixedLenFeature([1], tf.float32)}
    examples = tf.TensorSpec([None], tf.string, name="inputs")

    class HalfPlusThree(tf.Module):
        @tf.function(input_signature=[examples])
        def regress(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"outputs": 0.5 * tf.io.parse_example(inputs, spec)["x"] + 3.0}

        @tf.function(input_signature=[examples])
        def regress_y2(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"outputs": 0.5 * tf.io.parse_example(inputs, spec)["x"] + 2.0}

        @tf.function(input_signature=[examples])
        def classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            y = 0.5 * tf.io.parse_example(inputs, spec)["x"] + 3.0
            labels = tf.tile(tf.constant([["high", "low"]]), [tf.shape(y)[0], 1])
            return {"scores": tf.concat([y, -y], axis=1), "classes": labels}

        @tf.function(input_signature=[examples])
        def scores_only(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"scores": 0.5 * tf.io.parse_example(inputs, spec)["x"] + 3.0}

        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
        def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": 0.5 * x + 3.0}

    module = HalfPlusThree()
    signatures = {
        "serving_default": module.predict,
        "regress_x_to_y": module.regress,
        "regress_x_to_y2": module.regress_y2,
        "classify_x_to_y": module.classify,
        "classify_scores_only": module.scores_only,
    }
    tf.saved_model.save(module, str(path), signatures=signatures)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    defs = proto.meta_graphs[0].signature_def
    for key in ("regress_x_to_y", "regress_x_to_y2"):
        defs[key].method_name = REGRESS_METHOD
    for key in ("classify_x_to_y", "classify_scores_only"):
        defs[key].method_name = CLASSIFY_METHOD
    (path / "saved_model.pb").write_bytes(proto.SerializeToString())
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tumorflow.serving.server import ModelServer, ServerOptions

    base = tmp_path_factory.mktemp("models")
    build_half_plus_three(base / "half_plus_three" / "123")
    model_server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=free_port(),
            model_name="half_plus_three",
            model_base_path=str(base / "half_plus_three"),
        )
    )
    model_server.start()
    yield model_server
    model_server.stop()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[prediction_service_pb2_grpc.PredictionServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _fill(request_input, xs: list[float], context: float | None = None) -> None:
    if context is None:
        target = request_input.example_list.examples
    else:
        with_context = request_input.example_list_with_context
        with_context.context.features.feature["x"].float_list.value.append(context)
        target = with_context.examples
    for x in xs:
        example = target.add()
        if x is not None:
            example.features.feature["x"].float_list.value.append(x)


def _regress(signature: str, xs: list, context: float | None = None):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "half_plus_three"
    request.model_spec.signature_name = signature
    _fill(request.input, xs, context)
    return request


def test_regress_answers_one_value_per_example(stub) -> None:
    response = stub.Regress(_regress("regress_x_to_y", [1.0, 2.0, 5.0]), timeout=30)

    assert [r.value for r in response.result.regressions] == [3.5, 4.0, 5.5]
    assert response.model_spec.name == "half_plus_three"
    assert response.model_spec.version.value == 123
    assert response.model_spec.signature_name == "regress_x_to_y"


def test_regress_merges_the_shared_context_into_each_example(stub) -> None:
    response = stub.Regress(_regress("regress_x_to_y", [None, 2.0], context=4.0), timeout=30)

    # The first example takes x from the context; the second's own x wins.
    assert [r.value for r in response.result.regressions] == [5.0, 4.0]


def test_regress_on_a_predict_signature_or_without_examples_is_invalid(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Regress(_regress("", [1.0]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Expected regression signature method_name" in caught.value.details()

    with pytest.raises(grpc.RpcError) as caught:
        stub.Regress(_regress("regress_x_to_y", []), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as caught:
        stub.Regress(_regress("no_such_signature", [1.0]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_classify_signature_labels_and_scores(stub) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "half_plus_three"
    request.model_spec.signature_name = "classify_x_to_y"
    _fill(request.input, [1.0, 3.0])
    response = stub.Classify(request, timeout=30)

    rows = [[(c.label, c.score) for c in r.classes] for r in response.result.classifications]
    assert rows == [[("high", 3.5), ("low", -3.5)], [("high", 4.5), ("low", -4.5)]]

    request.model_spec.signature_name = "classify_scores_only"
    response = stub.Classify(request, timeout=30)
    # No `classes` output: TF Serving leaves the labels empty.
    assert [[(c.label, c.score) for c in r.classes] for r in response.result.classifications] == [
        [("", 3.5)],
        [("", 4.5)],
    ]


def _task(request, method: str, signature: str, model: str = "half_plus_three") -> None:
    task = request.tasks.add()
    task.model_spec.name = model
    task.model_spec.signature_name = signature
    task.method_name = method


def test_multi_inference_runs_every_task_on_the_same_examples(stub) -> None:
    request = inference_pb2.MultiInferenceRequest()
    _task(request, REGRESS_METHOD, "regress_x_to_y")
    _task(request, REGRESS_METHOD, "regress_x_to_y2")
    _task(request, CLASSIFY_METHOD, "classify_x_to_y")
    _fill(request.input, [1.0, 2.0])
    response = stub.MultiInference(request, timeout=30)

    first, second, third = response.results
    assert [r.value for r in first.regression_result.regressions] == [3.5, 4.0]
    assert [r.value for r in second.regression_result.regressions] == [2.5, 3.0]
    assert [c.label for c in third.classification_result.classifications[0].classes] == [
        "high",
        "low",
    ]
    assert [r.model_spec.signature_name for r in response.results] == [
        "regress_x_to_y",
        "regress_x_to_y2",
        "classify_x_to_y",
    ]
    assert all(r.model_spec.version.value == 123 for r in response.results)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([], "no tasks"),
        (
            [
                (REGRESS_METHOD, "regress_x_to_y", "half_plus_three"),
                (REGRESS_METHOD, "regress_x_to_y2", "other"),
            ],
            "same model name",
        ),
        (
            [
                (REGRESS_METHOD, "regress_x_to_y", "half_plus_three"),
                (REGRESS_METHOD, "regress_x_to_y", "half_plus_three"),
            ],
            "Duplicate evaluation of signature: regress_x_to_y",
        ),
        ([("tensorflow/serving/predict", "", "half_plus_three")], "Unsupported signature"),
    ],
)
def test_bad_multi_inference_requests_are_invalid_argument(stub, tasks, message) -> None:
    request = inference_pb2.MultiInferenceRequest()
    for method, signature, model in tasks:
        _task(request, method, signature, model)
    _fill(request.input, [1.0])
    with pytest.raises(grpc.RpcError) as caught:
        stub.MultiInference(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_regress_and_classify_with_context(server) -> None:
    status, body = _post(
        server,
        "/v1/models/half_plus_three:regress",
        {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]},
    )
    assert (status, body) == (200, {"results": [3.5, 4.0]})

    status, body = _post(
        server,
        "/v1/models/half_plus_three/versions/123:classify",
        {"signature_name": "classify_x_to_y", "context": {"x": 3.0}, "examples": [{}]},
    )
    assert (status, body) == (200, {"results": [[["high", 4.5], ["low", -4.5]]]})

    status, body = _post(server, "/v1/models/half_plus_three:regress", {"examples": [{"x": 1.0}]})
    assert status == 400 and "Expected regression signature method_name" in body["error"]


def test_binary_bytes_to_an_example_parsing_input_are_invalid_argument(stub) -> None:
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_three"
    request.model_spec.signature_name = "regress_x_to_y"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto([image_bytes(size=4)], dtype=tf.string))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=30)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server still answers.
    assert stub.Regress(_regress("regress_x_to_y", [0.0]), timeout=30).result.regressions
