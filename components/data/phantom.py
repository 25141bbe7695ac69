"""A deterministic synthetic CT-like kidney dataset, laid out exactly like the Kaggle kidney CT set.

Each synthetic "patient" is an abdominal axial slice (body ellipse with fat and soft tissue,
spine, aorta, bowel gas, two contrast-enhanced kidneys) rendered in Hounsfield-like units, windowed
to 8-bit and saved as grayscale JPEG. `slices_per_patient` consecutive file numbers are slices of
one patient (small shifts, size changes and fresh noise), so a random slice-level split leaks.
Classes: normal kidneys; cyst (round, homogeneous, water-dense); stone (small calcium-bright focus
inside the kidney); tumor (irregular, heterogeneous mass deforming the kidney contour). Bright
aortic calcifications and dark gas bubbles outside the kidneys make the task non-trivial, and the
per-patient window, body size and noise keep the classes apart from simple intensity statistics.

It is a stand-in for offline demos and tests, never a measure of clinical accuracy.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tumorflow.core.errors import ConfigError

logger = logging.getLogger(__name__)

DATASET_FOLDER = "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
CLASSES = ("Cyst", "Normal", "Stone", "Tumor")
CSV_NAME = "kidneyData.csv"
JPEG_QUALITY = 92

_AIR, _FAT, _TISSUE, _WATER = -1000.0, -90.0, 40.0, 5.0
_CORTEX, _MEDULLA, _AORTA, _BONE, _MARROW, _CALCIUM = 165.0, 115.0, 190.0, 750.0, 260.0, 1100.0
# Hyper-enhancing, heterogeneous renal cell carcinoma: brighter than the cortex in places.
_TUMOR = 215.0


def images_folder(root: Path) -> Path:
    """Where the class folders live under a phantom (or Kaggle kidney CT) root: the doubled name."""
    return Path(root) / DATASET_FOLDER / DATASET_FOLDER


@dataclass(frozen=True)
class _Ellipse:
    x: float
    y: float
    a: float
    b: float
    angle: float = 0.0

    def mask(self, xs: np.ndarray, ys: np.ndarray, scale: float = 1.0) -> np.ndarray:
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        dx, dy = xs - self.x, ys - self.y
        u = (dx * cos + dy * sin) / (self.a * scale)
        v = (-dx * sin + dy * cos) / (self.b * scale)
        return u * u + v * v <= 1.0

    def point(self, rho: float, psi: float) -> tuple[float, float]:
        """A point at relative radius `rho` and angle `psi` in this ellipse's own frame."""
        u, v = rho * self.a * np.cos(psi), rho * self.b * np.sin(psi)
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return self.x + u * cos - v * sin, self.y + u * sin + v * cos


@dataclass(frozen=True)
class _Patient:
    """Everything fixed for one synthetic patient; slices vary only slightly around it."""

    kind: str
    rotation: float
    body: _Ellipse
    inner: _Ellipse
    spine: _Ellipse
    aorta: _Ellipse
    kidneys: tuple[_Ellipse, _Ellipse]
    gas: tuple[_Ellipse, ...]
    calcification: _Ellipse | None
    lesion_side: int
    lesions: tuple[tuple[float, float, float], ...]
    tumor_harmonics: tuple[tuple[float, float], ...]
    window_level: float
    window_width: float
    noise_hu: float
    texture_seed: int


