"""The MLflow model registry side of tumorflow: candidates, aliases and the tags that record decisions.

A registered model version per pipeline run holds the model folder (model.keras, model_info.json)
and tags (docs/artifacts.md "MLflow conventions"). Alias `champion` is the served (`stable`)
version, `previous` the one it replaced. Every function takes the tracking URI and connects
with a quick reachability check, so a server that is down is reported at once instead of after
minutes of HTTP retries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorflow.core.artifacts import MODEL_INFO_FILE
from tumorflow.core.errors import TumorflowError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
TAG_PIPELINE_RUN = "tumorflow.pipeline_run"
TAG_GATE_PASSED = "gate.passed"
TAG_SERVING_VERSION = "serving_version"
TAG_SERVING_PATH = "serving_path"
# The `saved_model_sha256` of the published SavedModel.
TAG_SERVING_DIGEST = "serving_digest"
# Why the run that made this version started (a drift alarm, a schedule); empty: by hand.
TAG_TRIGGER_REASON = "tumorflow.trigger_reason"
# The code that made a candidate (`code_version()`), for its release record.
TAG_CODE_VERSION = "tumorflow.code_version"
# Which approval policy a version's approval obeyed ("manual") and where it came from.
TAG_APPROVAL_POLICY_APPLIED = "approval.policy"
TAG_APPROVAL_POLICY_SOURCE = "approval.policy_source"
# Signed decisions (components/release/signing.py SignedRecord JSON): `decision.<seq>.<action>`.
TAG_DECISION_PREFIX = "decision."
# What a candidate was registered as (read by whoever signs a decision about it; the waiting run
# checks decisions against the artifacts it holds, not against these).
TAG_CANDIDATE_SERVING_DIGEST = "candidate.serving_digest"
TAG_CANDIDATE_DECISION_DIGEST = "candidate.decision_digest"
TAG_CANDIDATE_DATASET_VERSION = "candidate.dataset_version"
# Every decision on a candidate that was refused, and why (for people; nothing trusts it).
TAG_APPROVAL_REFUSED = "approval.refused"
MODEL_ARTIFACT = "tumorflow_model"
# Where the train step logs the model folder in its MLflow run.
TRAINING_ARTIFACT = "model"
DEFAULT_EXPERIMENT = "tumorflow"


class RegistryError(TumorflowError):
    """The model registry cannot be reached or does not hold what was asked for."""


def connect(tracking_uri: str) -> MlflowClient:
    """An MlflowClient for `tracking_uri`, after checking that an HTTP server answers."""
    from mlflow import MlflowClient

    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryError(
                f"the MLflow tracking server at {tracking_uri} is not reachable ({exc}); "
                "start it or pass the right --tracking-uri"
            ) from None
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _registered_model(client: MlflowClient, model_name: str) -> RegisteredModel | None:
    """The registered model, or None when it is not registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model_name)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise RegistryError(f"cannot read registered model {model_name}: {exc}") from None


def aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    """Alias -> version of a registered model ({} when the model is not registered yet)."""
    model = _registered_model(client, model_name)
    return dict(model.aliases) if model is not None else {}


