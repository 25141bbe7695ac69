"""Monitoring: served requests logged, checked in the recent window, and retraining triggered only
on drift, with the reason recorded."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from helpers import encode

from tumorflow.components.monitoring.features import image_feature_table
from tumorflow.core.config import PipelineConfig
from tumorflow.serving.request_log import RequestLogger

IMAGES = 80


def scans(seed: int, brightness: float = 0.0) -> list[np.ndarray]:
    """Noisy slices whose mean level varies per scan; `brightness` shifts them all."""
    rng = np.random.default_rng(seed)
    return [
        np.clip(rng.normal(rng.normal(100, 15) + brightness, 20, (32, 32)), 0, 255).astype(np.uint8)
        for _ in range(IMAGES)
    ]


def serve_requests(log_root: Path, images: list[np.ndarray]) -> None:
    """What the server does after each Predict: hand the request and its outputs to the log."""
    with RequestLogger(str(log_root)) as request_log:
        for image in images:
            request_log.log(
                model_name="kidney-ct",
                model_version=1,
                inputs={"image_bytes": np.array([encode(image)], dtype=object)},
                outputs={
                    "scores": np.array([[0.1, 0.9]], dtype=np.float32),
                    "predicted_class": np.array([b"tumor"], dtype=object),
                },
            )


def drift_check(tmp_path: Path, base: Path, current: Path, **settings):
    """The monitor pipeline's drift check, called as its component runs it."""
    from kfp import dsl

    from tumorflow.pipelines.steps import drift_check as step

    verdict = dsl.Artifact(uri=str(tmp_path / "verdict"))
    drifted = step.python_func(
        current_source=str(current),
        model_base_path=str(base),
        model_name="kidney-ct",
        drift_share=settings.get("drift_share", PipelineConfig().drift.drift_share),
        window_hours=settings.get("window_hours", 24.0),
        dataset=settings.get("dataset", PipelineConfig().dataset.model_dump()),
        report=dsl.HTML(uri=str(tmp_path / "report.html")),
        verdict=verdict,
        reason=str(tmp_path / "reason"),
    )
    return drifted, (tmp_path / "reason").read_text(), verdict


@pytest.fixture()
def served(tmp_path: Path) -> Path:
    """A model base path whose served version 7 carries the drift reference."""
    base = tmp_path / "models"
    assets = base / "kidney-ct" / "7" / "assets.extra"
    assets.mkdir(parents=True)
    (assets.parent / "saved_model.pb").write_bytes(b"")
    image_feature_table(scans(0)).to_parquet(assets / "drift_reference.parquet")
    return base


def test_drift_in_the_request_log_triggers_retraining_and_records_why(tmp_path: Path, served: Path):
    serve_requests(tmp_path / "log", scans(1, brightness=45))
    drifted, reason, verdict = drift_check(tmp_path, served, tmp_path / "log")
    assert drifted is True
    assert "drift detected" in reason and "intensity_mean" in reason
    record = json.loads((tmp_path / "verdict" / "trigger.json").read_text())
    assert set(record) == {
        "reason",
        "triggered_at",
        "window",
        "current_source",
        "reference_source",
        "share_of_drifted_columns",
        "drift_share_threshold",
        "drifted_columns",
        "current_rows",
        "report_html",
        "report_json",
        "verdict",
    }
    assert record["reason"] == reason
    assert record["current_rows"] == IMAGES
    assert "intensity_mean" in record["drifted_columns"]
    assert record["share_of_drifted_columns"] >= record["drift_share_threshold"]
    assert record["reference_source"].endswith("7/assets.extra/drift_reference.parquet")
    assert Path(record["report_html"]).exists()
    assert verdict.metadata == {"drift_detected": True, "reason": reason}


def test_no_drift_means_no_retraining(tmp_path: Path, served: Path):
    serve_requests(tmp_path / "log", scans(2))
    drifted, reason, _ = drift_check(tmp_path, served, tmp_path / "log")
    assert drifted is False and reason == ""
    assert not (tmp_path / "verdict" / "trigger.json").exists()
    assert "<html" in (tmp_path / "report.html").read_text()