def _draw_patient(
    rng: np.random.Generator, kind: str, noise_scale: float = 1.0, lesion_scale: float = 1.0
) -> _Patient:
    side = int(rng.integers(0, 2))
    cx, cy = rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.06)
    a, b = rng.uniform(0.74, 0.92), rng.uniform(0.52, 0.70)
    fat = rng.uniform(0.05, 0.14)
    spine = _Ellipse(cx, cy + 0.45 * b, 0.085, 0.08)
    aorta = _Ellipse(cx - 0.07, cy + 0.15 * b, 0.055, 0.055)
    kidney_a, kidney_b = rng.uniform(0.19, 0.25), rng.uniform(0.13, 0.16)
    kidneys = []
    for sign in (-1, 1):
        kidneys.append(
            _Ellipse(
                cx + sign * rng.uniform(0.38, 0.48) * a,
                cy + rng.uniform(0.22, 0.32) * b,
                kidney_a * rng.uniform(0.92, 1.08),
                kidney_b * rng.uniform(0.92, 1.08),
                sign * rng.uniform(0.35, 0.65),
            )
        )
    gas = tuple(
        _Ellipse(
            cx + rng.uniform(-0.45, 0.45) * a,
            cy - rng.uniform(0.05, 0.55) * b,
            rng.uniform(0.03, 0.08),
            rng.uniform(0.03, 0.07),
        )
        for _ in range(int(rng.integers(0, 3)))
    )
    calcification = None
    if rng.random() < 0.15:
        x, y = aorta.point(1.0, rng.uniform(0, 2 * np.pi))
        calcification = _Ellipse(x, y, 0.016, 0.016)
    kidney = kidneys[side]
    if kind == "Cyst":
        lesions = tuple(
            (rng.uniform(0.1, 0.6), rng.uniform(0, 2 * np.pi), rng.uniform(0.75, 1.1) * kidney.b)
            for _ in range(int(rng.integers(1, 3)))
        )
    elif kind == "Stone":
        lesions = tuple(
            (rng.uniform(0.0, 0.55), rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.08))
            for _ in range(int(rng.integers(1, 4)))
        )
    elif kind == "Tumor":
        lesions = (
            (rng.uniform(0.5, 0.9), rng.uniform(0, 2 * np.pi), rng.uniform(1.1, 1.5) * kidney.b),
        )
    else:
        lesions = ()
    lesions = tuple((rho, psi, radius * lesion_scale) for rho, psi, radius in lesions)
    harmonics = tuple((rng.uniform(0.06, 0.18), rng.uniform(0, 2 * np.pi)) for _ in range(4))
    return _Patient(
        kind=kind,
        rotation=rng.uniform(-0.12, 0.12),
        body=_Ellipse(cx, cy, a, b),
        inner=_Ellipse(cx, cy, a - fat, b - fat * 0.8),
        spine=spine,
        aorta=aorta,
        kidneys=(kidneys[0], kidneys[1]),
        gas=gas,
        calcification=calcification,
        lesion_side=side,
        lesions=lesions,
        tumor_harmonics=harmonics,
        window_level=rng.uniform(30, 55),
        window_width=rng.uniform(370, 450),
        noise_hu=rng.uniform(5, 14) * noise_scale,
        texture_seed=int(rng.integers(0, 2**31)),
    )


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    return np.clip(field, -1.0, 1.0)


