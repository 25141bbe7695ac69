"""The server's request logger: rows with drift features after close, sampling, overload, the
served version's embedding projection, and requests logged through the server."""

from __future__ import annotations

import argparse
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_until

from tumorflow.components.monitoring.features import IMAGE_FEATURES, EmbeddingProjection
from tumorflow.core.config import DriftConfig
from tumorflow.core.errors import ConfigError
from tumorflow.serving.request_log import RequestLogger


def test_every_logged_request_image_becomes_a_row_with_drift_features(
    tmp_path: Path, level_png, predict_outputs, read_store
):
    request_log = RequestLogger(str(tmp_path))
    for index in range(20):
        request_log.log(
            model_name="kidney-ct",
            model_version=3,
            inputs={"image_bytes": np.array([level_png(60 + index)], dtype=object)},
            outputs=predict_outputs(1),
        )
    request_log.log(
        model_name="kidney-ct",
        model_version=3,
        inputs={
            "image_bytes": np.array([level_png(10), level_png(20), level_png(30)], dtype=object)
        },
        outputs=predict_outputs(3),
    )
    request_log.close()
    today = datetime.now(UTC).date().isoformat()
    parts = list((tmp_path / "kidney-ct" / f"date={today}").glob("part-*.parquet"))
    assert parts
    table = read_store(tmp_path)
    assert len(table) == 23
    assert set(IMAGE_FEATURES) <= set(table.columns)
    assert (table["model_name"] == "kidney-ct").all() and (table["model_version"] == 3).all()
    assert (table["predicted_class"] == "tumor").all()
    assert table["confidence"].tolist() == pytest.approx([0.8] * 23)
    assert table["request_id"].nunique() == 21
    assert table["intensity_mean"].iloc[0] == pytest.approx(60, abs=3)
    assert not any(c.startswith("embedding_pc") for c in table.columns)
    assert request_log.stats["rows"] == 23 and request_log.stats["dropped"] == 0


def test_embeddings_are_projected_with_the_served_versions_projection(
    tmp_path: Path, level_png, predict_outputs, read_store
):
    version_dir = tmp_path / "models" / "kidney-ct" / "4"
    projection = EmbeddingProjection.fit(np.random.default_rng(0).normal(size=(50, 4)), 2)
    projection.save(version_dir / "assets.extra" / "drift_projection.npz")
    lookups = []

    def lookup(name: str, version: int) -> Path:
        lookups.append((name, version))
        return version_dir

    request_log = RequestLogger(str(tmp_path / "log"), model_dir_lookup=lookup)
    outputs = predict_outputs(2)
    for _ in range(3):
        request_log.log(
            model_name="kidney-ct",
            model_version=4,
            inputs={"image_bytes": np.array([level_png(90), level_png(91)], dtype=object)},
            outputs=outputs,
        )
    request_log.close()
    table = read_store(tmp_path / "log")
    expected = projection.transform(outputs["embedding"])
    np.testing.assert_allclose(table[["embedding_pc1", "embedding_pc2"]].to_numpy()[:2], expected)
    assert lookups == [("kidney-ct", 4)]


def test_the_sample_rate_is_respected(tmp_path: Path, level_png, predict_outputs, read_store):
    request_log = RequestLogger(str(tmp_path), sample_rate=0.25, seed=0, flush_interval_s=60)
    inputs = {"image_bytes": np.array([level_png(50, size=8)], dtype=object)}
    for _ in range(800):
        request_log.log(model_name="m", model_version=1, inputs=inputs, outputs=predict_outputs(1))
    request_log.close()
    rows = len(read_store(tmp_path))
    assert 150 <= rows <= 250  # binomial(800, 0.25): mean 200, sd 12
    assert request_log.stats["sampled_out"] == 800 - rows

    silent = RequestLogger(str(tmp_path / "off"), sample_rate=0.0)
    silent.log(model_name="m", model_version=1, inputs=inputs, outputs=predict_outputs(1))
    silent.close()
    assert not (tmp_path / "off").exists()
    with pytest.raises(ConfigError, match=r"within 0\.\.1"):
        RequestLogger(str(tmp_path), sample_rate=1.5)


