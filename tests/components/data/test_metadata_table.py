"""A metadata table with a patient column: patients become the split groups, chosen columns
become evaluation slices, and the other columns (names) never leave ingest."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import noise_image

from tumorflow.components.data.dicom import read_slice_table
from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.validate import validate_and_split
from tumorflow.core.config import DatasetConfig, DicomConfig, SplitConfig
from tumorflow.core.errors import DatasetError

NAME = "Quendolyn Marrowgate"


def _exported_set(root: Path, patients: int = 10, slices: int = 3) -> Path:
    """PNG slices that all look different, and a table saying whose they are."""
    rows = []
    for label in ("normal", "tumor"):
        (root / label).mkdir(parents=True)
        for p in range(patients):
            for s in range(slices):
                name = f"{label}_{p}_{s}.png"
                seed = p * 1000 + s * 7 + (500 if label == "tumor" else 0)
                noise_image(seed, 40).save(root / label / name)
                rows.append([name, f"MRN{label}{p}", NAME, f"hospital-{p % 2}"])
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "patient_id", "patient_name", "centre"])
        writer.writerows(rows)
    return root


def _dataset(**fields) -> DatasetConfig:
    return DatasetConfig(
        metadata_table="metadata.csv",
        metadata_path_column="file",
        metadata_patient_column="patient_id",
        metadata_columns=["centre"],
        dicom=DicomConfig(pseudonym_salt="s"),
        **fields,
    )


def test_a_patient_column_makes_patients_the_split_groups(tmp_path: Path) -> None:
    source = _exported_set(tmp_path / "src")
    download_dataset(str(source), tmp_path / "raw", _dataset())
    result = validate_and_split(
        tmp_path / "raw",
        tmp_path / "split",
        SplitConfig(phash_max_distance=0, min_test_per_class=1),
    )
    assert result.grouping["patients"] == result.grouping["groups"] == 20
    slices = read_slice_table(tmp_path / "split")
    assert {row["centre"] for row in slices.values()} == {"hospital-0", "hospital-1"}
    with (tmp_path / "split" / "split_manifest.csv").open() as handle:
        split_of = {row["path"]: row["split"] for row in csv.DictReader(handle)}
    per_patient: dict[str, set[str]] = {}
    for path, row in slices.items():
        per_patient.setdefault(row["patient"], set()).add(split_of[path])
    assert len(per_patient) == 20 and all(len(s) == 1 for s in per_patient.values())
    for folder in (tmp_path / "raw", tmp_path / "split"):
        for path in folder.rglob("*.csv"):
            text = path.read_text()
            assert NAME not in text and "MRNtumor" not in text, path


def test_a_table_without_the_named_columns_says_which_it_has(tmp_path: Path) -> None:
    source = _exported_set(tmp_path / "src", patients=2, slices=1)
    with pytest.raises(DatasetError, match=r"no column site.*centre"):
        download_dataset(
            str(source),
            tmp_path / "raw",
            _dataset().model_copy(update={"metadata_columns": ["site"]}),
        )
