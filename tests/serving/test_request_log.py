"""The request log: rows with drift features after close, sampling, overload, embedding projection;
the same store filled from TF Serving's PredictionLog files and from a folder of images."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tumorflow.components.drift_features import IMAGE_FEATURES, EmbeddingProjection
from tumorflow.core.errors import ConfigError
from tumorflow.serving.request_log import (
    UNKNOWN_VERSION,
    RequestLogger,
    ingest_image_folder,
    ingest_prediction_logs,
)


def png(level: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(level)
    pixels = np.clip(rng.normal(level, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def predict_outputs(n: int) -> dict[str, np.ndarray]:
    scores = np.tile(np.array([[0.2, 0.8]], dtype=np.float32), (n, 1))
    return {
        "scores": scores,
        "classes": np.array([[b"normal", b"tumor"]] * n, dtype=object),
        "predicted_class": np.array([b"tumor"] * n, dtype=object),
        "predicted_index": np.ones(n, dtype=np.int64),
        "embedding": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
    }


def read_log(root: Path) -> pd.DataFrame:
    parts = sorted(root.rglob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else None


def test_every_logged_request_image_becomes_a_row_with_drift_features(tmp_path: Path):
    request_log = RequestLogger(str(tmp_path))
    for index in range(20):
        request_log.log(
            model_name="kidney-ct",
            model_version=3,
            inputs={"image_bytes": np.array([png(60 + index)], dtype=object)},
            outputs=predict_outputs(1),
        )
    request_log.log(
        model_name="kidney-ct",
        model_version=3,
        inputs={"image_bytes": np.array([png(10), png(20), png(30)], dtype=object)},
        outputs=predict_outputs(3),
    )
    request_log.close()
    today = datetime.now(UTC).date().isoformat()
    parts = list((tmp_path / "kidney-ct" / f"date={today}").glob("part-*.parquet"))
    assert parts
    table = read_log(tmp_path)
    assert len(table) == 23
    assert set(IMAGE_FEATURES) <= set(table.columns)
    assert (table["model_name"] == "kidney-ct").all() and (table["model_version"] == 3).all()
    assert (table["predicted_class"] == "tumor").all()
    assert table["confidence"].tolist() == pytest.approx([0.8] * 23)
    assert table["request_id"].nunique() == 21
    assert table["intensity_mean"].iloc[0] == pytest.approx(60, abs=3)
    assert not any(c.startswith("embedding_pc") for c in table.columns)
    assert request_log.stats["rows"] == 23 and request_log.stats["dropped"] == 0


def test_pixel_tensors_of_third_party_models_are_logged_and_other_inputs_skipped(tmp_path: Path):
    request_log = RequestLogger(str(tmp_path))
    pixels = np.full((2, 24, 24, 3), 0.5, dtype=np.float32)
    request_log.log(
        model_name="other",
        model_version=1,
        inputs={"input_1": pixels},
        outputs={"probabilities": np.array([[0.3, 0.7], [0.9, 0.1]], dtype=np.float32)},
    )
    request_log.log(
        model_name="other",
        model_version=1,
        inputs={"tabular": np.zeros((2, 5), dtype=np.float32)},
        outputs={"y": np.zeros((2, 1), dtype=np.float32)},
    )
    request_log.log(
        model_name="other",
        model_version=1,
        inputs={"image_bytes": np.array([b"not an image"], dtype=object)},
        outputs=predict_outputs(1),
    )
    request_log.close()
    table = read_log(tmp_path)
    assert len(table) == 2
    assert table["intensity_mean"].tolist() == pytest.approx([127.5, 127.5], abs=1)
    assert table["predicted_class"].tolist() == ["1", "0"]
    assert table["confidence"].tolist() == pytest.approx([0.7, 0.9])
    assert request_log.stats["skipped"] == 2


def test_embeddings_are_projected_with_the_served_versions_projection(tmp_path: Path):
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
            inputs={"image_bytes": np.array([png(90), png(91)], dtype=object)},
            outputs=outputs,
        )
    request_log.close()
    table = read_log(tmp_path / "log")
    expected = projection.transform(outputs["embedding"])
    np.testing.assert_allclose(table[["embedding_pc1", "embedding_pc2"]].to_numpy()[:2], expected)
    assert lookups == [("kidney-ct", 4)]


def test_the_sample_rate_is_respected(tmp_path: Path):
    request_log = RequestLogger(str(tmp_path), sample_rate=0.25, seed=0, flush_interval_s=60)
    inputs = {"image_bytes": np.array([png(50, size=8)], dtype=object)}
    for _ in range(800):
        request_log.log(model_name="m", model_version=1, inputs=inputs, outputs=predict_outputs(1))
    request_log.close()
    rows = len(read_log(tmp_path))
    assert 150 <= rows <= 250  # binomial(800, 0.25): mean 200, sd 12
    assert request_log.stats["sampled_out"] == 800 - rows

    silent = RequestLogger(str(tmp_path / "off"), sample_rate=0.0)
    silent.log(model_name="m", model_version=1, inputs=inputs, outputs=predict_outputs(1))
    silent.close()
    assert not (tmp_path / "off").exists()
    with pytest.raises(ConfigError, match=r"within 0\.\.1"):
        RequestLogger(str(tmp_path), sample_rate=1.5)


def test_a_full_queue_drops_requests_without_blocking_them(tmp_path: Path):
    release = threading.Event()

    def stuck_lookup(name: str, version: int) -> None:
        release.wait(30)

    request_log = RequestLogger(str(tmp_path), model_dir_lookup=stuck_lookup, max_queue=3)
    inputs = {"image_bytes": np.array([png(70)], dtype=object)}
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
    assert len(read_log(tmp_path)) == request_log.stats["enqueued"]
    request_log.log(model_name="m", model_version=1, inputs=inputs, outputs=predict_outputs(1))
    assert request_log.stats["dropped"] == stats["dropped"] + 1


def test_rows_are_flushed_every_few_seconds_without_closing(tmp_path: Path):
    request_log = RequestLogger(str(tmp_path), flush_interval_s=0.2)
    request_log.log(
        model_name="m",
        model_version=1,
        inputs={"image_bytes": np.array([png(40)], dtype=object)},
        outputs=predict_outputs(1),
    )
    deadline = time.monotonic() + 10
    while not list(tmp_path.rglob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(read_log(tmp_path)) == 1
    assert not list(tmp_path.rglob(".part-*"))
    request_log.close()


def test_a_hostile_model_name_stays_inside_the_log_root(tmp_path: Path):
    with RequestLogger(str(tmp_path / "log")) as request_log:
        request_log.log(
            model_name="../../escape",
            model_version=1,
            inputs={"image_bytes": np.array([png(40)], dtype=object)},
            outputs=predict_outputs(1),
        )
    parts = list(tmp_path.rglob("part-*.parquet"))
    assert len(parts) == 1
    assert (tmp_path / "log") in parts[0].parents


@pytest.mark.slow
def test_a_request_through_the_server_appears_in_the_log(model_base: Path, tmp_path: Path):
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
            tf.make_tensor_proto([png(30), png(200)], dtype=tf.string)
        )
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=60
            )
    finally:
        server.stop()
    served_classes = [c.decode() for c in tf.make_ndarray(response.outputs["predicted_class"])]
    table = read_log(tmp_path / "log")
    assert len(table) == 2
    assert (table["model_name"] == "tumor").all() and (table["model_version"] == 1).all()
    assert table["predicted_class"].tolist() == served_classes
    assert table["intensity_mean"].tolist() == pytest.approx([30, 200], abs=5)
    assert table[["embedding_pc1", "embedding_pc2", "embedding_pc3"]].notna().all().all()


LOGGED_AT = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def prediction_log(
    images: list[bytes], outputs: dict[str, np.ndarray] | None = None, version: int = 3
) -> bytes:
    """A serialized PredictionLog as TF Serving's request logging writes it."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "kidney-ct"
    request.model_spec.version_label = "stable"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "kidney-ct"
    response.model_spec.version.value = version
    response.model_spec.signature_name = "serving_default"
    for key, value in (outputs or {}).items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    log = prediction_log_pb2.PredictionLog()
    log.log_metadata.model_spec.CopyFrom(response.model_spec)
    log.log_metadata.sampling_config.sampling_rate = 0.1
    log.predict_log.request.CopyFrom(request)
    log.predict_log.response.CopyFrom(response)
    return log.SerializeToString()