def _blur(image: np.ndarray) -> np.ndarray:
    """A separable [1, 2, 1] / 4 blur, the scanner's point-spread function in miniature."""
    padded = np.pad(image, 1, mode="edge")
    rows = (padded[:-2, :] + 2 * padded[1:-1, :] + padded[2:, :]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def _render_slice(
    patient: _Patient, offset: float, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One axial slice as 8-bit pixels, and the mask of its lesion pixels; `offset` is the slice's
    distance from the patient centre."""
    shift = rng.uniform(-0.02, 0.02, 2)
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size * 2 - 1
    ys, xs = np.meshgrid(grid - shift[1], grid - shift[0], indexing="ij")
    cos, sin = np.cos(patient.rotation), np.sin(patient.rotation)
    xs, ys = xs * cos + ys * sin, -xs * sin + ys * cos
    organ_scale = 1.0 - 0.04 * offset * offset
    texture_rng = np.random.default_rng(patient.texture_seed)
    texture = _smooth_field(texture_rng, size, 9)
    fine = _smooth_field(texture_rng, size, 24)

    hu = np.full((size, size), _AIR)
    hu[patient.body.mask(xs, ys)] = _FAT
    inner = patient.inner.mask(xs, ys)
    hu[inner] = _TISSUE + 25 * texture[inner]
    streaks = inner & (fine < -0.8)
    hu[streaks] = _FAT + 20 * fine[streaks]
    for bubble in patient.gas:
        hu[bubble.mask(xs, ys, organ_scale) & inner] = _AIR + 100
    hu[patient.spine.mask(xs, ys)] = _BONE
    hu[patient.spine.mask(xs, ys, 0.75)] = _MARROW
    hu[patient.aorta.mask(xs, ys)] = _AORTA
    if patient.calcification is not None:
        hu[patient.calcification.mask(xs, ys)] = _CALCIUM
    for kidney in patient.kidneys:
        parenchyma = kidney.mask(xs, ys, organ_scale)
        hu[parenchyma] = _CORTEX + 10 * fine[parenchyma]
        hu[kidney.mask(xs, ys, 0.6 * organ_scale)] = _MEDULLA
        medial = np.sign(patient.body.x - kidney.x)
        hilum = _Ellipse(kidney.x + medial * 0.8 * kidney.a * organ_scale, kidney.y, 0.05, 0.035)
        hu[hilum.mask(xs, ys, organ_scale)] = _FAT
    lesion_mask = _draw_lesions(hu, patient, xs, ys, organ_scale, fine)

    hu = _blur(hu) + rng.normal(0.0, patient.noise_hu, hu.shape)
    low = patient.window_level - patient.window_width / 2
    pixels = np.clip((hu - low) / patient.window_width * 255.0, 0, 255).round().astype(np.uint8)
    return pixels, lesion_mask


def _draw_lesions(
    hu: np.ndarray,
    patient: _Patient,
    xs: np.ndarray,
    ys: np.ndarray,
    scale: float,
    fine: np.ndarray,
) -> np.ndarray:
    """Draw the patient's lesions into `hu`; return the mask of the pixels they cover."""
    kidney = patient.kidneys[patient.lesion_side]
    covered = np.zeros(hu.shape, dtype=bool)
    for rho, psi, radius in patient.lesions:
        x, y = kidney.point(rho * scale, psi)
        if patient.kind == "Cyst":
            mask = _Ellipse(x, y, radius * scale, radius * scale).mask(xs, ys)
            hu[mask] = _WATER
            covered |= mask
        elif patient.kind == "Stone":
            mask = _Ellipse(x, y, radius, radius).mask(xs, ys)
            hu[mask] = _CALCIUM
            covered |= mask
        elif patient.kind == "Tumor":
            angle = np.arctan2(ys - y, xs - x)
            bound = np.ones_like(xs)
            for order, (amplitude, phase) in enumerate(patient.tumor_harmonics, start=2):
                bound += amplitude * np.cos(order * angle + phase)
            mass = np.hypot(xs - x, ys - y) <= radius * scale * bound
            hu[mass] = _TUMOR + 70 * fine[mass] + 30 * np.sin(angle[mass] * 3)
            covered |= mass
    return covered


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_corrupt_files(folder: Path, count: int, sample_jpeg: bytes) -> list[Path]:
    """Broken files of three kinds, spread over the class folders, for quarantine demos."""
    written = []
    for index in range(count):
        target = folder / CLASSES[index % len(CLASSES)]
        kind = index % 3
        if kind == 0:
            path = target / f"corrupt-{index + 1}-empty.jpg"
            path.write_bytes(b"")
        elif kind == 1:
            path = target / f"corrupt-{index + 1}-truncated.jpg"
            path.write_bytes(sample_jpeg[: len(sample_jpeg) // 2])
        else:
            path = target / f"corrupt-{index + 1}-not-an-image.png"
            path.write_text("this is a text file with an image extension\n")
        written.append(path)
    return written


@dataclass(frozen=True)
class PhantomSlice:
    """One rendered slice: its class, file stem (`Tumor- (3)`), 8-bit pixels and the mask of the
    pixels its lesions cover (empty for Normal): where an explanation should point."""

    kind: str
    name: str
    pixels: np.ndarray
    lesion_mask: np.ndarray


def phantom_slices(
    per_class: int = 100,
    size: int = 96,
    seed: int = 0,
    slices_per_patient: int = 4,
    noise_scale: float = 1.0,
    lesion_scale: float = 1.0,
) -> Iterator[PhantomSlice]:
    """The slices `generate_phantom` writes with the same arguments, in its order, with their
    lesion masks."""
    for class_index, kind in enumerate(CLASSES):
        for first in range(0, per_class, slices_per_patient):
            patient_rng = np.random.default_rng([seed, class_index, first])
            patient = _draw_patient(patient_rng, kind, noise_scale, lesion_scale)
            count = min(slices_per_patient, per_class - first)
            for k in range(count):
                offset = k - (count - 1) / 2
                pixels, mask = _render_slice(patient, offset, patient_rng, size)
                yield PhantomSlice(kind, f"{kind}- ({first + k + 1})", pixels, mask)


def generate_phantom(
    output_dir: Path,
    per_class: int = 100,
    size: int = 96,
    seed: int = 0,
    slices_per_patient: int = 4,
    corrupt: int = 0,
    noise_scale: float = 1.0,
    lesion_scale: float = 1.0,
) -> Path:
    """Write the phantom under `output_dir` (kidney CT layout plus kidneyData.csv); return it.

    The same arguments always give byte-identical files. `corrupt` adds that many broken files
    (empty, truncated JPEG, text named .png) to the class folders. `noise_scale` multiplies the
    image noise and `lesion_scale` the lesion sizes: above and below 1 they make a harder set,
    closer to real scans than the easy default.
    """
    if (
        per_class < 1
        or size < 16
        or slices_per_patient < 1
        or corrupt < 0
        or noise_scale < 0
        or lesion_scale <= 0
    ):
        raise ConfigError(
            "phantom: per_class and slices_per_patient must be >= 1, size >= 16, corrupt >= 0, "
            "noise_scale >= 0, lesion_scale > 0"
        )
    output_dir = Path(output_dir)
    folder = images_folder(output_dir)
    rows = []
    sample_jpeg = b""
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for phantom_slice in phantom_slices(
        per_class, size, seed, slices_per_patient, noise_scale, lesion_scale
    ):
        kind, name = phantom_slice.kind, phantom_slice.name
        sample_jpeg = _encode_jpeg(phantom_slice.pixels)
        (folder / kind / f"{name}.jpg").write_bytes(sample_jpeg)
        rows.append(
            (
                name,
                f"{DATASET_FOLDER}/{DATASET_FOLDER}/{kind}/{name}.jpg",
                kind,
                CLASSES.index(kind),
                kind,
            )
        )
    with (output_dir / CSV_NAME).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "path", "diag", "target", "Class"])
        writer.writerows(rows)
    broken = _write_corrupt_files(folder, corrupt, sample_jpeg)
    logger.info(
        "phantom: %d images (%d per class, %d px) and %d broken files under %s",
        len(rows),
        per_class,
        size,
        len(broken),
        output_dir,
    )
    return output_dir
