"""The synthetic kidney CT phantom: layout, determinism, near-duplicate slices, broken files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorflow.components.data.phantom import (
    CLASSES,
    CSV_NAME,
    _draw_patient,
    generate_phantom,
    images_folder,
)
from tumorflow.core.errors import ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _pixels(root: Path, kind: str, number: int) -> np.ndarray:
    return np.asarray(
        Image.open(images_folder(root) / kind / f"{kind}- ({number}).jpg"), dtype=np.float64
    )


def test_layout_matches_the_kaggle_kidney_set(tiny_phantom: Path) -> None:
    folder = (
        tiny_phantom
        / "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
        / "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["Cyst", "Normal", "Stone", "Tumor"]
    for kind in CLASSES:
        names = sorted(p.name for p in (folder / kind).iterdir())
        assert names == sorted(f"{kind}- ({n}).jpg" for n in range(1, 13))
        with Image.open(folder / kind / f"{kind}- (1).jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "L", (48, 48))
    with (tiny_phantom / CSV_NAME).open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 48
    assert {"image_id", "Class"} <= set(rows[0])
    assert rows[0]["image_id"] == "Cyst- (1)" and rows[0]["Class"] == "Cyst"


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    first = _files(generate_phantom(tmp_path / "a", per_class=5, size=40, seed=11))
    second = _files(generate_phantom(tmp_path / "b", per_class=5, size=40, seed=11))
    other = _files(generate_phantom(tmp_path / "c", per_class=5, size=40, seed=12))
    assert first == second
    assert first.keys() == other.keys()
    assert sum(first[name] != other[name] for name in first) >= len(first) - 1


def test_slices_of_one_patient_are_near_duplicates(tiny_phantom: Path) -> None:
    """Slices 1-4 belong to one patient, 5-8 to the next: a random slice split would leak."""
    for kind in CLASSES:
        same = np.abs(_pixels(tiny_phantom, kind, 1) - _pixels(tiny_phantom, kind, 2)).mean()
        other = np.abs(_pixels(tiny_phantom, kind, 4) - _pixels(tiny_phantom, kind, 5)).mean()
        assert same < other / 2


def test_classes_are_not_separable_by_mean_intensity(tmp_path: Path) -> None:
    root = generate_phantom(tmp_path, per_class=24, size=48, seed=5, slices_per_patient=1)
    means = np.array([[_pixels(root, kind, n).mean() for n in range(1, 25)] for kind in CLASSES])
    centres = means.mean(axis=1)
    predicted = np.abs(means[:, :, None] - centres[None, None, :]).argmin(axis=2)
    accuracy = (predicted == np.arange(4)[:, None]).mean()
    assert accuracy < 0.5


def test_corrupt_files_are_added_beside_the_images(tmp_path: Path) -> None:
    root = generate_phantom(tmp_path, per_class=4, size=32, corrupt=3)
    broken = sorted(p for p in images_folder(root).rglob("corrupt-*"))
    assert len(broken) == 3
    sizes = {p.suffix: p.stat().st_size for p in broken}
    assert any(p.stat().st_size == 0 for p in broken)
    assert ".png" in sizes
    for path in broken:
        with pytest.raises(OSError):
            Image.open(path).load()


def test_invalid_arguments_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="per_class"):
        generate_phantom(tmp_path, per_class=0)


def test_the_harder_set_is_noisier_and_its_lesions_smaller(tmp_path: Path) -> None:
    easy = generate_phantom(tmp_path / "easy", per_class=4, size=64, seed=2)
    hard = generate_phantom(
        tmp_path / "hard", per_class=4, size=64, seed=2, noise_scale=3.0, lesion_scale=0.5
    )

    def roughness(root: Path, kind: str) -> float:
        pixels = _pixels(root, kind, 1)
        return float(np.abs(np.diff(pixels, axis=1)).mean())

    assert roughness(hard, "Normal") > 1.3 * roughness(easy, "Normal")
    for kind in ("Cyst", "Stone", "Tumor"):
        default = _draw_patient(np.random.default_rng(3), kind)
        small = _draw_patient(np.random.default_rng(3), kind, lesion_scale=0.5)
        assert [r for *_, r in small.lesions] == pytest.approx([r / 2 for *_, r in default.lesions])
