"""The champion: found in the registry (alias `champion`), its served SavedModel fetched, and
re-scored on the challenger's test split through the same `serving_default` signature and the
same scoring function (`evaluate.score_saved_model`) that scored the challenger.

When a version is being served but the registry cannot be read, the gate cannot know what it
compares against: that is an error, never a silent "no champion yet".
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tumorflow.components.gate.rules import ChampionEvaluation
from tumorflow.core import serving_layout, storage
from tumorflow.core.errors import GateError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


def evaluate_champion(
    saved_model_dir: Path,
    split_dir: Path,
    *,
    version: str | None = None,
    serving_version: str | None = None,
    external_splits: dict[str, Path] | None = None,
) -> ChampionEvaluation:
    """Score the test split with a served SavedModel's `serving_default` (the encoded bytes),
    and each external set's (`external_splits`: name -> split dataset) the way evaluate does."""
    from tumorflow.components.data.tfrecords import read_split_manifest
    from tumorflow.components.evaluation.evaluate import score_held_out_set, score_saved_model
    from tumorflow.components.evaluation.metrics import Predictions, compute_metrics

    classes = list(read_split_manifest(split_dir)["classes"])
    scored = score_saved_model(saved_model_dir, split_dir)
    if sorted(scored.classes) != sorted(classes):
        log.warning("champion classes %s differ from the split's %s", scored.classes, classes)
        return ChampionEvaluation(version, serving_version, scored, {})
    order = [scored.classes.index(c) for c in classes]
    scored = Predictions(scored.paths, scored.y_true, scored.probs[:, order], classes)
    metrics = compute_metrics(scored.y_true, scored.probs, classes)
    external = {}
    for name, external_split in (external_splits or {}).items():
        theirs = score_held_out_set(saved_model_dir, external_split, classes)
        external[name] = ChampionEvaluation(
            version,
            serving_version,
            theirs,
            compute_metrics(theirs.y_true, theirs.probs, classes),
        )
    return ChampionEvaluation(version, serving_version, scored, metrics, external)


def _local_copy(uri: str, work_dir: Path) -> Path:
    """A local folder holding the SavedModel at `uri` (itself when local)."""
    if not storage.is_remote(uri):
        return Path(uri)
    storage.download_tree(uri, work_dir / "served")
    return work_dir / "served"


def champion_saved_model(tracking_uri: str, model_version: ModelVersion, work_dir: Path) -> Path:
    """A local copy of the champion's served SavedModel.

    The served folder recorded at deploy (`serving_path` tag) is used when it still exists, else
    the serving export of the registered model folder (older folders without one are exported).
    """
    from tumorflow.components.release.registry import (
        TAG_SERVING_PATH,
        connect,
        download_model_folder,
    )
    from tumorflow.components.training.export import SERVING_EXPORT, export_serving_model

    served = model_version.tags.get(TAG_SERVING_PATH)
    if served and storage.exists(storage.join(served, serving_layout.SAVED_MODEL)):
        return _local_copy(served, work_dir)
    folder = download_model_folder(connect(tracking_uri), model_version)
    if (folder / SERVING_EXPORT / serving_layout.SAVED_MODEL).exists():
        return folder / SERVING_EXPORT
    export_serving_model(folder, work_dir / "exported", model_name=model_version.name)
    return work_dir / "exported"


def _registry_champion(
    tracking_uri: str | None, model_name: str, served: serving_layout.ServedVersion | None
) -> ModelVersion | None:
    """The registry's champion; GateError when a version is served but the registry is unread."""
    from mlflow.exceptions import MlflowException

    from tumorflow.components.release.registry import RegistryError, find_champion

    if not tracking_uri:
        if served is None:
            return None
        raise GateError(
            f"{model_name} version {served.version} is served from {served.version_uri} but no "
            "tracking URI was given, so the champion cannot be looked up; set tracking_uri to the "
            "MLflow server that registered it (or point model_base_path at where nothing is served)"
        )
    try:
        return find_champion(tracking_uri, model_name)
    except (RegistryError, MlflowException) as exc:
        if served is None:
            raise
        raise GateError(
            f"{model_name} version {served.version} is served from {served.version_uri} but the "
            f"model registry at {tracking_uri} cannot be read ({str(exc)[:200]}); start the MLflow "
            "server or fix tracking_uri, then re-run: the gate will not bless a model blind"
        ) from None


@dataclass(frozen=True)
class ChampionLookup:
    """The re-scored champion (None on a first deployment) and a note on how it was found."""

    evaluation: ChampionEvaluation | None
    notes: list[str]


def score_champion(
    tracking_uri: str | None,
    model_name: str,
    model_base_path: str | None,
    split_dir: Path,
    external_splits: dict[str, Path] | None = None,
) -> ChampionLookup:
    """Find the champion and re-score it on `split_dir`'s test split and the external sets.

    The registry's `champion` is used when there is one; a version served under
    `model_base_path` that the registry does not know (deployed without tracking) is scored as
    the champion all the same, so a worse model never replaces it unchecked.
    """
    from tumorflow.components.release.registry import TAG_SERVING_VERSION

    served = serving_layout.served_version(model_base_path, model_name) if model_base_path else None
    model_version = _registry_champion(tracking_uri, model_name, served)
    if model_version is None and served is None:
        return ChampionLookup(None, [])
    work_dir = Path(tempfile.mkdtemp(prefix="tumorflow-champion-"))
    try:
        if model_version is not None:
            evaluation = evaluate_champion(
                champion_saved_model(tracking_uri, model_version, work_dir),
                split_dir,
                version=model_version.version,
                serving_version=model_version.tags.get(TAG_SERVING_VERSION),
                external_splits=external_splits,
            )
            return ChampionLookup(evaluation, [])
        evaluation = evaluate_champion(
            _local_copy(served.version_uri, work_dir),
            split_dir,
            serving_version=str(served.version),
            external_splits=external_splits,
        )
        note = (
            f"The registry has no champion of {model_name}: the served version {served.version} "
            "was re-scored as the champion."
        )
        return ChampionLookup(evaluation, [note])
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
