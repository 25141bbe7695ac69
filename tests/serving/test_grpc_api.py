"""The gRPC API through the official tensorflow-serving-api stubs, against a live server."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

pytestmark = pytest.mark.service

# Tensors of every kind the API carries: float, a non-contiguous int64 view, int32, strings
# (1-D and 2-D, with an empty one), an empty float tensor, booleans, float16.
ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(6).reshape(2, 3).T,
    np.array([3, 1], dtype=np.int32),
    np.array([b"tumor", b"cyst"], dtype=object),
    np.array([[b"a", b"b"], [b"c", b""]], dtype=object),
    np.zeros((0, 4), dtype=np.float32),
    np.array([True, False]),
    np.array([1.5], dtype=np.float16),
]


@pytest.mark.parametrize("array", ARRAYS)
def test_response_tensors_decode_as_tf_make_tensor_proto_ones(array) -> None:
    from tumorflow.serving.grpc_api import tensor_proto

    ours, theirs = tensor_proto(array), tf.make_tensor_proto(array)
    assert ours.dtype == theirs.dtype and ours.tensor_shape == theirs.tensor_shape
    np.testing.assert_array_equal(tf.make_ndarray(ours), tf.make_ndarray(theirs))


def _value_fields(proto) -> tensor_pb2.TensorProto:
    """A request tensor that lists its values (float_val, int_val...) instead of tensor_content."""
    array = tf.make_ndarray(proto)
    listed = tensor_pb2.TensorProto(dtype=proto.dtype, tensor_shape=proto.tensor_shape)
    if array.dtype == np.float32:
        listed.float_val.extend(array.ravel().tolist())
    elif array.dtype == np.int32:
        listed.int_val.extend(array.ravel().tolist())
    else:
        return proto
    return listed


@pytest.mark.parametrize("listed", [False, True])
@pytest.mark.parametrize("array", ARRAYS)
def test_request_tensors_read_as_tf_make_ndarray_reads_them(array, listed) -> None:
    from tumorflow.serving.grpc_api import request_array

    proto = tf.make_tensor_proto(array)
    if listed:
        proto = _value_fields(proto)
    ours, theirs = request_array(proto), tf.make_ndarray(proto)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_a_string_tensor_with_fewer_values_than_its_shape_is_padded_as_tf_pads_it() -> None:
    from tumorflow.serving.grpc_api import request_array

    proto = tf.make_tensor_proto([b"scan"], dtype=tf.string)
    proto.tensor_shape.dim[0].size = 3
    np.testing.assert_array_equal(request_array(proto), [b"scan"] * 3)


@pytest.fixture(scope="module")
def channel(server) -> grpc.Channel:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(images: list[bytes], name: str = "tumor", **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def direct_scores(model_dir: Path, images: list[bytes]) -> np.ndarray:
    loaded = tf.saved_model.load(str(model_dir))
    return loaded.signatures["serving_default"](image_bytes=tf.constant(images))["scores"].numpy()


def test_predict_returns_every_output_of_the_latest_version(
    stub, bytes_model_v2, image, classes
) -> None:
    images = [image(1), image(2, size=40, mode="L")]
    response = stub.Predict(predict_request(images), timeout=30)
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    assert set(response.outputs) == {
        "scores",
        "classes",
        "predicted_class",
        "predicted_index",
        "embedding",
    }
    scores = tf.make_ndarray(response.outputs["scores"])
    np.testing.assert_allclose(scores, direct_scores(bytes_model_v2, images), rtol=1e-5)
    predicted = tf.make_ndarray(response.outputs["predicted_class"])
    assert [p.decode() for p in predicted] == [classes[i] for i in scores.argmax(axis=1)]


def test_predict_by_version_label_and_output_filter(stub, bytes_model_v1, image) -> None:
    images = [image(5)]
    by_version = stub.Predict(predict_request(images, version=1), timeout=30)
    by_label = stub.Predict(
        predict_request(images, version_label="stable", signature_name="serving_default"),
        timeout=30,
    )
    request = predict_request(images, version_label="canary")
    request.output_filter.append("predicted_index")
    filtered = stub.Predict(request, timeout=30)
    assert by_version.model_spec.version.value == by_label.model_spec.version.value == 1
    np.testing.assert_allclose(
        tf.make_ndarray(by_label.outputs["scores"]),
        direct_scores(bytes_model_v1, images),
        rtol=1e-5,
    )
    assert filtered.model_spec.version.value == 2
    assert set(filtered.outputs) == {"predicted_index"}


def test_plain_keras_savedmodel_is_served_with_the_numbers_of_the_model(stub, keras_model) -> None:
    _, model = keras_model
    features = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "keras"
    request.inputs["features"].CopyFrom(tf.make_tensor_proto(features))
    response = stub.Predict(request, timeout=30)
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["output_0"]), model.predict(features, verbose=0), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda r: r.model_spec.version.__setattr__("value", 7), grpc.StatusCode.NOT_FOUND, "7"),
        (
            lambda r: setattr(r.model_spec, "version_label", "gold"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "label: gold",
        ),
        (
            lambda r: setattr(r.model_spec, "signature_name", "other"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "other",
        ),
        (
            lambda r: r.inputs["pixels"].CopyFrom(r.inputs.pop("image_bytes")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "alias not found in signature: pixels",
        ),
        (
            lambda r: r.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([1.0, 2.0])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expects dtype string but float",
        ),
        (
            lambda r: r.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([[b"a"]])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expects shape [?] but got [1,1]",
        ),
        (
            lambda r: r.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([b"not an image"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unknown image file format",
        ),
        (lambda r: r.output_filter.append("logits"), grpc.StatusCode.INVALID_ARGUMENT, "logits"),
    ],
)
def test_bad_requests_get_tf_serving_codes_and_do_not_poison_the_server(
    stub, mutate, code, message, image
) -> None:
    request = predict_request([image(3)])
    mutate(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=30)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert (
        stub.Predict(predict_request([image(3)]), timeout=30)
        .outputs["scores"]
        .tensor_shape.dim[0]
        .size
        == 1
    )


def test_one_undecodable_image_in_a_merged_batch_fails_only_its_own_request(stub, image) -> None:
    results: dict[int, object] = {}

    def call(index: int) -> None:
        payload = b"garbage" if index == 3 else image(index)
        try:
            results[index] = stub.Predict(predict_request([payload]), timeout=30)
        except grpc.RpcError as exc:
            results[index] = exc.code()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[3] == grpc.StatusCode.INVALID_ARGUMENT
    assert all(isinstance(results[i], predict_pb2.PredictResponse) for i in range(8) if i != 3)


def test_oversized_message_is_refused(stub) -> None:
    request = predict_request([b"\0" * (2 * 1024 * 1024)])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metadata_is_a_signature_def_map_like_tf_serving(stub) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "tumor"
    request.model_spec.version_label = "stable"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    signature = signature_map.signature_def["serving_default"]
    assert response.model_spec.version.value == 1
    assert signature.method_name == "tensorflow/serving/predict"
    assert signature.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert set(signature.outputs) == {
        "scores",
        "classes",
        "predicted_class",
        "predicted_index",
        "embedding",
    }


def test_classify_maps_examples_to_the_bytes_signature(stub, image, classes) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "tumor"
    for seed in (1, 2):
        example = request.input.example_list.examples.add()
        example.features.feature["image_bytes"].bytes_list.value.append(image(seed))
    response = stub.Classify(request, timeout=30)
    scores = direct_scores_from_predict(stub, [image(1), image(2)])
    assert len(response.result.classifications) == 2
    for row, classification in zip(scores, response.result.classifications, strict=True):
        assert [c.label for c in classification.classes] == list(classes)
        np.testing.assert_allclose([c.score for c in classification.classes], row, rtol=1e-5)


def direct_scores_from_predict(stub, images: list[bytes]) -> np.ndarray:
    return tf.make_ndarray(stub.Predict(predict_request(images), timeout=30).outputs["scores"])


def test_model_status_reports_tf_serving_states(channel) -> None:
    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tumor"
    response = model_stub.GetModelStatus(request, timeout=30)
    states = {s.version: s.state for s in response.model_version_status}
    assert states == {
        1: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
        2: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
    }
    assert all(s.status.error_code == 0 for s in response.model_version_status)
    request.model_spec.name = "absent"
    with pytest.raises(grpc.RpcError) as caught:
        model_stub.GetModelStatus(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_requests_are_batched_as_the_metrics_show(server, stub, image) -> None:
    barrier = threading.Barrier(12)

    def call(seed: int) -> None:
        barrier.wait()
        stub.Predict(predict_request([image(seed)]), timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = server.metrics.exposition().decode()
    buckets = {
        float(le): float(count)
        for le, count in re.findall(
            r'batch_size_bucket\{le="([0-9.]+)",model_name="tumor",signature_name="serving_default",version="2"\} ([0-9.]+)',
            text,
        )
    }
    total = float(
        re.search(
            r'batch_size_count\{model_name="tumor",signature_name="serving_default",version="2"\} ([0-9.]+)',
            text,
        )[1]
    )
    assert total > buckets[1.0], "no batch held more than one request"
    assert (
        'request_count_total{API="predict",entrypoint="grpc",model_name="tumor",status="INVALID_ARGUMENT"}'
        in text
    )