def test_recent_dicom_is_decoded_with_the_training_window(tmp_path: Path):
    """The drift check decodes a folder of raw DICOM with the dataset's window: the same slices
    the reference was made from do not drift under that window, and do under another one."""
    from dicom_fixtures import ct_phantom, write_dicom

    from tumorflow.components.data import dicom
    from tumorflow.components.monitoring.monitor import check_recent_drift
    from tumorflow.core.config import DicomConfig

    training = DicomConfig()
    files = [
        write_dicom(tmp_path / "recent" / f"{n:03d}.dcm", ct_phantom(30 + n % 40, seed=n))
        for n in range(40)
    ]
    slices = [png for path in files for png in dicom.dicom_to_png(path, training)]
    reference = tmp_path / "drift_reference.parquet"
    image_feature_table(slices).to_parquet(reference)
    verdicts = {}
    for name, window in {
        "training": training,
        "bone": DicomConfig(window_center=400, window_width=1800),
    }.items():
        verdicts[name], _ = check_recent_drift(
            str(tmp_path / "recent"),
            str(reference),
            tmp_path / name,
            drift_share=0.3,
            window_hours=24,
            model_name="kidney-ct",
            dicom_config=window,
        )
    assert verdicts["training"].current_rows == 40
    assert not verdicts["training"].drift_detected
    assert verdicts["bone"].drift_detected
    assert "intensity_mean" in verdicts["bone"].drifted_columns


def test_only_the_recent_window_counts(tmp_path: Path, served: Path):
    from tumorflow.components.monitoring.monitor import check_recent_drift

    serve_requests(tmp_path / "log", scans(3, brightness=45))
    later = datetime.now(UTC) + timedelta(hours=5)
    reference = served / "kidney-ct" / "7" / "assets.extra" / "drift_reference.parquet"
    verdict, window = check_recent_drift(
        str(tmp_path / "log"),
        str(reference),
        tmp_path / "out",
        drift_share=0.3,
        window_hours=1,
        model_name="kidney-ct",
        now=later,
    )
    assert window[1] - window[0] == timedelta(hours=1)
    assert not verdict.drift_detected
    assert verdict.current_rows == 0
    assert "nothing to compare" in verdict.message


@pytest.mark.e2e
def test_monitor_command_runs_the_monitoring_pipeline(
    tmp_path: Path, served: Path, capsys: pytest.CaptureFixture
):
    from tumorflow.cli.main import main

    serve_requests(tmp_path / "log", scans(4))
    code = main(
        [
            "monitor",
            "--set",
            f"run_root={tmp_path / 'runs'}",
            "--set",
            f"deploy.model_base_path={served}",
            "--current",
            str(tmp_path / "log"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "drift: not detected" in printed
    assert "no retraining needed" in printed
    runs = list((tmp_path / "runs" / "pipeline_root").glob("tumorflow-monitor-*"))
    assert len(runs) == 1 and (runs[0] / "drift-check" / "verdict" / "verdict.json").exists()
    assert not list((tmp_path / "runs" / "pipeline_root").glob("*/download"))

    empty = tmp_path / "empty-models"
    empty.mkdir()
    code = main(
        ["monitor", "--set", f"deploy.model_base_path={empty}", "--current", str(tmp_path / "log")]
    )
    assert code == 2
    assert "deploy a model first" in capsys.readouterr().err


def test_the_served_reference_is_found_and_its_absence_is_said_the_same_way_everywhere(
    tmp_path: Path, served: Path, caplog
):
    from tumorflow.components.monitoring.drift_report import (
        NoDriftReference,
        drift_against_served_model,
        resolve_served_reference,
    )

    reference, model_dir = resolve_served_reference(str(served), "kidney-ct")
    assert reference.endswith("7/assets.extra/drift_reference.parquet")
    assert model_dir == served / "kidney-ct" / "7"

    (served / "kidney-ct" / "7" / "assets.extra" / "drift_reference.parquet").unlink()
    with pytest.raises(NoDriftReference, match="served version 7 has no drift reference"):
        resolve_served_reference(str(served), "kidney-ct")
    with pytest.raises(NoDriftReference, match="no served version of 'chest-mri'"):
        resolve_served_reference(str(served), "chest-mri")
    # the retraining pipeline's drift report goes on without one, and says why in the log
    verdict = drift_against_served_model(
        tmp_path / "no-split", str(served), "kidney-ct", tmp_path / "out", drift_share=0.5
    )
    assert verdict.drift_detected is False
    assert "served version 7 has no drift reference" in caplog.text
