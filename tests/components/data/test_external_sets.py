"""External-site sets prepared like the training data: the same download and validation, every
valid image held out in the test split, the run's classes kept."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import image_bytes

from tumorflow.components.data.external_sets import (
    external_splits,
    prepare_external_sets,
    resolve_external_versions,
)
from tumorflow.components.data.tfrecords import read_split_manifest
from tumorflow.core.config import DatasetConfig, ExternalSetConfig, SplitConfig

CLASSES = ["cyst", "normal", "stone", "tumor"]


def site_folder(root: Path, levels: list[float], per_class: int = 5, seed: int = 0) -> Path:
    """Class folders of noisy greys, one mean level per class: another "site" when the levels
    are shifted from the training data's."""
    for index, (name, level) in enumerate(zip(CLASSES, levels, strict=True)):
        (root / name).mkdir(parents=True)
        for number in range(per_class):
            data = image_bytes(seed + 100 * index + number, 32, level=level)
            (root / name / f"{name}-{number}.png").write_bytes(data)
    return root


def prepare(tmp_path: Path, *sets: ExternalSetConfig, dataset: DatasetConfig | None = None):
    """The two pipeline steps, as functions: versions, then download & validate."""
    dataset = dataset or DatasetConfig(classes=CLASSES)
    versions = resolve_external_versions(list(sets), dataset)
    out = tmp_path / "external"
    return prepare_external_sets(list(sets), dataset, SplitConfig(), versions, out), out


def test_an_external_set_is_validated_like_training_data_and_held_out_whole(tmp_path: Path):
    source = site_folder(tmp_path / "site-b", [60.0, 120.0, 180.0, 240.0])
    (source / "tumor" / "broken.png").write_bytes(b"not an image")
    site = ExternalSetConfig(name="site-b", source=str(source))

    index, out = prepare(tmp_path, site)

    [entry] = index
    assert entry["name"] == "site-b" and entry["quarantined"] == 1
    assert entry["images"] == dict.fromkeys(CLASSES, 5)
    assert entry["dataset_version"].startswith("sha256:")
    manifest = read_split_manifest(out / "site-b")
    assert manifest["strategy"] == "held-out" and manifest["classes"] == CLASSES
    assert manifest["splits"]["test"]["count"] == 20
    assert manifest["splits"]["train"]["count"] == manifest["splits"]["val"]["count"] == 0
    assert external_splits(out) == {"site-b": out / "site-b"}
    assert json.loads((out / "external_sets.json").read_text()) == index


def test_a_site_without_some_classes_is_still_an_external_set(tmp_path: Path):
    source = site_folder(tmp_path / "site-c", [40.0, 100.0, 160.0, 220.0], per_class=3)
    for path in (source / "stone").iterdir():
        path.unlink()
    (source / "stone").rmdir()

    [entry], out = prepare(tmp_path, ExternalSetConfig(name="site-c", source=str(source)))

    assert entry["images"] == {"cyst": 3, "normal": 3, "stone": 0, "tumor": 3}
    assert read_split_manifest(out / "site-c")["classes"] == CLASSES


def test_a_phantom_site_takes_its_own_generator_settings(tmp_path: Path):
    dataset = DatasetConfig.model_validate(
        {
            "source": "phantom",
            "classes": CLASSES,
            "subdir": "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone/CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone",
            "class_map": {"Cyst": "cyst", "Normal": "normal", "Stone": "stone", "Tumor": "tumor"},
            "phantom": {"per_class": 8, "size": 48, "seed": 0},
        }
    )
    site = ExternalSetConfig(
        name="noisy", source="phantom", phantom={"per_class": 4, "size": 48, "seed": 11}
    )
    versions = resolve_external_versions([site], dataset)
    assert (
        versions["noisy"]["fingerprint"]
        != resolve_external_versions([ExternalSetConfig(name="noisy", source="phantom")], dataset)[
            "noisy"
        ]["fingerprint"]
    ), "another seed is another dataset version"

    [entry], _ = prepare(tmp_path, site, dataset=dataset)
    assert entry["images"] == dict.fromkeys(CLASSES, 4)
    assert external_splits(None) == {} and external_splits(tmp_path / "nothing") == {}
