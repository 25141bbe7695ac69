"""DICOM in: the one decode (CT windowing, MR percentiles, MONOCHROME1, multi-frame, compressed,
corrupt), and ingest that keeps patients together and writes no PHI."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import FAKE_PHI, ct_phantom, write_dicom
from PIL import Image

from tumorflow.components.data import dicom
from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.validate import validate_and_split
from tumorflow.core.config import DatasetConfig, DicomConfig, SplitConfig
from tumorflow.core.errors import ConfigError

CONFIG = DicomConfig(pseudonym_salt="test-salt")


def _decode(path: Path, config: DicomConfig = CONFIG) -> list[np.ndarray]:
    return dicom.decode_slices(dicom.read_dataset(path), config)


def test_ct_becomes_hounsfield_units_shown_through_the_configured_window(tmp_path: Path) -> None:
    # stored 1024 + HU; air (-1000 HU) and bone (+700 HU) fall outside an abdomen window 40/400
    stored = np.array([[24, 1024 + 40, 1024 + 190, 1724]] * 16, dtype=np.uint16)
    stored = np.repeat(stored, 4, axis=1)
    path = write_dicom(tmp_path / "ct.dcm", stored)
    (slice_,) = _decode(path)
    assert slice_.dtype == np.uint8
    assert slice_[0, 0] == 0 and slice_[0, -1] == 255
    assert slice_[0, 4] == pytest.approx(128, abs=1)
    # a narrower window around 40 HU saturates +190 HU that the abdomen window kept below white
    assert _decode(path)[0][0, 8] < 255
    narrow = _decode(path, DicomConfig(window_center=40, window_width=100))[0]
    assert narrow[0, 8] == 255


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    # the same HU stored with slope 2, intercept -2048 decodes to the same slice
    hu = ct_phantom(150).astype(np.int32) - 1024
    plain = write_dicom(tmp_path / "a.dcm", (hu + 1024).astype(np.uint16))
    scaled = write_dicom(
        tmp_path / "b.dcm", ((hu + 2048) // 2).astype(np.uint16), slope=2, intercept=-2048
    )
    assert np.abs(_decode(plain)[0].astype(int) - _decode(scaled)[0].astype(int)).max() <= 1


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = ct_phantom(300)
    normal = _decode(write_dicom(tmp_path / "m2.dcm", pixels, modality="MR"))[0]
    inverted = _decode(
        write_dicom(tmp_path / "m1.dcm", pixels, modality="MR", photometric="MONOCHROME1")
    )[0]
    np.testing.assert_array_equal(inverted, 255 - normal)


def test_mr_is_scaled_between_robust_percentiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(100, 200, (32, 32)).astype(np.uint16)
    pixels[0, 0] = 60000  # one hot pixel must not squash the rest to black
    (slice_,) = _decode(write_dicom(tmp_path / "mr.dcm", pixels, modality="MR"))
    assert slice_[1:, 1:].mean() == pytest.approx(127, abs=15)
    assert slice_[1:, 1:].std() > 50


def test_a_multi_frame_object_becomes_one_slice_per_frame(tmp_path: Path) -> None:
    frames = np.stack([ct_phantom(level, seed=1) for level in (-100, 60, 200)])
    slices = _decode(write_dicom(tmp_path / "multi.dcm", frames))
    assert len(slices) == 3
    assert slices[0].mean() < slices[1].mean() < slices[2].mean()


def test_compressed_transfer_syntaxes_decode_like_the_uncompressed_file(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    pixels = ct_phantom(120)
    rle = _decode(write_dicom(tmp_path / "rle.dcm", pixels, compress=True))[0]
    np.testing.assert_array_equal(rle, _decode(write_dicom(tmp_path / "raw.dcm", pixels))[0])
    reference = _decode(Path(get_testdata_file("MR_small.dcm")))[0]
    jpeg2000 = _decode(Path(get_testdata_file("MR_small_jp2klossless.dcm")))[0]
    np.testing.assert_array_equal(jpeg2000, reference)
    (ct,) = _decode(Path(get_testdata_file("CT_small.dcm")))
    assert ct.shape == (128, 128) and ct.std() > 10


def test_what_cannot_be_decoded_gets_a_clear_reason(tmp_path: Path) -> None:
    not_dicom = tmp_path / "note.dcm"
    not_dicom.write_bytes(b"just some text, not an image")
    with pytest.raises(dicom.DicomDecodeError, match="not a DICOM file"):
        _decode(not_dicom)
    truncated = write_dicom(tmp_path / "cut.dcm", ct_phantom(50))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    with pytest.raises(dicom.DicomDecodeError, match="pixel data"):
        _decode(truncated)


def test_dicom_to_png_gives_the_bytes_the_served_model_takes(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ct.dcm", ct_phantom(200))
    (png,) = dicom.dicom_to_png(path.read_bytes(), CONFIG)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), _decode(path)[0])


def test_ingest_without_a_salt_is_refused_with_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pseudonym_salt"):
        dicom.DicomIngest(DicomConfig(), tmp_path)


def _hospital_folder(root: Path, patients: int = 12, slices: int = 3) -> Path:
    """Two classes of CT series, one folder per patient named after the patient (PHI)."""
    for label, level in (("normal", 40.0), ("tumor", 260.0)):
        for p in range(patients):
            name = f"{FAKE_PHI['PatientName'].replace('^', '_')}_{label}_{p}"
            uid = f"1.2.826.0.1.3680043.8.498.{p + 1}.{level:.0f}"
            for s in range(slices):
                write_dicom(
                    root / label / name / f"IM{s:04d}",
                    ct_phantom(level, seed=p * 100 + s),
                    patient_id=f"{FAKE_PHI['PatientID']}-{label}-{p}",
                    study_uid=uid,
                    institution=f"{FAKE_PHI['InstitutionName']} {p % 2}",
                    manufacturer=("ACME", "Globex")[p % 2],
                )
    (root / "tumor" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return root


def test_ingest_keeps_patients_together_and_writes_no_phi(tmp_path: Path) -> None:
    source = _hospital_folder(tmp_path / "src")
    dataset = DatasetConfig(source=str(source), dicom=CONFIG)
    raw = download_dataset(str(source), tmp_path / "raw", dataset)
    assert len(raw.rows) == 2 * 12 * 3 + 1
    split = validate_and_split(
        tmp_path / "raw",
        tmp_path / "split",
        SplitConfig(phash_max_distance=0, min_test_per_class=1),
    )
    assert [reason for _, reason in split.quarantined] == [
        next(r for _, r in split.quarantined if r.startswith("DICOM not decodable"))
    ]
    # every slice looks different: only the patient ids keep a patient's slices together
    assert split.grouping["patients"] == split.grouping["groups"] == 24
    assert "Patients (DICOM PatientID or the metadata table): 24" in split.report_markdown()
    with (tmp_path / "split" / "split_manifest.csv").open() as handle:
        manifest = list(csv.DictReader(handle))
    slices = dicom.read_slice_table(tmp_path / "split")
    assert len(manifest) == len(slices) == 72
    split_of_patient: dict[str, set[str]] = {}
    for row in manifest:
        split_of_patient.setdefault(slices[row["path"]]["patient"], set()).add(row["split"])
    assert len(split_of_patient) == 24
    assert all(len(splits) == 1 for splits in split_of_patient.values())
    assert {s["manufacturer"] for s in slices.values()} == {"ACME", "Globex"}
    assert len({s["site"] for s in slices.values()}) == 2
    written = [p for p in (tmp_path / "raw").rglob("*")] + list((tmp_path / "split").rglob("*"))
    needles = [*FAKE_PHI.values(), FAKE_PHI["PatientName"].replace("^", "_")]
    for path in written:
        assert not any(n in str(path.relative_to(tmp_path)) for n in needles), path
        if path.is_file():
            data = path.read_bytes()
            found = [n for n in needles if n.encode() in data]
            assert not found, (path, found)


def test_pseudonyms_are_stable_for_one_salt_and_differ_across_salts(tmp_path: Path) -> None:
    source = _hospital_folder(tmp_path / "src", patients=2, slices=1)
    tables = []
    for run, salt in enumerate(("one", "one", "two")):
        dataset = DatasetConfig(dicom=DicomConfig(pseudonym_salt=salt))
        download_dataset(str(source), tmp_path / f"raw{run}", dataset)
        tables.append(
            sorted(r["patient"] for r in dicom.read_slice_table(tmp_path / f"raw{run}").values())
        )
    assert tables[0] == tables[1]
    assert set(tables[0]).isdisjoint(tables[2])


def _hounsfield_file(path: Path, hu: np.ndarray) -> Path:
    """A plain single-frame CT holding these HU (intercept -1024): the reference decode."""
    return write_dicom(path, np.clip(np.rint(hu) + 1024, 0, 65535).astype(np.uint16))


ENHANCED_RESCALE = [(1.0, -1024.0), (2.0, -1948.0), (0.5, -600.0)]


def test_enhanced_ct_frames_are_rescaled_by_their_own_slope_and_intercept(tmp_path: Path) -> None:
    stored = ct_phantom(150, seed=4)
    frames = np.stack([stored] * 3)
    path = write_dicom(tmp_path / "enhanced.dcm", frames, frame_rescale=ENHANCED_RESCALE)
    dataset = dicom.read_dataset(path)
    assert "RescaleSlope" not in dataset  # only the functional groups say how to rescale
    hounsfield = dicom.modality_values(dataset)
    slices = dicom.decode_slices(dataset, CONFIG)
    assert len(hounsfield) == len(slices) == 3
    for index, (slope, intercept) in enumerate(ENHANCED_RESCALE):
        expected = stored.astype(np.float64) * slope + intercept
        np.testing.assert_allclose(hounsfield[index], expected)
        (reference,) = _decode(_hounsfield_file(tmp_path / f"plain-{index}.dcm", expected))
        assert np.abs(slices[index].astype(int) - reference.astype(int)).max() <= 1
    # the same stored values mean different tissue in each frame: about -60, 60 and 220 HU
    assert hounsfield[2].mean() + 100 < hounsfield[0].mean() < hounsfield[1].mean() - 100
    assert slices[2].mean() < slices[0].mean() < slices[1].mean()


def test_enhanced_ct_frames_without_their_own_rescale_take_the_shared_one(tmp_path: Path) -> None:
    stored = ct_phantom(80, seed=5)
    frames = np.stack([stored, stored])
    shared_only = write_dicom(tmp_path / "shared.dcm", frames, shared_rescale=(2.0, -2000.0))
    both = write_dicom(
        tmp_path / "both.dcm",
        frames,
        shared_rescale=(2.0, -2000.0),
        frame_rescale=[(1.0, -1024.0), (1.0, -1024.0)],
    )
    for hounsfield in dicom.modality_values(dicom.read_dataset(shared_only)):
        np.testing.assert_allclose(hounsfield, stored * 2.0 - 2000.0)
    for hounsfield in dicom.modality_values(dicom.read_dataset(both)):
        np.testing.assert_allclose(hounsfield, stored - 1024.0)


def test_per_frame_windows_are_used_when_the_config_asks_for_the_files_window(
    tmp_path: Path,
) -> None:
    stored = ct_phantom(150, seed=6)
    windows = [(40.0, 400.0), (40.0, 100.0), (300.0, 1500.0)]
    path = write_dicom(
        tmp_path / "windows.dcm",
        np.stack([stored] * 3),
        frame_rescale=[(1.0, -1024.0)] * 3,
        frame_windows=windows,
    )
    preset = _decode(path)
    assert all(np.array_equal(preset[0], other) for other in preset[1:])
    from_file = _decode(path, DicomConfig(pseudonym_salt="s", window_source="file"))
    plain = _hounsfield_file(tmp_path / "plain.dcm", stored.astype(np.float64) - 1024)
    for (center, width), slice_ in zip(windows, from_file, strict=True):
        (reference,) = _decode(plain, DicomConfig(window_center=center, window_width=width))
        np.testing.assert_array_equal(slice_, reference)
    assert len({slice_.tobytes() for slice_ in from_file}) == 3


def test_a_single_frame_files_own_window_is_used_when_asked_and_the_preset_without_one(
    tmp_path: Path,
) -> None:
    stored = ct_phantom(150, seed=7)
    windowed = write_dicom(tmp_path / "w.dcm", stored, window=(40.0, 100.0))
    bare = write_dicom(tmp_path / "bare.dcm", stored)
    from_file = DicomConfig(window_source="file")
    narrow = DicomConfig(window_center=40, window_width=100)
    np.testing.assert_array_equal(_decode(windowed, from_file)[0], _decode(bare, narrow)[0])
    np.testing.assert_array_equal(_decode(bare, from_file)[0], _decode(bare)[0])
