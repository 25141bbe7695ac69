"""External-site sets (docs/external_sets.md): downloaded and validated like the training data,
by the same functions, and held out whole: never trained on, scored by challenger and champion.

Each set is the run's dataset section with the set's own source, folder and labels
(`ExternalSetConfig.dataset`). Its version is resolved like the training data's (a content
fingerprint), and the step that prepares the sets is cached on those fingerprints. The prepared
folder holds one split dataset per set (`<name>/`, everything in its test split) and an index,
`external_sets.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from tumorflow.components.data.dataset_version import DatasetVersion, resolve_dataset_version
from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.validate import validate_and_split
from tumorflow.core.artifacts import EXTERNAL_SETS_FILE
from tumorflow.core.config import DatasetConfig, ExternalSetConfig, SplitConfig
from tumorflow.core.errors import DatasetError

log = logging.getLogger(__name__)


def resolve_external_versions(
    external_sets: list[ExternalSetConfig], run_dataset: DatasetConfig
) -> dict[str, dict]:
    """Each set's dataset version now: `{name: {"fingerprint", "source", "detail"}}`."""
    versions = {}
    for external in external_sets:
        version = resolve_dataset_version(external.dataset(run_dataset))
        versions[external.name] = {
            "fingerprint": version.fingerprint,
            "source": version.source,
            "detail": version.detail,
        }
    return versions


def prepare_external_sets(
    external_sets: list[ExternalSetConfig],
    run_dataset: DatasetConfig,
    split_config: SplitConfig,
    versions: dict[str, dict],
    output_dir: Path,
) -> list[dict]:
    """Download and validate every set into `output_dir/<name>/` (a split dataset holding all of
    its valid images in `test`), with the run's classes; write and return the index."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for external in external_sets:
        dataset = external.dataset(run_dataset)
        version = versions.get(external.name)
        if version is None:
            raise DatasetError(f"external set {external.name!r} has no resolved dataset version")
        raw = Path(tempfile.mkdtemp(prefix=f"tumorflow-external-{external.name}-"))
        try:
            download_dataset(
                version["source"],
                raw,
                dataset,
                DatasetVersion(version["fingerprint"], version["source"], version["detail"]),
            )
            result = validate_and_split(
                raw,
                output_dir / external.name,
                split_config,
                dataset.classes or None,
                held_out=True,
            )
        finally:
            shutil.rmtree(raw, ignore_errors=True)
        index.append(
            {
                "name": external.name,
                "source": version["source"],
                "dataset_version": version["fingerprint"],
                "images": result.counts["test"],
                "quarantined": len(result.quarantined),
            }
        )
        log.info(
            "external set %s: %d images (%d quarantined)",
            external.name,
            sum(result.counts["test"].values()),
            len(result.quarantined),
        )
    (output_dir / EXTERNAL_SETS_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def external_splits(external_dir: Path | None) -> dict[str, Path]:
    """The prepared sets of `external_dir`: name -> split dataset folder ({} when none)."""
    if external_dir is None or not (Path(external_dir) / EXTERNAL_SETS_FILE).is_file():
        return {}
    index = json.loads((Path(external_dir) / EXTERNAL_SETS_FILE).read_text())
    return {entry["name"]: Path(external_dir) / entry["name"] for entry in index}
