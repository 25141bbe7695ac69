"""Download step: fetch a dataset from any supported source (data/sources.py) into the "Raw
dataset" folder (docs/artifacts.md): `files/<relative path>` under safe names
(data/safe_names.py), `manifest.csv` (data/manifest.py) and `source.json`. Which files are listed:
data/classes.py. A broken file with an image extension is still listed: validation quarantines it
with a reason. DICOM files (`.dcm`, or extension-less files of a series folder) are decoded by
components/data/dicom.py into pseudonymous 8-bit PNG slices, with their metadata in `slices.csv`;
an undecodable one becomes a note that validation quarantines with the reason.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from tumorflow.components.data import dicom, metadata_table
from tumorflow.components.data.classes import labelled_images
from tumorflow.components.data.dataset_version import DatasetVersion
from tumorflow.components.data.image_files import IMAGE_EXTENSIONS
from tumorflow.components.data.manifest import (
    ManifestRow,
    manifest_fingerprint,
    sha256_file,
    write_manifest,
)
from tumorflow.components.data.safe_names import safe_copy_paths
from tumorflow.components.data.sources import fetch
from tumorflow.core.artifacts import MANIFEST_CSV, SOURCE_JSON
from tumorflow.core.artifacts import RAW_FILES as FILES
from tumorflow.core.config import DatasetConfig
from tumorflow.core.errors import DatasetError, SourceUnavailableError

logger = logging.getLogger(__name__)

_KAGGLE_HANDLE = re.compile(r"^[\w.-]+/[\w.-]+(/versions/(\d+))?$")
_STAGING = ".staging"


@dataclass(frozen=True)
class DownloadResult:
    """What `download_dataset` wrote: the raw dataset folder and a summary of it."""

    output_dir: Path
    rows: list[ManifestRow]
    source: dict
    skipped_folders: list[str] = field(default_factory=list)

    @property
    def label_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(row.label for row in self.rows).items()))

    @property
    def dataset_version(self) -> str:
        return self.source.get("dataset_version", "")

    def summary(self) -> dict:
        """Flat key/values for the pipeline artifact's metadata."""
        return {
            "images": len(self.rows),
            "labels": self.label_counts,
            "source": self.source.get("source", ""),
            "version": self.source.get("version") or "",
            "dataset_version": self.dataset_version,
        }


def _prepare_output(output_dir: Path) -> None:
    """Make `output_dir` an empty raw dataset folder, replacing an earlier raw dataset only."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / MANIFEST_CSV).exists():
            raise SourceUnavailableError(
                f"{output_dir} is not empty and is not a raw dataset; choose a new folder"
            )
        for name in (FILES, _STAGING):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in (MANIFEST_CSV, SOURCE_JSON, dicom.SLICES_CSV):
            (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def download_dataset(
    source: str,
    output_dir: Path,
    dataset: DatasetConfig,
    expected_version: DatasetVersion | None = None,
) -> DownloadResult:
    """Fetch `source`, copy its labelled images to `output_dir/files/`, write the manifest.

    The result's `dataset_version` is `expected_version` (what the pipeline's resolve step saw,
    and keyed the cache on) when given, else the manifest's fingerprint. For a folder source the
    two must agree: a folder that changed between the two steps is refused, not half-read.
    """
    output_dir = Path(output_dir)
    _prepare_output(output_dir)
    staging = output_dir / _STAGING
    try:
        fetched = fetch(source.strip(), staging, dataset)
        listed, skipped_files, skipped_folders = labelled_images(fetched.root, dataset)
        rows, source_rows, originals = [], [], []
        files_dir = output_dir / FILES
        dicoms = None
        names = safe_copy_paths(
            [image.relative_to(fetched.root).as_posix() for image, *_ in listed]
        )
        for (image, label, split, folder), (relative, original) in zip(
            tqdm(listed, desc="copy images", unit="img", disable=None, leave=False),
            names,
            strict=True,
        ):
            class_folder = folder.relative_to(fetched.root).as_posix()
            if dicom.is_dicom_file(image):
                dicoms = dicoms or dicom.DicomIngest(dataset.dicom, files_dir)
                source_rows.append(
                    ManifestRow(relative, label, sha256_file(image), 0, split, original)
                )
                for written in dicoms.add(image, class_folder, relative):
                    originals.append((written, relative, class_folder))
                    target = files_dir / written
                    rows.append(
                        ManifestRow(
                            written, label, sha256_file(target), target.stat().st_size, split
                        )
                    )
                continue
            target = files_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if staging in image.parents:
                image.replace(target)
            else:
                shutil.copyfile(image, target)
            rows.append(
                ManifestRow(
                    relative, label, sha256_file(target), target.stat().st_size, split, original
                )
            )
            source_rows.append(rows[-1])
            originals.append((relative, relative, class_folder))
        metadata_table.write_slices(
            output_dir,
            metadata_table.merge_slice_records(
                fetched.root, dataset, originals, dicoms.records if dicoms else []
            ),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not rows:
        raise DatasetError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under the class folders of {source}"
        )
    rows.sort(key=lambda row: row.path)
    content = manifest_fingerprint(rows)
    if (
        expected_version is not None
        and expected_version.detail.get("kind") == "folder"
        and expected_version.fingerprint != manifest_fingerprint(source_rows)
    ):
        raise DatasetError(
            f"{source} changed while it was being downloaded (dataset version "
            f"{expected_version.fingerprint[:19]} became {content[:19]}); run again"
        )
    pacs_version = fetched.extra.get("dicomweb", {}).get("fingerprint")
    if (
        expected_version is not None
        and pacs_version
        and pacs_version != expected_version.fingerprint
    ):
        raise DatasetError(
            f"the PACS search {source} changed while it was being downloaded (dataset version "
            f"{expected_version.fingerprint[:19]} became {pacs_version[:19]}); run again"
        )
    write_manifest(rows, output_dir / MANIFEST_CSV)
    source_info = {
        "source": source,
        "resolved": fetched.resolved,
        "version": fetched.version,
        "dataset_version": expected_version.fingerprint if expected_version else content,
        "manifest_sha256": content,
        "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **fetched.extra,
    }
    (output_dir / SOURCE_JSON).write_text(json.dumps(source_info, indent=2) + "\n")
    result = DownloadResult(output_dir, rows, source_info, skipped_folders)
    logger.info(
        "raw dataset: %d images %s from %s (%d non-image files skipped) -> %s",
        len(rows),
        result.label_counts,
        source,
        skipped_files,
        output_dir,
    )
    return result
