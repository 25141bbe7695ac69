"""Drift reports: statistical sanity on synthetic CT-like images, the files a user opens, the
sources a report reads, and `tumorflow drift`."""

from __future__ import annotations

import io
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from tumorflow.components.monitoring.drift_report import (
    drift_against_reference,
    drift_report,
    load_table,
)
from tumorflow.components.monitoring.features import IMAGE_FEATURES, image_feature_table
from tumorflow.core.errors import DatasetError
from tumorflow.core.serving_layout import served_version

IMAGES_PER_TABLE = 250
DRIFT_SHARE = 0.3


def ct_slices(rng: np.random.Generator, n: int, size: int = 64) -> list[np.ndarray]:
    """CT-like slices: dark air, a body ellipse of soft tissue, bright organ blobs, noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    slices = []
    for _ in range(n):
        cx, cy = rng.uniform(0.4, 0.6, 2)
        rx, ry = rng.uniform(0.25, 0.4, 2)
        body = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        image = np.full((size, size), 15.0) + body * rng.normal(90, 10)
        for _ in range(rng.integers(1, 4)):
            ox, oy = rng.uniform(0.3, 0.7, 2)
            radius = rng.uniform(0.04, 0.12)
            image += (((xx - ox) ** 2 + (yy - oy) ** 2) <= radius**2) * rng.normal(70, 15)
        image += rng.normal(0, 6, image.shape)
        slices.append(np.clip(image, 0, 255))
    return slices


def other_scanner(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A softer reconstruction kernel at a lower resolution."""
    pil = Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    return np.asarray(pil.resize((48, 48), Image.Resampling.BILINEAR), dtype=np.float32)


SHIFTS = {
    "brightness": lambda im, rng: np.clip(im + 25, 0, 255),
    "contrast": lambda im, rng: np.clip((im - im.mean()) * 1.4 + im.mean(), 0, 255),
    "noise": lambda im, rng: np.clip(im + rng.normal(0, 12, im.shape), 0, 255),
    "scanner": other_scanner,
}
EXPECTED_DRIFTED = {
    "brightness": {"intensity_mean", "intensity_p50"},
    "contrast": {"intensity_std", "contrast"},
    "noise": {"sharpness", "entropy"},
    "scanner": {"width", "height", "sharpness"},
}


