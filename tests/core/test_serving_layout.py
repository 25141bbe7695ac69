"""The served-model layout: which versions models.config loads and labels, the served-version
lookup, and concurrent edits of models.config (local lock; GCS generation preconditions on the
emulator)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from tumorflow.core import serving_layout, storage
from tumorflow.core.serving_layout import (
    CANARY,
    PREVIOUS,
    STABLE,
    edit_serving_config,
    read_serving_config,
    served_version,
    serving_labels,
    set_served_versions,
    versions_to_load,
)


def test_stable_and_the_newest_older_versions_are_loaded() -> None:
    assert versions_to_load([1, 2, 3, 4, 5], stable=5, canary=None, keep_versions=2) == [4, 5]
    assert versions_to_load([1, 2, 3, 4, 5], stable=5, canary=None, keep_versions=1) == [5]
    assert versions_to_load([1, 2], stable=2, canary=None, keep_versions=5) == [1, 2]


def test_after_a_rollback_nothing_above_stable_is_loaded() -> None:
    """TF Serving answers unlabelled requests with the highest loaded version: it must be stable."""
    loaded = versions_to_load([1, 2, 3, 4], stable=2, canary=None, keep_versions=3)
    assert loaded == [1, 2]
    assert max(loaded) == 2


def test_a_canary_is_loaded_above_stable_and_counts_towards_keep_versions() -> None:
    assert versions_to_load([1, 2, 3], stable=2, canary=3, keep_versions=3) == [1, 2, 3]
    assert versions_to_load([1, 2, 3], stable=2, canary=3, keep_versions=2) == [2, 3]


def _config_with_other_model() -> object:
    config = serving_layout.parse_model_server_config(
        'model_config_list { config { name: "brain-mri" base_path: "gs://b/brain-mri" '
        'model_platform: "tensorflow" version_labels { key: "stable" value: 7 } } }',
        "test",
    )
    return config


def test_set_served_versions_labels_one_model_and_keeps_the_others(tmp_path: Path) -> None:
    config = _config_with_other_model()
    base = str(tmp_path / "models")
    loaded = set_served_versions(
        config, base, "kidney-ct", stable=3, keep_versions=2, available=[1, 2, 3]
    )
    assert loaded == [2, 3]
    entry = serving_layout.model_entry(config, "kidney-ct")
    assert dict(entry.version_labels) == {STABLE: 3, PREVIOUS: 2}
    assert list(entry.model_version_policy.specific.versions) == [2, 3]
    assert entry.base_path == str((tmp_path / "models" / "kidney-ct").resolve())
    other = serving_layout.model_entry(config, "brain-mri")
    assert other.base_path == "gs://b/brain-mri" and dict(other.version_labels) == {STABLE: 7}

    set_served_versions(config, base, "kidney-ct", stable=2, keep_versions=2, available=[1, 2, 3])
    assert dict(entry.version_labels) == {STABLE: 2, PREVIOUS: 1}
    assert list(entry.model_version_policy.specific.versions) == [1, 2]
    set_served_versions(
        config, base, "kidney-ct", stable=2, canary=3, keep_versions=3, available=[1, 2, 3]
    )
    assert dict(entry.version_labels) == {STABLE: 2, PREVIOUS: 1, CANARY: 3}
    assert [e.name for e in config.model_config_list.config] == ["brain-mri", "kidney-ct"]


def test_set_served_versions_keeps_gs_base_paths_as_uris() -> None:
    config = _config_with_other_model()
    set_served_versions(
        config, "gs://bucket/serving", "kidney-ct", stable=1, keep_versions=2, available=[1]
    )
    entry = serving_layout.model_entry(config, "kidney-ct")
    assert entry.base_path == "gs://bucket/serving/kidney-ct"
    assert PREVIOUS not in entry.version_labels


def _install(base: Path, name: str, version: int, complete: bool = True) -> Path:
    folder = base / name / str(version)
    (folder / "variables").mkdir(parents=True)
    if complete:
        (folder / serving_layout.SAVED_MODEL).write_bytes(b"graph")
    return folder


def test_served_version_is_stable_else_the_highest_complete_folder(tmp_path: Path) -> None:
    base = tmp_path / "models"
    assert served_version(str(base), "kidney-ct") is None
    for version in (1, 2):
        _install(base, "kidney-ct", version)
    _install(base, "kidney-ct", 3, complete=False)
    found = served_version(str(base), "kidney-ct")
    assert found is not None and found.version == 2
    assert found.reference_uri == str(
        base / "kidney-ct" / "2" / serving_layout.ASSETS_EXTRA / serving_layout.DRIFT_REFERENCE
    )
    edit_serving_config(
        str(base),
        lambda config: set_served_versions(
            config, str(base), "kidney-ct", stable=1, keep_versions=2
        ),
    )
    found = served_version(str(base), "kidney-ct")
    assert found is not None and found.version == 1 and found.is_local
    assert Path(found.version_uri) == (base / "kidney-ct" / "1").resolve()
    assert serving_labels(str(base), "kidney-ct") == ({STABLE: 1}, [1])


def _add_models_concurrently(base: str, count: int) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def add(index: int) -> None:
        try:
            barrier.wait()
            edit_serving_config(
                base,
                lambda config: set_served_versions(
                    config, base, f"model-{index}", stable=1, keep_versions=1, available=[1]
                ),
            )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


def test_concurrent_local_writers_lose_no_entry(tmp_path: Path) -> None:
    _add_models_concurrently(str(tmp_path / "models"), 8)
    names = {e.name for e in read_serving_config(str(tmp_path / "models")).model_config_list.config}
    assert names == {f"model-{i}" for i in range(8)}


def test_concurrent_gcs_writers_lose_no_entry(gcs_emulator_preconditions: str) -> None:
    base = f"gs://tumorflow-test/{uuid.uuid4().hex}/serving"
    _add_models_concurrently(base, 6)
    config = read_serving_config(base)
    assert {e.name for e in config.model_config_list.config} == {f"model-{i}" for i in range(6)}
    assert all(
        e.base_path == f"{base}/{e.name}" and e.version_labels[STABLE] == 1
        for e in config.model_config_list.config
    )


def test_a_write_from_a_stale_read_is_refused(gcs_emulator_preconditions: str) -> None:
    uri = f"gs://tumorflow-test/{uuid.uuid4().hex}/models.config"
    assert storage.read_versioned(uri) == (None, 0)
    storage.write_versioned(uri, b"first", 0)
    with pytest.raises(storage.ConcurrentWriteError, match="another writer"):
        storage.write_versioned(uri, b"must not exist yet", 0)
    data, generation = storage.read_versioned(uri)
    assert data == b"first" and generation > 0
    storage.write_versioned(uri, b"second", generation)
    with pytest.raises(storage.ConcurrentWriteError, match="another writer"):
        storage.write_versioned(uri, b"from the stale read", generation)
    assert storage.read_versioned(uri)[0] == b"second"
