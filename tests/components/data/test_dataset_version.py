"""Dataset versions: a fingerprint that changes exactly when the data does, for every source kind."""

from __future__ import annotations

import tarfile
from pathlib import Path

import kagglehub
import pytest

from tumorflow.components.data.dataset_version import resolve_dataset_version
from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.manifest import manifest_fingerprint, read_manifest
from tumorflow.core import storage
from tumorflow.core.config import DatasetConfig, PhantomConfig
from tumorflow.core.errors import DatasetError, SourceUnavailableError


def _folder(root: Path, per_class: int = 2) -> Path:
    for label in ("cyst", "normal"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            (root / label / f"{label}-{index}.png").write_bytes(f"{label} {index}".encode())
    (root / "notes.txt").write_text("not part of the dataset")
    return root


def _version(source: str | Path, **fields) -> str:
    return resolve_dataset_version(DatasetConfig(source=str(source), **fields)).fingerprint


def test_a_folder_changes_version_exactly_when_its_images_or_labels_change(tmp_path: Path):
    folder = _folder(tmp_path / "data")
    first = _version(folder)
    assert first.startswith("sha256:") and _version(folder) == first
    (folder / "cyst" / ".DS_Store").write_bytes(b"junk")  # not listed: not a change
    (folder / "cyst" / "readme.md").write_text("also not an image")
    assert _version(folder) == first
    (folder / "normal" / "normal-9.png").write_bytes(b"a new slice")
    grown = _version(folder)
    assert grown != first
    (folder / "normal" / "normal-9.png").write_bytes(b"the same slice, rewritten")
    assert _version(folder) not in (first, grown)
    (folder / "normal" / "normal-9.png").unlink()
    assert _version(folder) == first
    (folder / "normal" / "normal-1.png").rename(folder / "cyst" / "normal-1.png")
    assert _version(folder) != first  # relabelled
    assert _version(folder, class_map={"cyst": "cyst"}) != _version(folder)


def test_the_download_records_the_version_the_pipeline_resolved(tmp_path: Path):
    folder = _folder(tmp_path / "data")
    version = resolve_dataset_version(DatasetConfig(source=str(folder)))
    result = download_dataset(str(folder), tmp_path / "raw", DatasetConfig(), version)
    assert result.dataset_version == version.fingerprint
    assert result.summary()["dataset_version"] == version.fingerprint
    # the folder's version is the fingerprint of the manifest the download wrote
    assert manifest_fingerprint(read_manifest(tmp_path / "raw")) == version.fingerprint


def test_a_folder_that_changes_between_version_and_download_is_refused(tmp_path: Path):
    folder = _folder(tmp_path / "data")
    version = resolve_dataset_version(DatasetConfig(source=str(folder)))
    (folder / "cyst" / "cyst-7.png").write_bytes(b"arrived in between")
    with pytest.raises(DatasetError, match="changed while it was being downloaded"):
        download_dataset(str(folder), tmp_path / "raw", DatasetConfig(), version)


def test_an_archive_is_versioned_by_its_bytes(tmp_path: Path):
    folder = _folder(tmp_path / "data")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="data")
    first = _version(archive)
    assert _version(archive) == first
    (folder / "cyst" / "cyst-5.png").write_bytes(b"more")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="data")
    assert _version(archive) != first


def test_the_phantom_is_versioned_by_its_generator_settings():
    first = resolve_dataset_version(DatasetConfig()).fingerprint
    assert resolve_dataset_version(DatasetConfig()).fingerprint == first
    other = DatasetConfig(phantom=PhantomConfig(per_class=120))
    assert resolve_dataset_version(other).fingerprint != first


def test_a_gcs_prefix_is_versioned_by_object_names_and_generations(
    tmp_path: Path, gcs_emulator: str
):
    folder = _folder(tmp_path / "data")
    prefix = "gs://tumorflow-test/versions-test"
    storage.upload_tree(folder, prefix)
    first = _version(prefix)
    assert _version(prefix) == first
    # the same bytes written again are a new generation: the data may have changed
    storage.upload_file(folder / "cyst" / "cyst-0.png", f"{prefix}/cyst/cyst-0.png")
    rewritten = _version(prefix)
    assert rewritten != first
    (tmp_path / "extra.png").write_bytes(b"new")
    storage.upload_file(tmp_path / "extra.png", f"{prefix}/normal/extra.png")
    assert _version(prefix) not in (first, rewritten)
    with pytest.raises(SourceUnavailableError, match="holds no objects"):
        _version("gs://tumorflow-test/nothing-here")


def test_an_unpinned_kaggle_handle_is_pinned_to_the_version_it_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    latest = {"version": 3}

    def fake_download(handle: str, *args, **kwargs) -> str:
        folder = tmp_path / "kagglehub" / handle / "versions" / str(latest["version"])
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    version = resolve_dataset_version(DatasetConfig(source="kaggle:owner/slug"))
    assert version.source == "kaggle:owner/slug/versions/3"
    assert resolve_dataset_version(DatasetConfig(source="kaggle:owner/slug")) == version
    latest["version"] = 4
    newer = resolve_dataset_version(DatasetConfig(source="kaggle:owner/slug"))
    assert newer.source == "kaggle:owner/slug/versions/4"
    assert newer.fingerprint != version.fingerprint


def test_a_missing_source_is_one_clear_error(tmp_path: Path):
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        _version(tmp_path / "nowhere")
