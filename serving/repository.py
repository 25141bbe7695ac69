"""The model repository: watches `<base_path>/<version>/` folders and keeps the right versions loaded.

It behaves like TF Serving's file-system source with an availability-preserving policy: a new
version is loaded and warmed up before an older one is dropped; a version folder that fails to
load (half written, corrupt) is reported with state END and its error, never served, and retried
only once its contents change. Requests resolve by version, label or the highest loaded
version (as TF Serving does); an unloaded version stays alive for requests that already hold it.

The config file and `gs://` model base paths are read through `core.storage` (the
google-cloud-storage client, which honours STORAGE_EMULATOR_HOST; TensorFlow's own GCS file
system does not): a gs:// version counts once its `saved_model.pb` is there and is downloaded to
a local cache folder before it is loaded. Other paths are read with `tf.io.gfile`.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from tumorflow.components.release.deploy import release_status
from tumorflow.components.release.trust_root import TrustRoot
from tumorflow.core import serving_layout, storage
from tumorflow.core.errors import ConfigError, SourceUnavailableError
from tumorflow.serving.servable import Servable
from tumorflow.serving.status import failed_precondition, invalid_argument, not_found

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
ModelServerConfig = model_server_config_pb2.ModelServerConfig


def single_model_config(name: str, base_path: str) -> ModelServerConfig:
    """The config `--model_name`/`--model_base_path` stand for: one model, latest version."""
    config = ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = base_path
    model.model_platform = "tensorflow"
    return config


def read_model_config(path: str) -> ModelServerConfig:
    """Parse TF Serving's text-proto ModelServerConfig file (local or gs://); ConfigError says
    what is wrong."""
    try:
        data, _ = storage.read_versioned(path)
    except (SourceUnavailableError, OSError) as exc:
        raise ConfigError(f"cannot read --model_config_file {path}: {exc}") from None
    if data is None:
        raise ConfigError(f"cannot read --model_config_file {path}: there is no such file")
    config = serving_layout.parse_model_server_config(data.decode(), path)
    validate_config(config)
    return config


def validate_config(config: ModelServerConfig) -> None:
    """Refuse configs TF Serving refuses: custom configs, unnamed or duplicate models."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError("custom_model_config is not supported; use model_config_list")
    names = [model.name for model in config.model_config_list.config]
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ConfigError("every model in model_config_list needs a name and a base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise ConfigError(
                f"model {model.name}: model_platform {model.model_platform!r} is not supported"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"model names appear more than once in the config: {duplicates}")


@dataclass
class VersionStatus:
    """What GetModelStatus reports for one version."""

    state: int
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


@dataclass
class _Model:
    config: model_server_config_pb2.ModelConfig
    servables: dict[int, Servable] = field(default_factory=dict)
    statuses: dict[int, VersionStatus] = field(default_factory=dict)
    # version -> fingerprint of the folder contents that failed to load
    failed: dict[int, tuple] = field(default_factory=dict)


def _is_local(path: str) -> bool:
    return "://" not in path


def _fingerprint(path: str) -> tuple:
    """A cheap identity of a folder's contents (names, sizes, mtimes) to notice rewrites;
    for a gs:// version, the names of its objects."""
    if storage.is_remote(path):
        return tuple(storage.list_files(path))
    entries = []
    for root, _, files in tf.io.gfile.walk(path):
        for name in files:
            full = posixpath.join(root, name)
            try:
                stat = tf.io.gfile.stat(full)
            except tf.errors.NotFoundError:
                continue
            entries.append((posixpath.relpath(full, path), stat.length, stat.mtime_nsec))
    return tuple(sorted(entries))


