"""DICOM in: the one decode from a `.dcm` file (or a DICOM series folder's files) to 8-bit slices.

CT pixel data becomes Hounsfield units (RescaleSlope/Intercept, or per frame from the functional
groups of an Enhanced CT/MR object) shown through the window of `DicomConfig` (an abdomen window
by default; `window_source: file` takes the object's own, per-frame window instead); MR and other
modalities are scaled between robust percentiles of each slice; `MONOCHROME1` is inverted so that
dense is bright everywhere; a multi-frame object becomes one slice per frame. Compressed transfer
syntaxes are decoded by pydicom's pixel-data handlers (pylibjpeg, openjpeg, RLE).

Ingest (the download step) writes each slice as an 8-bit PNG under a pseudonymous path and its
metadata to `slices.csv` (docs/artifacts.md): salted pseudonymous patient/study/site ids, the
scanner manufacturer and model, the modality and the source folder; never a name, patient id,
birth date, accession number, institution name or original file name. `tumorflow predict` and drift
(folders of recent scans) use the same decode to turn a DICOM file into the PNG bytes the served
model takes (`encoded_images`).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorflow.components.data.pseudonyms import pseudonym, resolve_salt
from tumorflow.core.config import DicomConfig

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# What an undecodable DICOM becomes in the raw dataset: a note holding the reason (its tags may
# hold PHI, so the file itself is not copied); validation quarantines it with that reason.
REJECTED_SUFFIX = ".dcm-rejected"
SLICES_CSV = "slices.csv"
SLICE_COLUMNS = (
    "path",
    "patient",
    "study",
    "site",
    "manufacturer",
    "model",
    "modality",
    "source_folder",
)
# Columns of slices.csv that are groups, not evaluation slices; every other one is a slice.
GROUP_COLUMNS = ("path", "patient", "study")
_MAGIC_OFFSET = 128


class DicomDecodeError(ValueError):
    """A DICOM file that cannot be turned into slices; the message is the quarantine reason."""


def looks_like_dicom(data: bytes) -> bool:
    """True for DICOM Part 10 bytes (the `DICM` marker after the 128-byte preamble)."""
    return data[_MAGIC_OFFSET : _MAGIC_OFFSET + 4] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    """A `.dcm`/`.dicom` file, or an extension-less file with the DICOM marker (series folders)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as handle:
            return looks_like_dicom(handle.read(_MAGIC_OFFSET + 4))
    except OSError:
        return False


def read_dataset(source: Path | bytes):
    """The parsed pydicom Dataset of a file or of bytes; DicomDecodeError when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        return pydicom.dcmread(stream, force=False)
    except InvalidDicomError:
        raise DicomDecodeError("not a DICOM file (no DICM marker)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DicomDecodeError(f"corrupt DICOM file ({str(exc)[:120]})") from None


def _pixels(dataset) -> np.ndarray:
    if "PixelData" not in dataset:
        raise DicomDecodeError("DICOM object holds no pixel data (not an image)")
    syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
    try:
        return np.asarray(dataset.pixel_array)
    except (NotImplementedError, RuntimeError) as exc:
        raise DicomDecodeError(
            f"DICOM pixel data in transfer syntax {syntax} cannot be decoded ({str(exc)[:120]})"
        ) from None
    except (ValueError, AttributeError, KeyError, TypeError, OSError, EOFError) as exc:
        raise DicomDecodeError(f"corrupt DICOM pixel data ({str(exc)[:120]})") from None


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) / (high - low) * 255.0
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def _functional_group(dataset, frame: int, sequence: str):
    """The item of functional group `sequence` that applies to `frame` of an enhanced multi-frame
    object: from its per-frame group, else from the shared one; None when neither has it."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    shared = dataset.get("SharedFunctionalGroupsSequence") or []
    for groups in (per_frame[frame] if frame < len(per_frame) else None, *shared[:1]):
        if groups is not None and groups.get(sequence):
            return groups.get(sequence)[0]
    return None


def _is_colour(dataset) -> bool:
    return int(dataset.get("SamplesPerPixel", 1) or 1) > 1


def _frames(dataset) -> np.ndarray:
    """The stored pixel values as [frames, rows, cols] (colour averaged)."""
    pixels = _pixels(dataset)
    if int(dataset.get("NumberOfFrames", 1) or 1) == 1:
        pixels = pixels[None]
    if _is_colour(dataset):
        pixels = pixels.astype(np.float64).mean(axis=-1)
    if pixels.ndim != 3 or min(pixels.shape[1:]) == 0:
        raise DicomDecodeError(f"DICOM pixel data has an unusable shape {pixels.shape}")
    return pixels


def modality_values(dataset) -> list[np.ndarray]:
    """The modality values of each frame (float64): CT in Hounsfield units. Enhanced multi-frame
    objects (Enhanced CT/MR) rescale each frame by the slope and intercept of its functional
    groups (PixelValueTransformationSequence); other objects by RescaleSlope/Intercept or their
    Modality LUT. Colour is left as stored."""
    from pydicom.pixels import apply_modality_lut

    colour = _is_colour(dataset)
    values = []
    for index, frame in enumerate(_frames(dataset)):
        transform = _functional_group(dataset, index, "PixelValueTransformationSequence")
        if colour:
            values.append(frame.astype(np.float64))
        elif transform is not None and "RescaleSlope" in transform:
            slope, intercept = float(transform.RescaleSlope), float(transform.RescaleIntercept)
            values.append(frame.astype(np.float64) * slope + intercept)
        else:
            values.append(np.asarray(apply_modality_lut(frame, dataset), dtype=np.float64))
    return values


