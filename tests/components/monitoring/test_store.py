"""The request-log store: rows of the store's schema from any request a model served, part files
inside the store root, the windowed reader, and messages that name the request or file."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorflow.components.monitoring.store import LoggedRequest, PartWriter, read_request_log

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


def _writer(root: Path) -> tuple[PartWriter, Counter]:
    counts: Counter = Counter()
    return PartWriter(str(root), None, lambda key, n: counts.update({key: n})), counts


def _request(inputs, outputs, model_name: str = "other", **extra) -> LoggedRequest:
    return LoggedRequest(
        timestamp=NOW,
        model_name=model_name,
        model_version=1,
        inputs=inputs,
        outputs=outputs,
        **extra,
    )


def test_pixel_tensors_of_third_party_models_are_stored_and_other_inputs_skipped(
    tmp_path: Path, level_png, predict_outputs, read_store
):
    parts, counts = _writer(tmp_path)
    pixels = np.full((2, 24, 24, 3), 0.5, dtype=np.float32)
    parts.add(
        _request(
            {"input_1": pixels},
            {"probabilities": np.array([[0.3, 0.7], [0.9, 0.1]], dtype=np.float32)},
        )
    )
    parts.add(_request({"tabular": np.zeros((2, 5), dtype=np.float32)}, {"y": np.zeros((2, 1))}))
    parts.add(
        _request({"image_bytes": np.array([b"not an image"], dtype=object)}, predict_outputs(1))
    )
    parts.flush()
    table = read_store(tmp_path)
    assert len(table) == 2
    assert table["intensity_mean"].tolist() == pytest.approx([127.5, 127.5], abs=1)
    assert table["predicted_class"].tolist() == ["1", "0"]
    assert table["confidence"].tolist() == pytest.approx([0.7, 0.9])
    assert counts["skipped"] == 2 and counts["rows"] == 2 and counts["files"] == 1


def test_a_hostile_model_name_stays_inside_the_store_root(tmp_path: Path, level_png):
    parts, _ = _writer(tmp_path / "log")
    parts.add(
        _request(
            {"image_bytes": np.array([level_png(40)], dtype=object)},
            None,
            model_name="../../escape",
        )
    )
    parts.flush()
    files = list(tmp_path.rglob("part-*.parquet"))
    assert len(files) == 1
    assert (tmp_path / "log") in files[0].parents


def test_an_unreadable_image_is_named_by_its_request_or_file_not_a_buffer(
    tmp_path: Path, level_png, caplog: pytest.LogCaptureFixture
):
    parts, counts = _writer(tmp_path)
    broken = np.array([b"GIF89a broken"], dtype=object)
    served = _request({"image_bytes": broken}, None)
    from_file = _request({"image_bytes": broken}, None, source="incoming/scan-7.png")
    batch = _request({"image_bytes": np.array([level_png(50), b"junk"], dtype=object)}, None)
    with caplog.at_level(logging.DEBUG, logger="tumorflow.components.monitoring.store"):
        for request in (served, from_file, batch):
            parts.add(request)
    assert f"skipping request {served.request_id}: cannot decode image" in caplog.text
    assert "skipping incoming/scan-7.png: cannot decode image (13 bytes)" in caplog.text
    assert f"skipping image 2 of request {batch.request_id}" in caplog.text
    assert "BytesIO" not in caplog.text
    assert counts["skipped"] == 3 and parts.buffered == 1


def _write_part(root: Path, day: str, rows: pd.DataFrame | None, name: str = "a") -> Path:
    folder = root / "kidney-ct" / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{name}.parquet"
    if rows is None:
        path.write_bytes(b"not parquet")
    else:
        rows.to_parquet(path, index=False)
    return path


def test_the_reader_opens_only_the_partitions_of_its_window(tmp_path: Path):
    recent = pd.DataFrame(
        {
            "timestamp": [NOW - timedelta(minutes=m) for m in (1, 30, 90)],
            "model_name": ["kidney-ct", "kidney-ct", "other"],
            "intensity_mean": [1.0, 2.0, 3.0],
        }
    )
    _write_part(tmp_path, "2026-11-22", recent)
    # a damaged part file of an older day is never opened by a reader of today's window
    _write_part(tmp_path, "2026-11-19", None)
    window = (NOW - timedelta(hours=1), NOW)
    assert read_request_log(tmp_path, window)["intensity_mean"].tolist() == [1.0, 2.0]
    assert read_request_log(tmp_path, window, model_name="other").empty
    day = (NOW - timedelta(hours=2), NOW)
    assert read_request_log(tmp_path, day, model_name="other")["intensity_mean"].tolist() == [3.0]
    assert read_request_log(tmp_path / "kidney-ct", window)["intensity_mean"].tolist() == [1.0, 2.0]
    nothing = read_request_log(tmp_path, (NOW - timedelta(days=9), NOW - timedelta(days=8)))
    assert nothing.empty and "intensity_p50" in nothing.columns


def test_the_ood_score_and_flag_are_stored_when_the_model_answers_them(
    tmp_path: Path, level_png, predict_outputs, read_store
):
    parts, _ = _writer(tmp_path)
    images = np.array([level_png(40), level_png(200)], dtype=object)
    flagged = {
        **predict_outputs(2),
        "ood_score": np.array([3.5, 812.0], dtype=np.float32),
        "in_distribution": np.array([True, False]),
    }
    parts.add(_request({"image_bytes": images}, flagged))
    parts.add(_request({"image_bytes": images[:1]}, predict_outputs(1)))
    parts.flush()
    table = read_store(tmp_path).sort_values("ood_score", na_position="last")
    assert table["ood_score"].tolist()[:2] == pytest.approx([3.5, 812.0])
    assert table["in_distribution"].tolist()[:2] == [True, False]
    # a model without a detector logs no flag: not counted as in distribution
    assert pd.isna(table["in_distribution"].tolist()[2])