class ModelRepository:
    """Loads, serves and unloads model versions according to a ModelServerConfig."""

    def __init__(
        self,
        config: ModelServerConfig,
        *,
        poll_wait_seconds: float = 1.0,
        on_loaded: Callable[[Servable], None] | None = None,
        cache_dir: str | None = None,
        trust: TrustRoot | None = None,
    ) -> None:
        """`cache_dir` receives local copies of gs:// versions (default: a temporary folder,
        removed by `stop`). With a `trust` root a version loads only when its release record
        (assets.extra/release.json) verifies and names its SavedModel's digest; otherwise it is
        reported with state END, "not loaded: unsigned ...", and retried once it changes."""
        validate_config(config)
        self._trust = trust
        self.poll_wait_seconds = poll_wait_seconds
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self._own_cache = cache_dir is None
        self._on_loaded = on_loaded
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._set_config(config)

    def _set_config(self, config: ModelServerConfig) -> None:
        wanted = {model.name: model for model in config.model_config_list.config}
        with self._lock:
            for name in list(self._models):
                if name not in wanted:
                    removed = self._models.pop(name)
                    for version in list(removed.servables):
                        self._unload(removed, version)
            for name, model_config in wanted.items():
                if name in self._models:
                    self._models[name].config = model_config
                else:
                    self._models[name] = _Model(config=model_config)

    def reload_config(self, config: ModelServerConfig) -> None:
        """Switch to a new ModelServerConfig (HandleReloadConfigRequest) and reconcile now."""
        validate_config(config)
        self._set_config(config)
        self.poll()

    @property
    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def start(self) -> None:
        """Load what is there now, then keep polling in a background thread."""
        self.poll()
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(
                target=self._poll_loop, name="model-repository", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._own_cache and self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll()
            except Exception:
                logger.exception(
                    "model repository poll failed; retrying in %.1fs", self.poll_wait_seconds
                )

    def poll(self) -> None:
        """One reconciliation pass over every configured model."""
        with self._poll_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                self._reconcile(model)

    def _version_dirs(self, model: _Model) -> dict[int, str]:
        base = model.config.base_path
        if storage.is_remote(base):
            versions = serving_layout.complete_versions(base)
            if not versions and not storage.exists(base):
                logger.warning("model %s: base path %s does not exist", model.config.name, base)
            return {version: storage.join(base, str(version)) for version in versions}
        try:
            names = tf.io.gfile.listdir(base)
        except tf.errors.NotFoundError:
            logger.warning("model %s: base path %s does not exist", model.config.name, base)
            return {}
        versions = {}
        for entry in names:
            entry = entry.rstrip("/")
            if entry.isdigit():
                path = posixpath.join(base, entry)
                if tf.io.gfile.isdir(path):
                    versions[int(entry)] = path
        return versions

    def _aspired(self, model: _Model, present: dict[int, str]) -> list[int]:
        policy = model.config.model_version_policy
        kind = policy.WhichOneof("policy_choice")
        usable = sorted(v for v in present if v not in model.failed)
        if kind == "all":
            return usable
        if kind == "specific":
            return [v for v in usable if v in set(policy.specific.versions)]
        count = policy.latest.num_versions if kind == "latest" else 1
        return usable[-max(count, 1) :]

    def _reconcile(self, model: _Model) -> None:
        present = self._version_dirs(model)
        for version in list(model.failed):
            if version not in present:
                del model.failed[version]
            elif _fingerprint(present[version]) != model.failed[version]:
                logger.info(
                    "model %s version %d changed on disk; retrying", model.config.name, version
                )
                del model.failed[version]
        if not present and not model.servables:
            logger.warning(
                "model %s: no versions found under %s", model.config.name, model.config.base_path
            )
        for version in self._aspired(model, present):
            if version not in model.servables:
                self._load(model, version, present[version])
        aspired = set(self._aspired(model, present))
        if aspired & set(model.servables) or not aspired:
            for version in list(model.servables):
                if version not in aspired:
                    self._unload(model, version)

    def _load(self, model: _Model, version: int, path: str) -> None:
        name = model.config.name
        with self._lock:
            model.statuses[version] = VersionStatus(State.LOADING)
        logger.info("loading model %s version %d from %s", name, version, path)
        fingerprint = _fingerprint(path)
        try:
            local = self._local_copy(name, version, path)
        except Exception as exc:
            why = f"failed to copy model {name} version {version} from {path}: {exc}"
            self._not_loaded(model, version, fingerprint, why)
            return
        try:
            unsigned = release_status(local, name, self._trust) if self._trust else None
        except Exception as exc:
            unsigned = f"unsigned: cannot check its release record ({exc})"
        if unsigned is not None:
            message = f"model {name} version {version} not loaded: {unsigned}"
            logger.error("%s", message)
            with self._lock:
                model.failed[version] = fingerprint
                model.statuses[version] = VersionStatus(
                    State.END, grpc.StatusCode.FAILED_PRECONDITION, message
                )
            return
        try:
            servable = Servable(name, version, local)
            warmed = servable.warm_up()
        except Exception as exc:
            why = f"failed to load model {name} version {version} from {path}: {exc}"
            self._not_loaded(model, version, fingerprint, why)
            return
        with self._lock:
            model.servables[version] = servable
            model.statuses[version] = VersionStatus(State.AVAILABLE)
        logger.info("model %s version %d is available (%d warm-up calls)", name, version, warmed)
        if self._on_loaded is not None:
            self._on_loaded(servable)

    def _not_loaded(self, model: _Model, version: int, fingerprint: tuple, message: str) -> None:
        """A version that could not be copied or loaded: logged, reported with state END, and
        not tried again until its files change."""
        logger.error("%s; version %d is not served", message, version)
        with self._lock:
            model.failed[version] = fingerprint
            model.statuses[version] = VersionStatus(State.END, grpc.StatusCode.UNKNOWN, message)

    def _local_copy(self, name: str, version: int, path: str) -> str:
        """`path` itself, or for a gs:// version a fresh copy of it in the cache folder."""
        if not storage.is_remote(path):
            return path
        if self._cache_dir is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="tumorflow-serve-"))
        target = self._cache_dir / name / str(version)
        shutil.rmtree(target, ignore_errors=True)
        storage.download_tree(path, target)
        return str(target)

    def _unload(self, model: _Model, version: int) -> None:
        with self._lock:
            model.statuses[version] = VersionStatus(State.UNLOADING)
            servable = model.servables.pop(version, None)
            model.statuses[version] = VersionStatus(State.END)
        if servable is not None and storage.is_remote(model.config.base_path):
            # The loaded graph and variables are in memory; the cached copy is no longer read.
            shutil.rmtree(servable.path, ignore_errors=True)
        logger.info("unloaded model %s version %d", model.config.name, version)

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        return model

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request names: by version, by label, or the latest available."""
        with self._lock:
            model = self._model(name)
            if label:
                labels = model.config.version_labels
                if label not in labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = labels[label]
                if version not in model.servables:
                    raise failed_precondition(
                        f"label '{label}' of model {name} points to version {version}, "
                        "which is not currently available for inference"
                    )
            if version is not None:
                servable = model.servables.get(version)
                if servable is None:
                    raise not_found(f"Servable not found for request: Specific({name}, {version})")
                return servable
            if not model.servables:
                raise not_found(f"Servable not found for request: Latest({name})")
            return model.servables[max(model.servables)]

    def statuses(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> dict[int, VersionStatus]:
        """GetModelStatus: every known version of `name`, or the one version/label asked for."""
        with self._lock:
            model = self._model(name)
            if label:
                if label not in model.config.version_labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = model.config.version_labels[label]
            if version is not None:
                if version not in model.statuses:
                    raise not_found(f"Could not find version {version} of model {name}")
                return {version: model.statuses[version]}
            if not model.statuses:
                raise not_found(f"Could not find any versions of model {name}")
            return dict(sorted(model.statuses.items()))

    def local_version_dir(self, name: str, version: int) -> Path | None:
        """The folder of a loaded version when it is on the local file system."""
        with self._lock:
            model = self._models.get(name)
            servable = model.servables.get(version) if model else None
        if servable is None or not _is_local(servable.path):
            return None
        return Path(servable.path)