def _first(value) -> float:
    """The first of a possibly multi-valued number (WindowCenter may hold several windows)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, MultiValue) else value)


def _window(dataset, frame: int, config: DicomConfig) -> tuple[float, float] | None:
    """(low, high) modality values shown black to white for one frame; None: percentiles."""
    if config.window_source == "file":
        voi = _functional_group(dataset, frame, "FrameVOILUTSequence")
        for source in (voi, dataset):
            if source is not None and "WindowCenter" in source and "WindowWidth" in source:
                center, width = _first(source.WindowCenter), _first(source.WindowWidth)
                if width > 0:
                    return center - width / 2, center + width / 2
    if str(dataset.get("Modality", "")).upper() == "CT":
        half = config.window_width / 2
        return config.window_center - half, config.window_center + half
    return None


def decode_slices(dataset, config: DicomConfig) -> list[np.ndarray]:
    """The 8-bit grey slices [rows, cols] of a parsed DICOM object (see the module docstring)."""
    colour = _is_colour(dataset)
    slices = []
    for index, values in enumerate(modality_values(dataset)):
        window = None if colour else _window(dataset, index, config)
        if window is None:
            low, high = np.percentile(values, list(config.mr_percentiles))
            if high <= low:
                low, high = float(values.min()), float(values.max())
            window = (low, high)
        out = _to_uint8(values, *window)
        if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            out = 255 - out
        slices.append(out)
    return slices


def png_bytes(slice_: np.ndarray) -> bytes:
    """One 8-bit slice as PNG bytes (what the raw dataset stores and the served model takes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(slice_, mode="L").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def dicom_to_png(source: Path | bytes, config: DicomConfig) -> list[bytes]:
    """Every slice of a DICOM file (or bytes) as PNG bytes; DicomDecodeError with the reason."""
    return [png_bytes(s) for s in decode_slices(read_dataset(source), config)]


def encoded_images(name: str, data: bytes, config: DicomConfig) -> list[tuple[str, bytes]]:
    """What the served model takes for one file: its bytes, or for DICOM (the marker, or a
    `.dcm` name) the PNG of every slice, named `<name>#<frame>` when there are several.
    DicomDecodeError (a ValueError) with the reason for an undecodable DICOM file."""
    if not (looks_like_dicom(data) or name.lower().endswith(tuple(DICOM_SUFFIXES))):
        return [(name, data)]
    slices = dicom_to_png(data, config)
    if len(slices) == 1:
        return [(name, slices[0])]
    return [(f"{name}#{index}", png) for index, png in enumerate(slices)]


def _tag(dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "").strip()


@dataclass
class DicomIngest:
    """Turns DICOM files into pseudonymous PNG slices under a raw dataset's `files/` folder.

    `add` writes the slices of one file and returns their relative paths (or the `.dcm-rejected`
    note of an undecodable one); `records` are the slices.csv rows of the slices written.
    """

    config: DicomConfig
    files_dir: Path
    salt: str = ""
    records: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.salt = self.salt or resolve_salt(self.config)

    def _id(self, kind: str, value: str) -> str:
        return pseudonym(kind, value, self.salt)

    def add(self, source: Path, source_folder: str, original: str) -> list[str]:
        """Ingest the DICOM file `source` found in class folder `source_folder` (relative to
        the dataset root) at `original` (its path there, used only to derive an id)."""
        folder = source_folder.strip("/")
        try:
            dataset = read_dataset(source)
            slices = decode_slices(dataset, self.config)
        except DicomDecodeError as exc:
            relative = f"{folder}/{self._id('file', original)}{REJECTED_SUFFIX}"
            target = self.files_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"{exc}\n")
            logger.warning("DICOM %s not decodable: %s", relative, exc)
            return [relative]
        patient = self._id("patient", _tag(dataset, "PatientID")) or self._id(
            "patient", _tag(dataset, "StudyInstanceUID")
        )
        instance = self._id("image", _tag(dataset, "SOPInstanceUID") or original)
        info = {
            "patient": patient,
            "study": self._id("study", _tag(dataset, "StudyInstanceUID")),
            "site": self._id("site", _tag(dataset, "InstitutionName")),
            "manufacturer": _tag(dataset, "Manufacturer"),
            "model": _tag(dataset, "ManufacturerModelName"),
            "modality": _tag(dataset, "Modality").upper(),
            "source_folder": folder,
        }
        written = []
        for index, slice_ in enumerate(slices):
            relative = f"{folder}/{patient or 'patient-unknown'}/{instance}-{index:03d}.png"
            target = self.files_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(png_bytes(slice_))
            self.records.append({"path": relative, **info})
            written.append(relative)
        return written


def write_slice_table(records: list[dict[str, str]], path: Path) -> None:
    """slices.csv: one row per slice, the columns of `SLICE_COLUMNS` (then any others)."""
    extra = sorted({key for record in records for key in record} - set(SLICE_COLUMNS))
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, [*SLICE_COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(sorted(records, key=lambda record: record["path"]))


def read_slice_table(folder: Path) -> dict[str, dict[str, str]]:
    """path -> metadata of the slices.csv in `folder` ({} when there is none)."""
    path = Path(folder) / SLICES_CSV
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def rejection_reason(path: Path) -> str | None:
    """The quarantine reason of a `.dcm-rejected` note, None for any other file."""
    if not Path(path).name.endswith(REJECTED_SUFFIX):
        return None
    return f"DICOM not decodable: {Path(path).read_text().strip()}"
