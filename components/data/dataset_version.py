"""The dataset version: what a source holds now, as a content fingerprint, resolved by the
pipeline's never-cached first step so that the download after it is cached on it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tumorflow.components.data import archive, dicomweb
from tumorflow.components.data.classes import labelled_images
from tumorflow.components.data.manifest import (
    ManifestRow,
    content_digest,
    manifest_fingerprint,
    sha256_file,
)
from tumorflow.components.data.safe_names import safe_copy_paths
from tumorflow.components.data.sources import fetch_kaggle, unusable_source
from tumorflow.core import storage
from tumorflow.core.config import DatasetConfig
from tumorflow.core.errors import SourceUnavailableError


@dataclass(frozen=True)
class DatasetVersion:
    """What a source holds now, as one content fingerprint (docs/caching.md).

    `fingerprint` changes exactly when the images or their labels change; `source` is what the
    download fetches (a Kaggle handle pinned to the resolved version); `detail` says how the
    fingerprint was made.
    """

    fingerprint: str
    source: str
    detail: dict = field(default_factory=dict)


def resolve_dataset_version(dataset: DatasetConfig) -> DatasetVersion:
    """Fingerprint what `dataset.source` holds now, without copying it.

    phantom: its generator settings. A folder: the manifest it would give (paths, labels and
    SHA-256s). An archive: its SHA-256. gs://: every object's name and generation. Kaggle: the
    resolved version (an unpinned handle is pinned to it, so the download fetches just that).
    """
    source = dataset.source.strip()
    if source == "phantom":
        settings = json.dumps(dataset.phantom.model_dump(), sort_keys=True)
        return DatasetVersion(content_digest([f"phantom\t{settings}"]), source, {"kind": "phantom"})
    if source.startswith("kaggle:"):
        fetched = fetch_kaggle(source.removeprefix("kaggle:").strip("/"))
        if fetched.version is None:
            raise SourceUnavailableError(
                f"kagglehub did not say which version of {source} it fetched; pin one: "
                f"{source.rstrip('/')}/versions/N"
            )
        handle = source.removeprefix("kaggle:").strip("/").split("/versions/")[0]
        pinned = f"kaggle:{handle}/versions/{fetched.version}"
        return DatasetVersion(
            content_digest([pinned]), pinned, {"kind": "kaggle", "version": fetched.version}
        )
    if dicomweb.is_dicomweb_source(source):
        synced = dicomweb.sync_instances(source, dataset.dicomweb)
        return DatasetVersion(synced.fingerprint, source, synced.detail)
    if storage.is_remote(source):
        generations = storage.list_generations(source)
        if not generations:
            raise SourceUnavailableError(f"{source} holds no objects")
        return DatasetVersion(
            content_digest(sorted(f"{name}\t{gen}" for name, gen in generations.items())),
            source,
            {"kind": "gcs", "objects": len(generations)},
        )
    path = Path(source).expanduser()
    if path.is_dir():
        listed, _, _ = labelled_images(path, dataset)
        names = safe_copy_paths([image.relative_to(path).as_posix() for image, *_ in listed])
        rows = [
            ManifestRow(copy_path, label, sha256_file(image), 0, split, original)
            for (image, label, split, _), (copy_path, original) in zip(
                tqdm(listed, desc="fingerprint", unit="img", disable=None, leave=False),
                names,
                strict=True,
            )
        ]
        return DatasetVersion(
            manifest_fingerprint(rows), source, {"kind": "folder", "images": len(rows)}
        )
    if archive.is_archive(path):
        return DatasetVersion(
            "sha256:" + sha256_file(path), source, {"kind": "archive", "bytes": path.stat().st_size}
        )
    raise unusable_source(source, path)