def write_records(path: Path, records: list[bytes], modified: datetime = LOGGED_AT) -> Path:
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    os.utime(path, (modified.timestamp(), modified.timestamp()))
    return path


def test_tf_serving_prediction_logs_fill_the_store_that_drift_reads(tmp_path: Path):
    from tumorflow.components.drift import load_table

    version_dir = tmp_path / "models" / "kidney-ct" / "3"
    projection = EmbeddingProjection.fit(np.random.default_rng(0).normal(size=(50, 4)), 2)
    projection.save(version_dir / "assets.extra" / "drift_projection.npz")
    logs = write_records(
        tmp_path / "tfs" / "kidney-ct.log-00001",
        [
            prediction_log([png(60), png(200)], predict_outputs(2)),
            prediction_log([png(120)], predict_outputs(1)),
        ],
    )
    store = tmp_path / "store"
    rows = ingest_prediction_logs(
        logs,
        str(store),
        model_dir_lookup=lambda name, version: tmp_path / "models" / name / str(version),
    )
    assert rows == 3
    assert list((store / "kidney-ct").iterdir()) == [store / "kidney-ct" / "date=2026-03-02"]
    window = (datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC))
    table = load_table(store, window)
    assert len(table) == 3
    assert set(IMAGE_FEATURES) <= set(table.columns)
    assert table["intensity_mean"].tolist() == pytest.approx([60, 200, 120], abs=3)
    assert (pd.to_datetime(table["timestamp"], utc=True) == pd.Timestamp(LOGGED_AT)).all()
    assert (table["model_version"] == 3).all() and table["request_id"].nunique() == 2
    assert (table["predicted_class"] == "tumor").all()
    assert table["confidence"].tolist() == pytest.approx([0.8] * 3)
    np.testing.assert_allclose(
        table[["embedding_pc1", "embedding_pc2"]].to_numpy()[:2],
        projection.transform(predict_outputs(2)["embedding"]),
        rtol=1e-6,
    )
    served = RequestLogger(str(tmp_path / "served"))
    served.log(
        model_name="kidney-ct",
        model_version=3,
        inputs={"image_bytes": np.array([png(60)], dtype=object)},
        outputs=predict_outputs(1),
    )
    served.close()
    assert set(read_log(tmp_path / "served").columns) == set(table.columns) - {
        "embedding_pc1",
        "embedding_pc2",
    }


