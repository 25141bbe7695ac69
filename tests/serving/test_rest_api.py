"""TF Serving's REST API and monitoring endpoint, over real HTTP on loopback."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.service


def call(server, path: str, body: object | bytes | None = None) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{server.rest_port}{path}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def test_status_of_model_version_and_label(server) -> None:
    status, body = call(server, "/v1/models/tumor")
    assert status == 200
    assert body == {
        "model_version_status": [
            {
                "version": v,
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
            for v in ("1", "2")
        ]
    }
    assert (
        call(server, "/v1/models/tumor/versions/2")[1]["model_version_status"][0]["version"] == "2"
    )
    assert (
        call(server, "/v1/models/tumor/labels/stable")[1]["model_version_status"][0]["version"]
        == "1"
    )
    status, body = call(server, "/v1/models/absent")
    assert status == 404 and "absent" in body["error"]


def test_metadata_lists_the_signature_def(server) -> None:
    status, body = call(server, "/v1/models/tumor/labels/canary/metadata")
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200 and body["model_spec"]["version"] == "2"
    assert signature["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert signature["method_name"] == "tensorflow/serving/predict"


def test_row_and_columnar_predict_with_b64_images(server, image, classes) -> None:
    images = [image(1), image(2, mode="L")]
    status, rows = call(
        server, "/v1/models/tumor/versions/1:predict", {"instances": [b64(i) for i in images]}
    )
    assert status == 200 and len(rows["predictions"]) == 2
    first = rows["predictions"][0]
    assert first["predicted_class"] in classes and first["classes"] == list(classes)
    assert abs(sum(first["scores"]) - 1) < 1e-5
    status, columns = call(
        server,
        "/v1/models/tumor/labels/stable:predict",
        {"signature_name": "serving_default", "inputs": {"image_bytes": [b64(i) for i in images]}},
    )
    assert status == 200
    np.testing.assert_allclose(
        columns["outputs"]["scores"], [r["scores"] for r in rows["predictions"]], rtol=1e-5
    )


def test_keras_model_over_rest_matches_the_model(server, keras_model) -> None:
    _, model = keras_model
    features = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
    status, body = call(server, "/v1/models/keras:predict", {"instances": features.tolist()})
    assert status == 200
    np.testing.assert_allclose(body["predictions"], model.predict(features, verbose=0), rtol=1e-5)


@pytest.mark.parametrize(
    ("path", "body", "code", "fragment"),
    [
        ("/v1/models/nope:predict", {"instances": [1]}, 404, "nope"),
        ("/v1/models/tumor/versions/9:predict", {"instances": ["x"]}, 404, "9"),
        ("/v1/models/tumor:predict", b"{not json", 400, "JSON"),
        ("/v1/models/tumor:predict", {"rows": []}, 400, "instances"),
        ("/v1/models/tumor:predict", {"instances": [{"pixels": "x"}]}, 400, "pixels"),
        ("/v1/models/tumor:predict", {"instances": [b64(b"not an image")]}, 400, "image"),
        ("/v1/models/keras:predict", {"instances": [[1, 2]]}, 400, "shape"),
        ("/v1/models/keras:predict", {"instances": [["a", "b", "c", "d"]]}, 400, "float"),
        ("/v1/models/tumor:explain", {"instances": []}, 404, "Malformed request"),
    ],
)
def test_errors_are_json_with_tf_serving_http_codes(server, path, body, code, fragment) -> None:
    status, answer = call(server, path, body)
    assert status == code
    assert fragment in answer["error"]


def test_oversized_body_is_refused_with_413(server) -> None:
    status, answer = call(server, "/v1/models/tumor:predict", b"x" * (2 * 1024 * 1024))
    assert status == 413 and "limit" in answer["error"]


def test_classify_over_rest(server, image, classes) -> None:
    status, body = call(
        server, "/v1/models/tumor:classify", {"examples": [{"image_bytes": b64(image(4))}]}
    )
    assert status == 200
    assert [label for label, _ in body["results"][0]] == list(classes)


def test_prometheus_metrics_count_requests_by_status(server) -> None:
    call(server, "/v1/models/tumor:predict", b"{not json")
    url = f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    assert 'entrypoint="rest",model_name="tumor",status="INVALID_ARGUMENT"' in text
    assert ":tensorflow:serving:request_latency_bucket" in text
