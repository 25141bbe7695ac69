"""The prediction's Comprehensive SR: valid by dciodvfy, readable by dcmtk, stored by Orthanc."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from dicom_fixtures import ct_phantom, write_dicom
from pacs import OrthancServer

from tumorflow.components.data.dicom_sr import (
    DISCLAIMER,
    Prediction,
    prediction_report,
    report_bytes,
)
from tumorflow.components.data.dicomweb import DicomWebClient

PROBABILITIES = {"cyst": 0.031, "normal": 0.102, "stone": 0.047, "tumor": 0.82}
PREDICTION = Prediction(
    predicted_class="tumor",
    probabilities=PROBABILITIES,
    model_name="kidney-ct",
    served_version="7",
    serving_digest="sha256:" + "3f" * 32,
    time=datetime(2026, 12, 3, 9, 15, 42, tzinfo=UTC),
)


def source_instance(tmp_path: Path) -> pydicom.Dataset:
    path = write_dicom(tmp_path / "source.dcm", ct_phantom(220.0, size=64, seed=3))
    dataset = pydicom.dcmread(path)
    dataset.StudyDate, dataset.StudyTime, dataset.StudyID = "20261201", "101500", "S1"
    return dataset


def write_report(tmp_path: Path, source: pydicom.Dataset, prediction: Prediction) -> Path:
    path = tmp_path / "report.dcm"
    path.write_bytes(report_bytes(prediction_report(source, prediction)))
    return path


def needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install dcmtk dicom3tools)")
    return path


def test_the_report_is_a_valid_comprehensive_sr(tmp_path: Path) -> None:
    report = write_report(tmp_path, source_instance(tmp_path), PREDICTION)
    result = subprocess.run(
        [needs("dciodvfy"), str(report)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert "ComprehensiveSR" in output
    assert not [line for line in output.splitlines() if line.startswith("Error")], output


def test_dcmtk_reads_back_the_class_probabilities_model_and_disclaimer(tmp_path: Path) -> None:
    source = source_instance(tmp_path)
    report = write_report(tmp_path, source, PREDICTION)
    dump = subprocess.run(
        [needs("dsrdump"), "+Pl", str(report)], capture_output=True, text=True, timeout=60
    ).stdout
    assert '"Predicted class")="tumor"' in dump
    shown = dict(re.findall(r'"Probability of (\w+)"\)="([0-9.]+)"', dump))
    assert {label: float(value) for label, value in shown.items()} == PROBABILITIES
    assert '"Model name")="kidney-ct"' in dump
    assert '"Served model version")="7"' in dump
    assert PREDICTION.serving_digest in dump
    assert DISCLAIMER in dump
    assert "IMAGE" in dump and "CT image" in dump
    parsed = pydicom.dcmread(report)
    assert parsed.StudyInstanceUID == source.StudyInstanceUID
    assert parsed.SeriesInstanceUID != source.SeriesInstanceUID
    reference = parsed.ContentSequence[-1].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_one_report_per_source_instance_and_served_version(tmp_path: Path) -> None:
    source = source_instance(tmp_path)
    first = prediction_report(source, PREDICTION)
    again = prediction_report(source, PREDICTION)
    newer = prediction_report(
        source,
        Prediction(**{**PREDICTION.__dict__, "served_version": "8", "serving_digest": "sha256:9"}),
    )
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert newer.SeriesInstanceUID != first.SeriesInstanceUID
    with pytest.raises(ValueError, match="not one of"):
        prediction_report(source, Prediction(**{**PREDICTION.__dict__, "predicted_class": "x"}))


def test_stow_rs_stores_the_report_in_the_source_study(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    source = source_instance(tmp_path)
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    orthanc.store(buffer.getvalue())
    authorization = (
        "Basic " + base64.b64encode(f"{orthanc.username}:{orthanc.password}".encode()).decode()
    )
    client = DicomWebClient(orthanc.dicomweb, authorization, backoff=0.01)
    report = prediction_report(source, PREDICTION)
    answer = client.store([report_bytes(report)])
    stored_now = answer["00081199"]["Value"]  # ReferencedSOPSequence
    assert [item["00081155"]["Value"][0] for item in stored_now] == [report.SOPInstanceUID]
    assert not answer.get("00081198", {}).get("Value")  # FailedSOPSequence
    client.store([report_bytes(report)])
    series = list(client.search(f"studies/{source.StudyInstanceUID}/series", {}, 10))
    modalities = sorted(item["00080060"]["Value"][0] for item in series)
    assert modalities == ["CT", "SR"]
    stored = list(
        client.search(f"studies/{source.StudyInstanceUID}/instances", {"Modality": "SR"}, 10)
    )
    assert [item["00080018"]["Value"][0] for item in stored] == [report.SOPInstanceUID]


def test_the_overlay_capture_is_a_valid_secondary_capture_with_the_note_burned_in(
    tmp_path: Path,
) -> None:
    import numpy as np

    from tumorflow.components.data.dicom import decode_slices, png_bytes
    from tumorflow.components.data.dicom_sr import overlay_capture
    from tumorflow.components.evaluation.overlays import overlay_heatmap
    from tumorflow.core.config import DicomConfig

    source = source_instance(tmp_path)
    image = png_bytes(decode_slices(source, DicomConfig())[0])
    overlay = overlay_heatmap(image, np.linspace(0, 1, 64).reshape(8, 8))
    capture = overlay_capture(source, PREDICTION, overlay)
    path = tmp_path / "capture.dcm"
    path.write_bytes(report_bytes(capture))
    result = subprocess.run(
        [needs("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert "SCImage" in output
    assert not [line for line in output.splitlines() if line.startswith("Error")], output

    parsed = pydicom.dcmread(path)
    assert parsed.BurnedInAnnotation == "YES" and parsed.Modality == "OT"
    assert parsed.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert parsed.StudyInstanceUID == source.StudyInstanceUID
    report = prediction_report(source, PREDICTION)
    assert parsed.SeriesInstanceUID not in (report.SeriesInstanceUID, source.SeriesInstanceUID)
    assert overlay_capture(source, PREDICTION, overlay).SOPInstanceUID == parsed.SOPInstanceUID
    # enlarged to be legible; the bottom band holds white text on black, the rest the overlay
    pixels = parsed.pixel_array
    assert min(pixels.shape[:2]) >= 256
    band = pixels[-16:]
    assert (band == 0).all(axis=-1).mean() > 0.5
    assert (band > 200).all(axis=-1).sum() > 50
    assert not (pixels[: pixels.shape[0] // 2] > 200).all(axis=-1).any()
