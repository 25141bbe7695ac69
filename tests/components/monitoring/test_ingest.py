"""The ingest of TF Serving's PredictionLog files and of image folders into the request-log store
that drift reads, and `tumorflow drift-ingest`."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorflow.components.monitoring.features import IMAGE_FEATURES, EmbeddingProjection
from tumorflow.components.monitoring.ingest import ingest_image_folder, ingest_prediction_logs
from tumorflow.components.monitoring.store import UNKNOWN_VERSION
from tumorflow.serving.request_log import RequestLogger

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


def test_tf_serving_prediction_logs_fill_the_store_that_drift_reads(
    tmp_path: Path, level_png, predict_outputs, read_store
):
    from tumorflow.components.monitoring.drift_report import load_table

    version_dir = tmp_path / "models" / "kidney-ct" / "3"
    projection = EmbeddingProjection.fit(np.random.default_rng(0).normal(size=(50, 4)), 2)
    projection.save(version_dir / "assets.extra" / "drift_projection.npz")
    logs = write_records(
        tmp_path / "tfs" / "kidney-ct.log-00001",
        [
            prediction_log([level_png(60), level_png(200)], predict_outputs(2)),
            prediction_log([level_png(120)], predict_outputs(1)),
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
        inputs={"image_bytes": np.array([level_png(60)], dtype=object)},
        outputs=predict_outputs(1),
    )
    served.close()
    assert set(read_store(tmp_path / "served").columns) == set(table.columns) - {
        "embedding_pc1",
        "embedding_pc2",
    }


def test_damaged_records_and_images_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, level_png, predict_outputs, read_store
):
    from tensorflow_serving.apis import prediction_log_pb2

    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.name = "kidney-ct"
    folder = tmp_path / "tfs"
    write_records(
        folder / "a.log",
        [
            b"\x0f\x0f\x0f not a PredictionLog",
            prediction_log([level_png(90), b"not an image"], predict_outputs(2)),
            classify.SerializeToString(),
            prediction_log([level_png(100)]),
        ],
    )
    truncated = write_records(
        folder / "b.log", [prediction_log([level_png(110)]), prediction_log([level_png(120)])]
    )
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with caplog.at_level(logging.INFO, logger="tumorflow.components.monitoring.ingest"):
        rows = ingest_prediction_logs([folder], str(tmp_path / "store"), model_name="renamed")
    assert rows == 3
    table = read_store(tmp_path / "store" / "renamed")
    assert table["intensity_mean"].tolist() == pytest.approx([90, 100, 110], abs=3)
    assert table["predicted_class"].tolist()[0] == "tumor"
    assert "4 records or images skipped" in caplog.text
    assert "b.log: stopped at a damaged record" in caplog.text


def test_a_folder_of_recent_images_fills_the_store_with_image_features(
    tmp_path: Path, level_png, caplog: pytest.LogCaptureFixture
):
    from tumorflow.components.monitoring.drift_report import load_table

    folder = tmp_path / "incoming"
    folder.mkdir()
    days = [datetime(2026, 3, 1, 8, tzinfo=UTC), datetime(2026, 3, 2, 8, tzinfo=UTC)]
    for index, level in enumerate((40, 80, 160)):
        path = folder / f"scan-{index}.png"
        path.write_bytes(level_png(level))
        day = days[min(index, 1)].timestamp()
        os.utime(path, (day, day))
    (folder / "broken.png").write_bytes(b"not an image")
    store = tmp_path / "store"
    with caplog.at_level(logging.DEBUG, logger="tumorflow.components.monitoring.store"):
        assert ingest_image_folder(folder, str(store), "kidney-ct") == 3
    assert f"skipping {folder / 'broken.png'}: cannot decode image" in caplog.text
    assert "BytesIO" not in caplog.text
    assert sorted(p.name for p in (store / "kidney-ct").iterdir()) == [
        "date=2026-03-01",
        "date=2026-03-02",
    ]
    table = load_table(store, (days[1], datetime(2026, 3, 3, tzinfo=UTC)))
    assert table["intensity_mean"].tolist() == pytest.approx([80, 160], abs=3)
    assert (table["model_version"] == UNKNOWN_VERSION).all()
    assert not {"predicted_class", "confidence"} & set(table.columns)


def test_drift_ingest_command_prints_the_rows_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, level_png, read_store
):
    from tumorflow.cli.main import main

    logs = write_records(
        tmp_path / "tfs" / "log-1", [prediction_log([level_png(70), level_png(75)])]
    )
    store = tmp_path / "store"
    assert main(["drift-ingest", "--store", str(store), "--prediction-logs", str(logs)]) == 0
    assert f"wrote 2 rows to the request log at {store}" in capsys.readouterr().out
    assert len(read_store(store / "kidney-ct")) == 2

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "scan.png").write_bytes(level_png(50))
    assert main(["drift-ingest", "--store", str(store), "--images", str(tmp_path / "images")]) == 2
    assert "--images needs --model-name" in capsys.readouterr().err
    served = tmp_path / "models" / "kidney-ct" / "5" / "saved_model.pb"
    served.parent.mkdir(parents=True)
    served.write_bytes(b"")
    argv = ["drift-ingest", "--store", str(store), "--images", str(tmp_path / "images")]
    assert (
        main([*argv, "--model_name", "kidney-ct", "--model_base_path", str(tmp_path / "models")])
        == 0
    )
    assert "wrote 1 rows" in capsys.readouterr().out
    assert sorted(read_store(store / "kidney-ct")["model_version"]) == [3, 3, 5]


def _dicom_folder(folder: Path) -> dict[str, Path]:
    """Raw DICOM as a PACS export holds it: a CT file, an extension-less series file, an
    Enhanced CT with three frames rescaled differently, a truncated file, a `.dcm` that is not
    DICOM, and one PNG."""
    from dicom_fixtures import ct_phantom, write_dicom
    from helpers import image_bytes

    files = {
        "ct": write_dicom(folder / "study" / "ct.dcm", ct_phantom(150, seed=1)),
        "series": write_dicom(folder / "series" / "IM0001", ct_phantom(-50, seed=2)),
        "enhanced": write_dicom(
            folder / "enhanced.dcm",
            np.stack([ct_phantom(60, seed=3)] * 3),
            frame_rescale=[(1.0, -1024.0), (2.0, -1948.0), (0.5, -600.0)],
        ),
        "truncated": write_dicom(folder / "cut.dcm", ct_phantom(80, seed=4)),
        "png": folder / "export.png",
    }
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:-1000])
    (folder / "notes.dcm").write_text("not a DICOM file at all")
    files["png"].write_bytes(image_bytes(seed=5, size=32))
    return files


def _training_features(path: Path) -> list[dict[str, float]]:
    """The drift features of each slice as the training decode (the download step) makes it."""
    from tumorflow.components.data import dicom
    from tumorflow.components.monitoring.features import image_features
    from tumorflow.core.config import DicomConfig

    return [image_features(png) for png in dicom.dicom_to_png(path, DicomConfig())]


def test_a_folder_of_raw_dicom_is_decoded_as_training_decodes_it(
    tmp_path: Path, read_store, caplog: pytest.LogCaptureFixture
) -> None:
    files = _dicom_folder(tmp_path / "incoming")
    store = tmp_path / "store"
    with caplog.at_level(logging.INFO, logger="tumorflow.components"):
        rows = ingest_image_folder(tmp_path / "incoming", str(store), "kidney-ct")
    assert rows == 1 + 1 + 3 + 1
    assert "2 DICOM files quarantined" in caplog.text
    assert "cut.dcm: DICOM not decodable: corrupt DICOM pixel data" in caplog.text
    assert "notes.dcm: DICOM not decodable: not a DICOM file" in caplog.text
    table = read_store(store / "kidney-ct")
    # in file order: enhanced.dcm's three frames, export.png, series/IM0001, study/ct.dcm
    expected = [
        *_training_features(files["enhanced"]),
        None,
        *_training_features(files["series"]),
        *_training_features(files["ct"]),
    ]
    assert len(table) == len(expected)
    for row, features in zip(table.to_dict("records"), expected, strict=True):
        for column in IMAGE_FEATURES if features else ():
            assert row[column] == pytest.approx(features[column]), column
    frames = table["intensity_mean"].tolist()[:3]
    assert frames[2] < frames[0] < frames[1]  # each frame's own rescale: -60, 60, 220 HU


def test_drift_of_a_dicom_folder_reads_its_slices_and_quarantines_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tumorflow.components.monitoring.drift_report import load_table

    _dicom_folder(tmp_path / "current")
    with caplog.at_level(logging.WARNING, logger="tumorflow.components"):
        table = load_table(tmp_path / "current")
    assert len(table) == 1 + 1 + 3 + 1
    assert "quarantined" in caplog.text and "cut.dcm: DICOM not decodable" in caplog.text
    assert table["intensity_std"].min() > 0


def test_drift_ingest_decodes_dicom_with_the_configured_window(tmp_path: Path, read_store) -> None:
    from dicom_fixtures import ct_phantom, write_dicom

    from tumorflow.cli.main import main

    write_dicom(tmp_path / "incoming" / "ct.dcm", ct_phantom(150, seed=1))
    means = {}
    for name, settings in {
        "abdomen": [],
        "bone": [
            "--set",
            "dataset.dicom.window_center=400",
            "--set",
            "dataset.dicom.window_width=1800",
        ],
    }.items():
        store = tmp_path / name
        argv = ["drift-ingest", "--store", str(store), "--images", str(tmp_path / "incoming")]
        assert main([*argv, "--model-name", "kidney-ct", *settings]) == 0
        means[name] = read_store(store / "kidney-ct")["intensity_mean"].item()
    # A wide bone window shows soft tissue as a flat grey: a different mean than the abdomen one.
    assert means["bone"] != pytest.approx(means["abdomen"], abs=1.0)
