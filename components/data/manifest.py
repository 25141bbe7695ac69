"""The raw dataset's manifest (`manifest.csv`: path,label,sha256,bytes,source_split,
original_path) and its content fingerprint, the key every cached step after download is keyed on
(docs/caching.md)."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from tumorflow.core.artifacts import MANIFEST_CSV
from tumorflow.core.errors import DatasetError

MANIFEST_COLUMNS = ("path", "label", "sha256", "bytes", "source_split", "original_path")


_STAGING = ".staging"
# source.json key: archive entries that could not be extracted, [escaped name, reason] each;
# validation lists them in its quarantine report.
ARCHIVE_QUARANTINE = "archive_quarantine"


@dataclass(frozen=True)
class ManifestRow:
    """One listed image of the raw dataset."""

    path: str
    label: str
    sha256: str
    bytes: int
    source_split: str
    # The path as the source named it, percent-encoded, when the copy was renamed; else "".
    original_path: str = ""


def content_digest(lines: list[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def manifest_fingerprint(rows: list[ManifestRow]) -> str:
    """The dataset version of a manifest: its (original) paths, labels, splits and SHA-256s."""
    return content_digest(
        sorted(
            f"{r.original_path or r.path}\t{r.label}\t{r.source_split}\t{r.sha256}" for r in rows
        )
    )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for row in rows:
            writer.writerow(
                [row.path, row.label, row.sha256, row.bytes, row.source_split, row.original_path]
            )


def read_manifest(raw_dir: Path) -> list[ManifestRow]:
    """The rows of a raw dataset's manifest.csv."""
    path = Path(raw_dir) / MANIFEST_CSV
    if not path.exists():
        raise DatasetError(
            f"{raw_dir} is not a raw dataset: {MANIFEST_CSV} is missing; run the download step"
        )
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_COLUMNS) - {"original_path"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path} lacks the columns {sorted(missing)}")
        return [
            ManifestRow(
                r["path"],
                r["label"],
                r["sha256"],
                int(r["bytes"]),
                r["source_split"] or "",
                r.get("original_path") or "",
            )
            for r in reader
        ]
