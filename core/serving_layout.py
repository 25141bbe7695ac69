"""The served-model layout, in one place: what TF Serving reads and what deploy, rollback,
promote, the drift monitor and `tumorflow serve` agree on.

    <model_base_path>/
        models.config                    TF Serving ModelServerConfig (text proto)
        <model_name>/<version>/          one SavedModel per integer version
            saved_model.pb, variables/   the exported model (what was gated)
            assets.extra/                tumorflow.json, the drift reference, warm-up requests,
                                         release.json (the signed decisions that released it)

`models.config` loads a `specific` set of versions and labels them `stable`, `previous` and
`canary`. TF Serving answers a request that names neither a version nor a label with the highest
loaded version, so the loaded set never holds a version above `stable` except the `canary`: after
a rollback the version rolled back from stops being loaded and every request moves. Writers edit
the file through `edit_serving_config`: a lock for local paths, a GCS generation precondition for
`gs://` ones, so two concurrent deploys or rollbacks never lose one another's change.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tumorflow.core import storage
from tumorflow.core.errors import ConfigError

log = logging.getLogger(__name__)

MODELS_CONFIG = "models.config"
SAVED_MODEL = "saved_model.pb"
ASSETS_EXTRA = "assets.extra"
# Written into assets.extra/ by export and deploy.
MODEL_INFO = "tumorflow.json"
DRIFT_REFERENCE = "drift_reference.parquet"
DRIFT_PROJECTION = "drift_projection.npz"
WARMUP_FILE = "tf_serving_warmup_requests"
# The signed decisions that released a version (deploy writes it; `tumorflow serve` checks it).
RELEASE_RECORD = "release.json"
# Beside models.config: the trust root `tumorflow serve` checks release records with by default.
TRUST_ROOT_FILE = "trust_root.yaml"

STABLE = "stable"
PREVIOUS = "previous"
CANARY = "canary"

# Read-modify-write attempts of a gs:// models.config before giving up on a busy writer.
_MAX_CONFLICTS = 20
_MAX_BACKOFF_S = 2.0

T = TypeVar("T")


def models_config_uri(model_base_path: str) -> str:
    return storage.join(model_base_path, MODELS_CONFIG)


def model_root(model_base_path: str, model_name: str) -> str:
    return storage.join(model_base_path, model_name)


def version_uri(model_base_path: str, model_name: str, version: int) -> str:
    return storage.join(model_base_path, model_name, str(version))


def asset_uri(version_folder: str | Path, name: str) -> str:
    """A file of a version's `assets.extra/` (local path or gs:// URI)."""
    return storage.join(version_folder, ASSETS_EXTRA, name)


def complete_versions(model_root_uri: str) -> list[int]:
    """Integer version folders under one model's root that hold a `saved_model.pb`, ascending.

    A gs:// version is uploaded with `saved_model.pb` last, so a version listed here is whole.
    """
    if not storage.exists(model_root_uri):
        return []
    return sorted(
        int(parts[0])
        for parts in (name.split("/") for name in storage.list_files(model_root_uri))
        if parts[0].isdigit() and parts[1:] == [SAVED_MODEL]
    )


def served_versions(model_base_path: str, model_name: str) -> list[int]:
    """Integer versions under `<base>/<name>/` that hold a complete SavedModel, ascending."""
    return complete_versions(model_root(model_base_path, model_name))


def taken_versions(model_base_path: str, model_name: str) -> set[int]:
    """Every integer version folder, complete or not (a new version takes a higher number)."""
    root = model_root(model_base_path, model_name)
    if not storage.exists(root):
        return set()
    return {int(n.split("/")[0]) for n in storage.list_files(root) if n.split("/")[0].isdigit()}