def tables(seed: int, shift=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    reference = image_feature_table(ct_slices(rng, IMAGES_PER_TABLE))
    current = ct_slices(rng, IMAGES_PER_TABLE)
    if shift is not None:
        current = [shift(image, rng) for image in current]
    return reference, image_feature_table(current)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.e2e
def test_same_distribution_gives_no_drift_in_at_least_9_of_10_seeded_trials(tmp_path: Path):
    detected = [
        drift_report(*tables(seed), tmp_path / str(seed), DRIFT_SHARE).drift_detected
        for seed in range(10)
    ]
    assert sum(detected) <= 1, detected


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_each_kind_of_shift_is_detected(shift: str, tmp_path: Path):
    verdict = drift_report(*tables(100, SHIFTS[shift]), tmp_path, DRIFT_SHARE)
    assert verdict.drift_detected
    assert verdict.share_of_drifted_columns >= DRIFT_SHARE
    assert EXPECTED_DRIFTED[shift] <= set(verdict.drifted_columns)


class _Titles(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_report_html_json_and_verdict_agree(tmp_path: Path):
    verdict = drift_report(*tables(7, SHIFTS["brightness"]), tmp_path, DRIFT_SHARE)
    parser = _Titles()
    parser.feed((tmp_path / "report.html").read_text())
    page = "".join(parser.text)
    assert {"html", "body", "script"} <= parser.tags
    assert "Drift is detected for" in page
    for column in IMAGE_FEATURES:
        assert f"Value Drift for column {column}" in page

    stored = json.loads((tmp_path / "verdict.json").read_text())
    assert stored == json.loads(json.dumps(verdict.to_dict()))
    assert stored["drift_detected"] is True
    assert stored["html_path"] == str(tmp_path / "report.html")

    snapshot = json.loads((tmp_path / "report.json").read_text())
    share = next(
        m["value"]["share"]
        for m in snapshot["metrics"]
        if m["config"]["type"].endswith("DriftedColumnsCount")
    )
    assert share == pytest.approx(stored["share_of_drifted_columns"])
    failed = {
        t["metric_config"]["params"]["column"]
        for t in snapshot["tests"]
        if t["id"] == "drift" and t["status"] == "FAIL"
    }
    assert failed == set(stored["drifted_columns"])


def test_prediction_drift_is_reported_when_both_tables_hold_predictions(tmp_path: Path):
    reference, current = tables(3)
    rng = np.random.default_rng(3)
    reference["predicted_class"] = rng.choice(["normal", "tumor"], len(reference), p=[0.8, 0.2])
    current["predicted_class"] = rng.choice(["normal", "tumor"], len(current), p=[0.3, 0.7])
    reference["confidence"] = rng.uniform(0.8, 1.0, len(reference))
    current["confidence"] = rng.uniform(0.8, 1.0, len(current))
    verdict = drift_report(reference, current, tmp_path, DRIFT_SHARE)
    by_column = {c.column: c for c in verdict.prediction_drift}
    assert by_column["predicted_class"].drifted
    assert not by_column["confidence"].drifted
    assert "predicted_class" not in verdict.drifted_columns
    assert "prediction drift on predicted_class: yes" in verdict.summary()


def test_tables_without_shared_features_or_rows_are_refused(tmp_path: Path):
    reference, current = tables(1)
    with pytest.raises(DatasetError, match="share no drift feature columns"):
        drift_report(reference, pd.DataFrame({"x": [1.0, 2.0]}), tmp_path, DRIFT_SHARE)
    with pytest.raises(DatasetError, match="at least 2"):
        drift_report(reference, current.iloc[:1], tmp_path, DRIFT_SHARE)


def test_big_tables_are_sampled_deterministically_and_say_so(tmp_path: Path):
    reference, current = tables(2)
    first = drift_report(reference, current, tmp_path / "a", DRIFT_SHARE, max_rows=100)
    second = drift_report(reference, current, tmp_path / "b", DRIFT_SHARE, max_rows=100)
    assert first.sampled_to == 100
    assert [c.score for c in first.columns] == [c.score for c in second.columns]
    assert "sampled to 100 rows" in first.summary()


def test_load_table_reads_an_image_folder_and_skips_corrupt_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images" / "scanner-a"
    folder.mkdir(parents=True)
    for index, image in enumerate(ct_slices(rng, 5)):
        (folder / f"{index}.png").write_bytes(png(image))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        table = load_table(tmp_path / "images")
    assert len(table) == 5
    assert f"skipping {folder / 'broken.png'}: cannot decode image" in caplog.text
    assert "BytesIO" not in caplog.text
    assert list(table.columns) == list(IMAGE_FEATURES)
    assert (table["width"] == 64).all()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_table(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        load_table(tmp_path / "missing")


def _write_log(root: Path, rows: pd.DataFrame, day: str, name: str) -> None:
    folder = root / "kidney-ct" / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(folder / f"part-{name}.parquet", index=False)


def test_load_table_reads_a_request_log_inside_a_time_window(tmp_path: Path):
    _, features = tables(4)
    now = datetime(2026, 11, 22, 12, tzinfo=UTC)
    recent = features.iloc[:10].assign(
        timestamp=[now - timedelta(minutes=m) for m in range(10)], model_name="kidney-ct"
    )
    old = features.iloc[10:15].assign(
        timestamp=[now - timedelta(days=3)] * 5, model_name="kidney-ct"
    )
    _write_log(tmp_path, recent, "2026-11-22", "a")
    _write_log(tmp_path, old, "2026-11-19", "b")
    assert len(load_table(tmp_path)) == 15
    window = (now - timedelta(hours=1), now + timedelta(seconds=1))
    assert len(load_table(tmp_path, window)) == 10
    assert len(load_table(tmp_path, window, model_name="other-model")) == 0
    assert len(load_table(tmp_path, (now - timedelta(days=4), now - timedelta(days=2)))) == 5


def test_stored_tables_round_trip_as_parquet_and_csv(tmp_path: Path):
    reference, _ = tables(5)
    reference.to_parquet(tmp_path / "ref.parquet")
    reference.to_csv(tmp_path / "ref.csv", index=False)
    pd.testing.assert_frame_equal(load_table(tmp_path / "ref.parquet"), reference)
    pd.testing.assert_frame_equal(load_table(tmp_path / "ref.csv"), reference)
    (tmp_path / "ref.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"\.parquet or \.csv"):
        load_table(tmp_path / "ref.txt")


def test_no_reference_gives_a_verdict_that_says_so(tmp_path: Path):
    verdict = drift_against_reference(tmp_path / "split", None, tmp_path / "out", DRIFT_SHARE)
    assert not verdict.drift_detected
    assert "no deployed model reference" in verdict.message
    assert json.loads((tmp_path / "out" / "verdict.json").read_text())["columns"] == []


def test_served_version_prefers_the_stable_label_then_the_highest_version(tmp_path: Path):
    assert served_version(str(tmp_path), "kidney-ct") is None
    for version in (2, 3, 5):
        (tmp_path / "kidney-ct" / str(version) / "assets.extra").mkdir(parents=True)
        (tmp_path / "kidney-ct" / str(version) / "saved_model.pb").write_bytes(b"")
    assert served_version(str(tmp_path), "kidney-ct").version == 5
    (tmp_path / "models.config").write_text(
        "model_config_list {\n  config {\n    name: 'kidney-ct'\n"
        f"    base_path: '{tmp_path / 'kidney-ct'}'\n    model_platform: 'tensorflow'\n"
        "    model_version_policy { specific { versions: 3 versions: 5 } }\n"
        "    version_labels { key: 'stable' value: 3 }\n"
        "    version_labels { key: 'canary' value: 5 }\n  }\n}\n"
    )
    served = served_version(str(tmp_path), "kidney-ct")
    assert served.version == 3
    assert served.reference_uri == str(
        tmp_path / "kidney-ct" / "3" / "assets.extra" / "drift_reference.parquet"
    )


def test_drift_command_exits_non_zero_exactly_when_asked_to_fail_on_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    reference, same = tables(11)
    _, shifted = tables(12, SHIFTS["contrast"])
    reference.to_parquet(tmp_path / "reference.parquet")
    same.to_parquet(tmp_path / "same.parquet")
    shifted.to_parquet(tmp_path / "shifted.parquet")
    from tumorflow.cli.main import main

    def drift(current: str, *extra: str) -> int:
        return main(
            [
                "drift",
                "--reference",
                str(tmp_path / "reference.parquet"),
                "--current",
                str(tmp_path / current),
                "--output",
                str(tmp_path / f"out-{current}"),
                *extra,
            ]
        )

    assert drift("shifted.parquet", "--fail-on-drift") == 1
    printed = capsys.readouterr().out
    assert "drift: DETECTED" in printed
    assert "intensity_std" in printed
    assert str(tmp_path / "out-shifted.parquet" / "report.html") in printed
    assert drift("shifted.parquet") == 0
    assert drift("same.parquet", "--fail-on-drift") == 0
    assert "drift: not detected" in capsys.readouterr().out
    assert drift("same.parquet", "--since", "yesterday") == 2
    assert "not an ISO-8601 time" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_report_over_50000_logged_requests_takes_under_a_minute(tmp_path: Path):
    reference, current = tables(21, SHIFTS["noise"])
    rng = np.random.default_rng(21)
    now = datetime.now(UTC)
    for part in range(25):
        rows = current.sample(n=2000, replace=True, random_state=part).reset_index(drop=True)
        rows[list(IMAGE_FEATURES)] += rng.normal(0, 0.01, rows[list(IMAGE_FEATURES)].shape)
        rows["timestamp"] = now - timedelta(minutes=part)
        rows["model_name"] = "kidney-ct"
        _write_log(tmp_path / "log", rows, now.date().isoformat(), f"{part:03d}")
    big_reference = reference.sample(n=50_000, replace=True, random_state=0)
    started = time.perf_counter()
    logged = load_table(tmp_path / "log", (now - timedelta(hours=24), now + timedelta(minutes=1)))
    verdict = drift_report(big_reference, logged, tmp_path / "report", DRIFT_SHARE)
    elapsed = time.perf_counter() - started
    assert len(logged) == 50_000
    assert verdict.drift_detected
    assert elapsed < 60, f"{elapsed:.1f} s"


def _split_with_train(folder: Path, images: list[np.ndarray]) -> Path:
    from tumorflow.components.data.tfrecords import MANIFEST_JSON, Record, write_shards

    records = [
        Record(encoded=png(image), label=i % 2, path=f"{i}.png", group=str(i))
        for i, image in enumerate(images)
    ]
    shards = write_shards(records, folder, "train", shard_size=1000)
    manifest = {
        "classes": ["normal", "tumor"],
        "splits": {"train": {"count": len(records), "shards": shards}},
    }
    (folder / MANIFEST_JSON).write_text(json.dumps(manifest))
    return folder


@pytest.mark.service
def test_pipeline_drift_step_compares_new_data_with_the_served_reference_and_logs_to_mlflow(
    tmp_path: Path, mlflow_server: str
):
    import mlflow

    from tumorflow.components.monitoring.drift_report import drift_against_served_model
    from tumorflow.components.monitoring.features import build_reference

    rng = np.random.default_rng(31)
    old = _split_with_train(tmp_path / "old", ct_slices(rng, 120))
    new = _split_with_train(
        tmp_path / "new", [SHIFTS["noise"](im, rng) for im in ct_slices(rng, 120)]
    )
    base = tmp_path / "models"
    build_reference(old, None, base / "kidney-ct" / "1" / "assets.extra")
    (base / "kidney-ct" / "1" / "saved_model.pb").write_bytes(b"")

    first = drift_against_served_model(
        new,
        str(tmp_path / "nothing-served"),
        "kidney-ct",
        tmp_path / "first",
        drift_share=0.3,
        html_path=tmp_path / "first.html",
    )
    assert not first.drift_detected and "no deployed model reference" in first.message
    assert "no deployed model reference" in (tmp_path / "first.html").read_text()

    verdict = drift_against_served_model(
        new,
        str(base),
        "kidney-ct",
        tmp_path / "out",
        drift_share=0.3,
        html_path=tmp_path / "ui" / "report.html",
        tracking_uri=mlflow_server,
        experiment="drift-test",
    )
    assert verdict.drift_detected and "sharpness" in verdict.drifted_columns
    assert (tmp_path / "ui" / "report.html").read_text() == (
        tmp_path / "out" / "report.html"
    ).read_text()
    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["drift-test"], output_format="list")
    assert len(runs) == 1
    assert runs[0].data.metrics["drift.detected"] == 1.0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "drift")}
    assert {"drift/report.html", "drift/verdict.json", "drift/report.json"} <= artifacts


@pytest.mark.e2e
def test_drift_command_with_a_model_compares_embeddings_and_predictions(
    tmp_path: Path, make_model_dir, capsys: pytest.CaptureFixture
):
    from tumorflow.cli.main import main

    rng = np.random.default_rng(41)
    for name, shift in (("reference", None), ("current", SHIFTS["brightness"])):
        folder = tmp_path / name
        folder.mkdir()
        for index, image in enumerate(ct_slices(rng, 60)):
            (folder / f"{index}.png").write_bytes(png(shift(image, rng) if shift else image))
    code = main(
        [
            "drift",
            "--reference",
            str(tmp_path / "reference"),
            "--current",
            str(tmp_path / "current"),
            "--model",
            str(make_model_dir(image_size=(32, 32))),
            "--output",
            str(tmp_path / "out"),
            "--fail-on-drift",
        ]
    )
    assert code == 1
    verdict = json.loads((tmp_path / "out" / "verdict.json").read_text())
    columns = {c["column"] for c in verdict["columns"]}
    assert {"embedding_pc1", "embedding_pc2", "embedding_pc3"} <= columns
    assert {c["column"] for c in verdict["prediction_drift"]} == {"predicted_class", "confidence"}
    assert "prediction drift on predicted_class" in capsys.readouterr().out


def test_requests_flagged_out_of_distribution_are_counted_as_their_own_signal(tmp_path: Path):
    reference, current = tables(4)
    current["in_distribution"] = [index % 4 != 0 for index in range(len(current))]
    current.loc[current.index[:2], "in_distribution"] = None
    verdict = drift_report(reference, current, tmp_path, DRIFT_SHARE)
    flagged = sum(1 for index in range(2, len(current)) if index % 4 == 0)
    assert (verdict.ood_flagged_rows, verdict.ood_checked_rows) == (flagged, len(current) - 2)
    assert "in_distribution" not in [c.column for c in verdict.columns]
    assert f"flagged out of distribution: {flagged} of {len(current) - 2}" in verdict.summary()
    saved = json.loads((tmp_path / "verdict.json").read_text())
    assert saved["ood_flagged_rows"] == flagged
    no_flags = drift_report(reference, tables(4)[1], tmp_path / "plain", DRIFT_SHARE)
    assert no_flags.ood_checked_rows is None and "out of distribution" not in no_flags.summary()
