"""A dataset's metadata table (a CSV with one row per image) joined onto the raw dataset.

The table's patient column becomes a salted pseudonymous patient id (the split groups), the
columns named in `DatasetConfig.metadata_columns` become evaluation slices, and nothing else of
it is copied. The result is merged into the raw dataset's slices.csv, beside DICOM's own tags.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path, PurePosixPath

from tumorflow.components.data.dicom import SLICES_CSV, write_slice_table
from tumorflow.components.data.pseudonyms import pseudonym, resolve_salt
from tumorflow.core.config import DatasetConfig
from tumorflow.core.errors import DatasetError

logger = logging.getLogger(__name__)


def _read_table(root: Path, dataset: DatasetConfig) -> list[dict[str, str]]:
    path = Path(dataset.metadata_table).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DatasetError(
            f"dataset.metadata_table {dataset.metadata_table} is not a file in the dataset; "
            "give its path inside the dataset root, or an absolute path"
        )
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        wanted = [
            dataset.metadata_path_column,
            *([dataset.metadata_patient_column] if dataset.metadata_patient_column else []),
            *dataset.metadata_columns,
        ]
        missing = [name for name in wanted if name not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"the metadata table {path.name} has no column {', '.join(missing)} "
                f"(it has: {', '.join(reader.fieldnames or [])}); fix dataset.metadata_*"
            )
        return list(reader)


def _keys(original: str, class_folder: str) -> list[str]:
    """The spellings a table may use for an image: from the root, from its class folder, name."""
    path = PurePosixPath(original)
    keys = [original, path.name]
    if class_folder and original.startswith(class_folder.rstrip("/") + "/"):
        keys.insert(1, original[len(class_folder.rstrip("/")) + 1 :])
    return keys


def merge_slice_records(
    root: Path,
    dataset: DatasetConfig,
    images: list[tuple[str, str, str]],
    records: list[dict[str, str]],
) -> list[dict[str, str]]:
    """slices.csv records with the table joined on: `images` are (written path, original path,
    class folder) of every listed image; `records` the DICOM ones already made."""
    if not dataset.metadata_table:
        return records
    salt = resolve_salt(dataset.dicom) if dataset.metadata_patient_column else ""
    table: dict[str, dict[str, str]] = {}
    for row in _read_table(root, dataset):
        table.setdefault(row[dataset.metadata_path_column].strip().replace("\\", "/"), row)
    by_path = {record["path"]: dict(record) for record in records}
    matched = 0
    for written, original, class_folder in images:
        row = next((table[k] for k in _keys(original, class_folder) if k in table), None)
        if row is None:
            continue
        matched += 1
        record = by_path.setdefault(written, {"path": written})
        if dataset.metadata_patient_column:
            record["patient"] = pseudonym("patient", row[dataset.metadata_patient_column], salt)
        for column in dataset.metadata_columns:
            record[column] = row[column].strip()
    logger.info("metadata table: %d of %d images matched", matched, len(images))
    return list(by_path.values())


def write_slices(output_dir: Path, records: list[dict[str, str]]) -> None:
    """The raw dataset's slices.csv, when any image has metadata."""
    if records:
        write_slice_table(records, Path(output_dir) / SLICES_CSV)