def test_a_full_queue_drops_requests_without_blocking_them(
    tmp_path: Path, level_png, predict_outputs, read_store
):
    release = threading.Event()

    def stuck_lookup(name: str, version: int) -> None:
        release.wait(30)

    request_log = RequestLogger(str(tmp_path), model_dir_lookup=stuck_lookup, max_queue=3)
    inputs = {"image_bytes": np.array([level_png(70)], dtype=object)}
    costs = []
    for _ in range(50):
        started = time.perf_counter()
        request_log.log(model_name="m", model_version=1, inputs=inputs, outputs=predict_outputs(1))
        costs.append(time.perf_counter() - started)
    assert max(costs) < 0.05
    stats = request_log.stats
    assert stats["dropped"] >= 46
    assert stats["enqueued"] + stats["dropped"] == 50
    release.set()
    request_log.close()
    assert len(read_store(tmp_path)) == request_log.stats["enqueued"]
    request_log.log(model_name="m", model_version=1, inputs=inputs, outputs=predict_outputs(1))
    assert request_log.stats["dropped"] == stats["dropped"] + 1


def test_rows_are_flushed_every_few_seconds_without_closing(
    tmp_path: Path, level_png, predict_outputs, read_store
):
    request_log = RequestLogger(str(tmp_path), flush_interval_s=0.2)
    request_log.log(
        model_name="m",
        model_version=1,
        inputs={"image_bytes": np.array([level_png(40)], dtype=object)},
        outputs=predict_outputs(1),
    )
    wait_until(lambda: list(tmp_path.rglob("part-*.parquet")), 10, "a written log part")
    assert len(read_store(tmp_path)) == 1
    assert not list(tmp_path.rglob(".part-*"))
    request_log.close()


@pytest.mark.service
def test_a_request_through_the_server_appears_in_the_log(
    model_base: Path, tmp_path: Path, level_png, read_store
):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tumorflow.serving.server import ModelServer, ServerOptions

    projection = EmbeddingProjection.fit(np.random.default_rng(0).normal(size=(40, 8)), 3)
    projection.save(model_base / "tumor" / "1" / "assets.extra" / "drift_projection.npz")
    options = ServerOptions(
        port=0,
        rest_api_port=0,
        model_config_file=str(model_base / "models.config"),
        request_log_dir=str(tmp_path / "log"),
    )
    server = ModelServer(options)
    server.start()
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tumor"
        request.model_spec.version_label = "stable"
        request.inputs["image_bytes"].CopyFrom(
            tf.make_tensor_proto([level_png(30), level_png(200)], dtype=tf.string)
        )
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=60
            )
    finally:
        server.stop()
    served_classes = [c.decode() for c in tf.make_ndarray(response.outputs["predicted_class"])]
    table = read_store(tmp_path / "log")
    assert len(table) == 2
    assert (table["model_name"] == "tumor").all() and (table["model_version"] == 1).all()
    assert table["predicted_class"].tolist() == served_classes
    assert table["intensity_mean"].tolist() == pytest.approx([30, 200], abs=5)
    assert table[["embedding_pc1", "embedding_pc2", "embedding_pc3"]].notna().all().all()


def test_serve_logs_the_configured_share_of_requests_by_default():
    from tumorflow.cli.serve import add_serve_arguments
    from tumorflow.serving.server import ServerOptions

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    configured = DriftConfig().request_sample_rate
    assert parser.parse_args([]).request_log_sample_rate == configured
    assert ServerOptions().request_log_sample_rate == configured
    assert parser.parse_args(["--request_log_sample_rate=0.1"]).request_log_sample_rate == 0.1


@pytest.mark.service
def test_the_server_logs_about_its_sample_rate_of_served_requests(
    model_base: Path, tmp_path: Path, level_png, read_store
):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tumorflow.serving.server import ModelServer, ServerOptions

    options = ServerOptions(
        port=0,
        rest_api_port=0,
        model_config_file=str(model_base / "models.config"),
        request_log_dir=str(tmp_path / "log"),
        request_log_sample_rate=0.25,
        request_log_seed=3,
    )
    server = ModelServer(options)
    server.start()
    requests = 400
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tumor"
        request.inputs["image_bytes"].CopyFrom(
            tf.make_tensor_proto([level_png(90, size=16)], dtype=tf.string)
        )
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(requests):
                stub.Predict(request, timeout=60)
    finally:
        server.stop()
    logged = len(read_store(tmp_path / "log"))
    assert 70 <= logged <= 130  # binomial(400, 0.25): mean 100, sd 8.7
    assert server.service.request_log.stats["sampled_out"] == requests - logged