def version_by_alias(client: MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    version = aliases(client, model_name).get(alias)
    return client.get_model_version(model_name, version) if version else None


def find_champion(tracking_uri: str, model_name: str) -> ModelVersion | None:
    """The registered version with alias `champion`, or None when nothing was deployed yet."""
    return version_by_alias(connect(tracking_uri), model_name, CHAMPION)


def find_version_by_run(
    client: MlflowClient, pipeline_run: str, model_name: str | None = None
) -> ModelVersion | None:
    """The model version tagged with `pipeline_run` (the newest if several), or None."""
    query = f"tags.`{TAG_PIPELINE_RUN}` = '{pipeline_run}'"
    if model_name:
        query = f"name = '{model_name}' and {query}"
    found = client.search_model_versions(query)
    return max(found, key=lambda mv: int(mv.version)) if found else None


def list_versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    """Every version of a registered model, newest first."""
    found = client.search_model_versions(f"name = '{model_name}'")
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


def _model_source(client: MlflowClient, model_dir: Path, experiment: str) -> tuple[str, str]:
    """(source URI, run id) of the model folder as an artifact of its training run.

    The train step logs the folder under `model/`; if it did not, the folder is logged to the
    training run named in model_info.json when that run is on this server, else to a new run.
    """
    from mlflow.exceptions import MlflowException

    info = json.loads((Path(model_dir) / MODEL_INFO_FILE).read_text())
    run_id = info.get("mlflow_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("training run %s is not on this tracking server; logging anew", run_id)
            run_id = None
    if run_id is None:
        experiment_id = _experiment_id(client, experiment)
        run_id = client.create_run(experiment_id, run_name="register-model").info.run_id
        client.set_terminated(run_id)
    for path in (TRAINING_ARTIFACT, MODEL_ARTIFACT):
        if f"{path}/model_info.json" in {item.path for item in client.list_artifacts(run_id, path)}:
            return f"runs:/{run_id}/{path}", run_id
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(experiment)


def _ensure_registered(client: MlflowClient, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    if _registered_model(client, model_name) is not None:
        return
    try:
        client.create_registered_model(model_name, description="tumorflow tumor classifier")
    except MlflowException as exc:  # registered meanwhile by a concurrent run
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def register_model_version(
    client: MlflowClient,
    model_name: str,
    model_dir: Path,
    tags: dict[str, str],
    experiment: str = DEFAULT_EXPERIMENT,
) -> ModelVersion:
    """Register the model folder as a new version of `model_name` with `tags`."""
    _ensure_registered(client, model_name)
    source, run_id = _model_source(client, model_dir, experiment)
    version = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    log.info("registered %s version %s from %s", model_name, version.version, source)
    return version


def register_candidate(
    tracking_uri: str,
    model_name: str,
    model_dir: Path,
    decision: dict[str, Any],
    pipeline_run: str,
    experiment: str = DEFAULT_EXPERIMENT,
    trigger_reason: str = "",
    digests: dict[str, str] | None = None,
) -> ModelVersion:
    """Register (once per pipeline run) the model version that waits for approval and deploy;
    `digests`: the candidate.* tags saying which artifact a decision is about."""
    client = connect(tracking_uri)
    existing = find_version_by_run(client, pipeline_run, model_name)
    if existing is not None:
        return existing
    tags = {
        TAG_PIPELINE_RUN: pipeline_run,
        TAG_GATE_PASSED: str(bool(decision["passed"])).lower(),
        "approval.status": "pending",
    }
    if trigger_reason:
        tags[TAG_TRIGGER_REASON] = trigger_reason[:5000]
    tags[TAG_CODE_VERSION] = code_version()
    tags.update({key: value for key, value in (digests or {}).items() if value})
    return register_model_version(client, model_name, model_dir, tags, experiment)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`tumorflow 0.1.0 sha256:...`: the package version and a digest of every source file of the
    code that runs this pipeline (its relative paths and bytes, tests left out), so a release
    record names the code that made a version, in a checkout and in the image alike."""
    from importlib.metadata import PackageNotFoundError, version

    import tumorflow

    root = Path(tumorflow.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(_source_files(root)):
        relative = path.relative_to(root).as_posix()
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        number = version("tumorflow")
    except PackageNotFoundError:
        number = "unknown"
    return f"tumorflow {number} sha256:{digest.hexdigest()}"


def _source_files(root: Path) -> list[Path]:
    """The `*.py` files under `root` that make the code version: not under `tests/` or
    `notebooks/` at the top, nor under any hidden folder (a checkout's `.venv`, `.git`), which
    are not walked at all (a virtual environment holds some 100,000 files)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        top = Path(folder) == root
        subfolders[:] = [
            name
            for name in subfolders
            if not name.startswith(".") and not (top and name in ("tests", "notebooks"))
        ]
        found += [Path(folder, name) for name in files if name.endswith(".py")]
    return [path for path in found if not path.name.startswith(".")]


def decision_tags(tags: dict[str, str]) -> list[tuple[str, str]]:
    """The `decision.<seq>.<action>` tags of a model version, in order."""

    def seq(key: str) -> int:
        part = key.split(".")[1]
        return int(part) if part.isdigit() else 0

    found = [(k, v) for k, v in tags.items() if k.startswith(TAG_DECISION_PREFIX)]
    return sorted(found, key=lambda item: seq(item[0]))


def set_version_tags(client: Any, model_name: str, version: str, tags: dict[str, str]) -> None:
    """Set model-version tags in the order given. Two writers setting the same new tag at once
    (a `tumorflow approve` and the waiting approval step both write the display tags) can make
    an MLflow server on SQLite answer with a unique-constraint error for the second: the tag is
    then there, and setting it again updates it, so that one is retried."""
    for key, value in tags.items():
        for attempt in range(4):
            try:
                client.set_model_version_tag(model_name, version, key, value)
                break
            except Exception as exc:  # mlflow's RestException / MlflowException
                if attempt == 3 or "UNIQUE constraint" not in str(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))


def store_decision(client: Any, model_name: str, version: str, signed: Any) -> str:
    """Put a signed record (components/release/signing.py SignedRecord) on a model version as tag
    `decision.<seq>.<action>`; return the tag."""
    current = client.get_model_version(model_name, version)
    tag = f"{TAG_DECISION_PREFIX}{len(decision_tags(current.tags)) + 1}.{signed.record['action']}"
    set_version_tags(client, model_name, version, {tag: signed.to_json()})
    return tag


def move_champion(client: MlflowClient, model_name: str, version: str) -> str | None:
    """Point `champion` at `version` and `previous` at the old champion; return the old one."""
    old = aliases(client, model_name).get(CHAMPION)
    if old is not None and old != str(version):
        client.set_registered_model_alias(model_name, PREVIOUS, old)
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    return old


def download_model_folder(client: MlflowClient, model_version: ModelVersion) -> Path:
    """Download a registered version's model folder to a temporary directory."""
    import mlflow.artifacts

    target = Path(tempfile.mkdtemp(prefix=f"tumorflow-{model_version.name}-"))
    mlflow.artifacts.download_artifacts(
        artifact_uri=model_version.source, dst_path=str(target), tracking_uri=client.tracking_uri
    )
    found = next(target.rglob(MODEL_INFO_FILE), None)
    if found is None:
        raise RegistryError(
            f"{model_version.name} version {model_version.version} ({model_version.source}) "
            "holds no tumorflow model folder"
        )
    return found.parent