def parse_model_server_config(text: str, source: str) -> Any:
    """Parse TF Serving's text-proto ModelServerConfig; ConfigError names `source` when bad."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source} is not a valid ModelServerConfig text proto: {exc}") from None
    return config


def read_serving_config(model_base_path: str) -> Any:
    """The ModelServerConfig of `<base>/models.config` (empty when there is none)."""
    config, _ = _read_with_generation(model_base_path)
    return config


def _read_with_generation(model_base_path: str) -> tuple[Any, int]:
    uri = models_config_uri(model_base_path)
    data, generation = storage.read_versioned(uri)
    return parse_model_server_config((data or b"").decode(), uri), generation


def model_entry(config: Any, model_name: str) -> Any | None:
    return next((e for e in config.model_config_list.config if e.name == model_name), None)


def serving_labels(model_base_path: str, model_name: str) -> tuple[dict[str, int], list[int]]:
    """(version labels, versions to load) of one model in models.config."""
    entry = model_entry(read_serving_config(model_base_path), model_name)
    if entry is None:
        return {}, []
    return dict(entry.version_labels), list(entry.model_version_policy.specific.versions)


@contextlib.contextmanager
def _local_lock(model_base_path: str) -> Iterator[None]:
    Path(model_base_path).mkdir(parents=True, exist_ok=True)
    with open(Path(model_base_path) / ".models.config.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def edit_serving_config(model_base_path: str, edit: Callable[[Any], T]) -> T:
    """Read models.config, let `edit` change the message in place, write it back atomically.

    Local base paths hold a file lock for the whole read-modify-write. gs:// ones write with a
    generation precondition and, when another writer won, read again and re-run `edit` (which
    must therefore decide from the message it is given, not from an earlier read).
    """
    from google.protobuf import text_format

    uri = models_config_uri(model_base_path)
    if not storage.is_remote(model_base_path):
        with _local_lock(model_base_path):
            config, generation = _read_with_generation(model_base_path)
            result = edit(config)
            storage.write_versioned(uri, text_format.MessageToString(config).encode(), generation)
            return result
    for attempt in range(_MAX_CONFLICTS):
        config, generation = _read_with_generation(model_base_path)
        result = edit(config)
        try:
            storage.write_versioned(uri, text_format.MessageToString(config).encode(), generation)
            return result
        except storage.ConcurrentWriteError:
            log.info("%s changed while it was edited; reading it again", uri)
            # GCS allows about one write a second to one object: back off, with jitter so that
            # the writers that lost together do not collide again.
            time.sleep(random.uniform(0, min(_MAX_BACKOFF_S, 0.05 * 2**attempt)))
    raise storage.ConcurrentWriteError(
        f"{uri} kept changing under {_MAX_CONFLICTS} attempts to edit it; try again"
    )


def versions_to_load(
    available: list[int], stable: int, canary: int | None, keep_versions: int
) -> list[int]:
    """`stable`, the canary, and the newest versions below `stable`, up to `keep_versions`.

    Nothing above `stable` but the canary is loaded: TF Serving sends unlabelled requests to the
    highest loaded version, which must be the one that is meant to answer them.
    """
    loaded = {stable} | ({canary} if canary is not None else set())
    for version in sorted((v for v in available if v < stable), reverse=True):
        if len(loaded) >= keep_versions:
            break
        loaded.add(version)
    return sorted(loaded)


def set_served_versions(
    config: Any,
    model_base_path: str,
    model_name: str,
    *,
    stable: int,
    keep_versions: int,
    canary: int | None = None,
    available: list[int] | None = None,
) -> list[int]:
    """Point `stable` (and `canary`) of `model_name` in `config`; `previous` is the highest loaded
    version below `stable`. Other models' entries are kept. Returns the versions loaded."""
    if available is None:
        available = served_versions(model_base_path, model_name)
    loaded = versions_to_load(available, stable, canary, keep_versions)
    entry = model_entry(config, model_name) or config.model_config_list.config.add()
    entry.Clear()
    entry.name = model_name
    base = model_root(model_base_path, model_name)
    entry.base_path = base if storage.is_remote(base) else str(Path(base).resolve())
    entry.model_platform = "tensorflow"
    entry.model_version_policy.specific.versions.extend(loaded)
    entry.version_labels[STABLE] = stable
    older = [v for v in loaded if v < stable]
    if older:
        entry.version_labels[PREVIOUS] = older[-1]
    if canary is not None:
        entry.version_labels[CANARY] = canary
    log.info(
        "models.config: %s stable=%s previous=%s canary=%s loads %s",
        model_name,
        stable,
        older[-1] if older else None,
        canary,
        loaded,
    )
    return loaded


@dataclass(frozen=True)
class ServedVersion:
    """The served champion (labelled `stable`, else the highest version) and where it lives."""

    version: int
    version_uri: str

    def asset(self, name: str) -> str:
        return asset_uri(self.version_uri, name)

    @property
    def reference_uri(self) -> str:
        return self.asset(DRIFT_REFERENCE)

    @property
    def is_local(self) -> bool:
        return not storage.is_remote(self.version_uri)


def served_version(model_base_path: str, model_name: str) -> ServedVersion | None:
    """The version of `model_name` that answers its requests: `stable` in models.config, else
    the highest complete version folder (a half-uploaded one is not served). None when nothing
    is deployed yet."""
    base = model_root(model_base_path, model_name)
    version = None
    if storage.exists(models_config_uri(model_base_path)):
        entry = model_entry(read_serving_config(model_base_path), model_name)
        if entry is not None:
            base = entry.base_path or base
            if STABLE in entry.version_labels:
                version = int(entry.version_labels[STABLE])
    if version is None:
        versions = complete_versions(base)
        if not versions:
            return None
        version = versions[-1]
    return ServedVersion(version=version, version_uri=storage.join(base, str(version)))