def test_damaged_records_and_images_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from tensorflow_serving.apis import prediction_log_pb2

    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.name = "kidney-ct"
    folder = tmp_path / "tfs"
    write_records(
        folder / "a.log",
        [
            b"\x0f\x0f\x0f not a PredictionLog",
            prediction_log([png(90), b"not an image"], predict_outputs(2)),
            classify.SerializeToString(),
            prediction_log([png(100)]),
        ],
    )
    truncated = write_records(
        folder / "b.log", [prediction_log([png(110)]), prediction_log([png(120)])]
    )
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with caplog.at_level(logging.INFO, logger="tumorflow.serving.request_log"):
        rows = ingest_prediction_logs([folder], str(tmp_path / "store"), model_name="renamed")
    assert rows == 3
    table = read_log(tmp_path / "store" / "renamed")
    assert table["intensity_mean"].tolist() == pytest.approx([90, 100, 110], abs=3)
    assert table["predicted_class"].tolist()[0] == "tumor"
    assert "4 records or images skipped" in caplog.text
    assert "b.log: stopped at a damaged record" in caplog.text


def test_a_folder_of_recent_images_fills_the_store_with_image_features(tmp_path: Path):
    from tumorflow.components.drift import load_table

    folder = tmp_path / "incoming"
    folder.mkdir()
    days = [datetime(2026, 3, 1, 8, tzinfo=UTC), datetime(2026, 3, 2, 8, tzinfo=UTC)]
    for index, level in enumerate((40, 80, 160)):
        path = folder / f"scan-{index}.png"
        path.write_bytes(png(level))
        day = days[min(index, 1)].timestamp()
        os.utime(path, (day, day))
    (folder / "broken.png").write_bytes(b"not an image")
    store = tmp_path / "store"
    assert ingest_image_folder(folder, str(store), "kidney-ct") == 3
    assert sorted(p.name for p in (store / "kidney-ct").iterdir()) == [
        "date=2026-03-01",
        "date=2026-03-02",
    ]
    table = load_table(store, (days[1], datetime(2026, 3, 3, tzinfo=UTC)))
    assert table["intensity_mean"].tolist() == pytest.approx([80, 160], abs=3)
    assert (table["model_version"] == UNKNOWN_VERSION).all()
    assert not {"predicted_class", "confidence"} & set(table.columns)


def test_drift_ingest_command_prints_the_rows_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    from tumorflow.cli.main import main

    logs = write_records(tmp_path / "tfs" / "log-1", [prediction_log([png(70), png(75)])])
    store = tmp_path / "store"
    assert main(["drift-ingest", "--store", str(store), "--prediction-logs", str(logs)]) == 0
    assert f"wrote 2 rows to the request log at {store}" in capsys.readouterr().out
    assert len(read_log(store / "kidney-ct")) == 2

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "scan.png").write_bytes(png(50))
    assert main(["drift-ingest", "--store", str(store), "--images", str(tmp_path / "images")]) == 2
    assert "--images needs --model_name" in capsys.readouterr().err
    served = tmp_path / "models" / "kidney-ct" / "5" / "saved_model.pb"
    served.parent.mkdir(parents=True)
    served.write_bytes(b"")
    argv = ["drift-ingest", "--store", str(store), "--images", str(tmp_path / "images")]
    assert (
        main([*argv, "--model_name", "kidney-ct", "--model_base_path", str(tmp_path / "models")])
        == 0
    )
    assert "wrote 1 rows" in capsys.readouterr().out
    assert sorted(read_log(store / "kidney-ct")["model_version"]) == [3, 3, 5]
