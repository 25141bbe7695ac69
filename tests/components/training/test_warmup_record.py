"""The warm-up record deploy writes without TensorFlow is the record TF Serving's docs build."""

from __future__ import annotations

import pytest

from tumorflow.components.training.export import (
    INPUT,
    SIGNATURE,
    _write_warmup,
    warmup_request_bytes,
)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 70_000])
def test_the_hand_encoded_request_is_byte_for_byte_the_protobuf_one(size):
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    png = bytes(range(256)) * (size // 256) + bytes(size % 256)
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="kidney-ct-é", signature_name=SIGNATURE)
    )
    request.inputs[INPUT].CopyFrom(tf.make_tensor_proto([png], dtype=tf.string))
    expected = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    ).SerializeToString(deterministic=True)
    assert warmup_request_bytes(png, "kidney-ct-é") == expected


def test_tensorflow_reads_the_file_back_as_one_predict_request(tmp_path):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = tmp_path / "tf_serving_warmup_requests"
    _write_warmup(path, b"\x89PNG fake", "brain-mri")
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    assert len(records) == 1
    request = prediction_log_pb2.PredictionLog.FromString(records[0]).predict_log.request
    assert request.model_spec.name == "brain-mri"
    assert request.model_spec.signature_name == SIGNATURE
    assert tf.make_ndarray(request.inputs[INPUT]).tolist() == [b"\x89PNG fake"]
