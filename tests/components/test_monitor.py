"""Monitoring: served requests logged, checked in the recent window, and retraining triggered only
on drift, with the reason recorded."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from helpers import encode

from tumorflow.components.drift_features import image_feature_table
from tumorflow.core.config import PipelineConfig
from tumorflow.pipelines.monitor import check_and_trigger
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


class RecordingTrigger:
    def __init__(self) -> None:
        self.calls: list[tuple[PipelineConfig, str]] = []

    def __call__(self, config: PipelineConfig, reason: str) -> str:
        self.calls.append((config, reason))
        return f"run-{len(self.calls)}"


@pytest.fixture()
def reference(tmp_path: Path) -> Path:
    path = tmp_path / "reference.parquet"
    image_feature_table(scans(0)).to_parquet(path)
    return path


def test_drift_in_the_request_log_starts_retraining_and_records_why(
    tmp_path: Path, reference: Path
):
    serve_requests(tmp_path / "log", scans(1, brightness=45))
    trigger = RecordingTrigger()
    config = PipelineConfig(run_root=str(tmp_path / "runs"))
    result = check_and_trigger(
        config, str(tmp_path / "log"), str(reference), tmp_path / "out", trigger
    )
    assert result.triggered and result.run == "run-1"
    assert len(trigger.calls) == 1
    called_config, reason = trigger.calls[0]
    assert called_config is config
    assert "drift detected" in reason and "intensity_mean" in reason
    record = json.loads((tmp_path / "out" / "trigger.json").read_text())
    assert record["reason"] == reason
    assert record["run"] == "run-1"
    assert record["current_rows"] == IMAGES
    assert "intensity_mean" in record["drifted_columns"]
    assert record["share_of_drifted_columns"] >= config.drift.drift_share
    assert Path(record["report_html"]).exists()


def test_no_drift_means_no_retraining(tmp_path: Path, reference: Path):
    serve_requests(tmp_path / "log", scans(2))
    trigger = RecordingTrigger()
    result = check_and_trigger(
        PipelineConfig(), str(tmp_path / "log"), str(reference), tmp_path / "out", trigger
    )
    assert not result.triggered and not result.verdict.drift_detected
    assert trigger.calls == []
    assert not (tmp_path / "out" / "trigger.json").exists()
    assert (tmp_path / "out" / "report.html").exists()


def test_only_the_recent_window_counts(tmp_path: Path, reference: Path):
    serve_requests(tmp_path / "log", scans(3, brightness=45))
    trigger = RecordingTrigger()
    config = PipelineConfig(drift={"window_hours": 1})
    later = datetime.now(UTC) + timedelta(hours=5)
    result = check_and_trigger(
        config, str(tmp_path / "log"), str(reference), tmp_path / "out", trigger, now=later
    )
    assert not result.triggered and trigger.calls == []
    assert result.verdict.current_rows == 0
    assert "nothing to compare" in result.verdict.message


def test_monitor_command_uses_the_served_versions_reference(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture
):
    from tumorflow.cli.main import main

    base = tmp_path / "models"
    assets = base / "kidney-ct" / "7" / "assets.extra"
    assets.mkdir(parents=True)
    (assets.parent / "saved_model.pb").write_bytes(b"")
    (assets / "drift_reference.parquet").write_bytes(reference.read_bytes())
    serve_requests(tmp_path / "log", scans(4))
    code = main(
        [
            "monitor",
            "--set",
            f"run_root={tmp_path / 'runs'}",
            "--set",
            f"deploy.model_base_path={base}",
            "--current",
            str(tmp_path / "log"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "drift: not detected" in printed
    assert "no retraining needed" in printed

    empty = tmp_path / "empty-models"
    empty.mkdir()
    code = main(
        ["monitor", "--set", f"deploy.model_base_path={empty}", "--current", str(tmp_path / "log")]
    )
    assert code == 2
    assert "pass --reference or deploy a model first" in capsys.readouterr().err
