"""Small DICOM files written with pydicom, with fake PHI in their tags: CT, MR, MONOCHROME1,
multi-frame (plain and Enhanced CT/MR with per-frame functional groups), compressed, corrupt. Importable as `dicom_fixtures` from every test module."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Fake PHI: none of these strings may appear in anything tumorflow writes after ingest.
FAKE_PHI = {
    "PatientName": "Zyxwvut^Qorbelle",
    "PatientID": "MRN-88213377",
    "PatientBirthDate": "19410923",
    "AccessionNumber": "ACC-55012984",
    "InstitutionName": "Saint Quillfeather Hospital",
}


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    photometric: str = "MONOCHROME2",
    patient_id: str = FAKE_PHI["PatientID"],
    patient_name: str = FAKE_PHI["PatientName"],
    institution: str = FAKE_PHI["InstitutionName"],
    study_uid: str | None = None,
    manufacturer: str = "ACME Medical",
    model: str = "Scanatron 64",
    compress: bool = False,
    frame_rescale: list[tuple[float, float]] | None = None,
    shared_rescale: tuple[float, float] | None = None,
    frame_windows: list[tuple[float, float]] | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write `pixels` ([rows, cols] or [frames, rows, cols], uint16) as a DICOM file.

    With `frame_rescale` (slope, intercept per frame), `shared_rescale` or `frame_windows`
    (center, width per frame) it is an Enhanced CT/MR object whose rescale and windows live in
    its per-frame and shared functional groups, not in top-level tags; `window` is a top-level
    WindowCenter/WindowWidth.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import (
        CTImageStorage,
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        RLELossless,
        generate_uid,
    )

    pixels = np.asarray(pixels, dtype=np.uint16)
    enhanced = bool(frame_rescale or shared_rescale or frame_windows)
    meta = FileMetaDataset()
    if enhanced:
        meta.MediaStorageSOPClassUID = (
            EnhancedCTImageStorage if modality == "CT" else EnhancedMRImageStorage
        )
    else:
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = FAKE_PHI["PatientBirthDate"]
    ds.AccessionNumber = FAKE_PHI["AccessionNumber"]
    ds.InstitutionName = institution
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "CT" and not enhanced:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if enhanced:

        def transform(rescale: tuple[float, float]) -> Dataset:
            item = Dataset()
            item.RescaleSlope, item.RescaleIntercept = rescale
            item.RescaleType = "HU" if modality == "CT" else "US"
            return item

        shared = Dataset()
        if shared_rescale is not None:
            shared.PixelValueTransformationSequence = Sequence([transform(shared_rescale)])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for index in range(len(pixels) if pixels.ndim == 3 else 1):
            group = Dataset()
            if frame_rescale is not None:
                group.PixelValueTransformationSequence = Sequence([transform(frame_rescale[index])])
            if frame_windows is not None:
                voi = Dataset()
                voi.WindowCenter, voi.WindowWidth = frame_windows[index]
                group.FrameVOILUTSequence = Sequence([voi])
            frames.append(group)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = pixels.tobytes()
    if compress:
        ds.compress(RLELossless)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_phantom(level_hu: float, size: int = 48, seed: int = 0) -> np.ndarray:
    """Stored values (intercept -1024) of a slice: a disc of `level_hu` HU in soft tissue; the
    disc and the texture around it differ with `seed` (one patient from another)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size / 3, 2 * size / 3, 2)
    radius = rng.uniform(size / 8, size / 4)
    disc = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
    tissue = 40.0 + 30 * np.sin(x / rng.uniform(3, 9)) * np.cos(y / rng.uniform(3, 9))
    hu = np.where(disc, level_hu, tissue) + rng.normal(0, 5, (size, size))
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)
