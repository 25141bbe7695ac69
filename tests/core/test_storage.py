"""The storage layer against local folders and a real GCS JSON API (gcp-storage-emulator)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import free_port

from tumorflow.core import storage
from tumorflow.core.errors import SourceUnavailableError


def _tree(root: Path) -> Path:
    (root / "Cyst").mkdir(parents=True)
    (root / "Cyst" / "a.jpg").write_bytes(b"\xff\xd8 cyst")
    (root / "Normal" / "deep").mkdir(parents=True)
    (root / "Normal" / "deep" / "b.png").write_bytes(b"\x89PNG normal")
    return root


def test_uri_helpers() -> None:
    assert storage.is_remote("gs://bucket/a") and not storage.is_remote("/data/a")
    assert storage.split_uri("gs://bucket/a/b/") == ("bucket", "a/b")
    assert storage.join("gs://bucket/a/", "b", "c.png") == "gs://bucket/a/b/c.png"
    with pytest.raises(SourceUnavailableError, match="names no bucket"):
        storage.split_uri("gs:///a")


def test_local_round_trip(tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    assert storage.list_files(source) == ["Cyst/a.jpg", "Normal/deep/b.png"]
    storage.upload_tree(source, tmp_path / "copy")
    downloaded = storage.download_tree(tmp_path / "copy", tmp_path / "back")
    assert sorted(p.read_bytes() for p in downloaded) == sorted(
        p.read_bytes() for p in source.rglob("*.*")
    )
    assert storage.exists(tmp_path / "back" / "Cyst" / "a.jpg")
    with pytest.raises(SourceUnavailableError, match="not a folder"):
        storage.list_files(tmp_path / "missing")


def test_gcs_round_trip_through_the_real_client(tmp_path: Path, gcs_emulator: str) -> None:
    source = _tree(tmp_path / "src")
    uploaded = storage.upload_tree(source, "gs://tumorflow-test/datasets/kidney")
    assert uploaded == [
        "gs://tumorflow-test/datasets/kidney/Cyst/a.jpg",
        "gs://tumorflow-test/datasets/kidney/Normal/deep/b.png",
    ]
    assert storage.list_files("gs://tumorflow-test/datasets/kidney") == [
        "Cyst/a.jpg",
        "Normal/deep/b.png",
    ]
    assert storage.exists("gs://tumorflow-test/datasets/kidney")
    assert storage.exists("gs://tumorflow-test/datasets/kidney/Cyst/a.jpg")
    assert not storage.exists("gs://tumorflow-test/datasets/absent")
    downloaded = storage.download_tree("gs://tumorflow-test/datasets/kidney", tmp_path / "back")
    assert (tmp_path / "back" / "Normal" / "deep" / "b.png").read_bytes() == b"\x89PNG normal"
    assert len(downloaded) == 2
    single = storage.download_file(
        "gs://tumorflow-test/datasets/kidney/Cyst/a.jpg", tmp_path / "one.jpg"
    )
    assert single.read_bytes() == b"\xff\xd8 cyst"


def test_a_missing_bucket_is_a_clear_error(tmp_path: Path, gcs_emulator: str) -> None:
    with pytest.raises(SourceUnavailableError, match="not found"):
        storage.list_files("gs://no-such-bucket/prefix")
    with pytest.raises(SourceUnavailableError, match="holds no files"):
        storage.download_tree("gs://tumorflow-test/empty-prefix", tmp_path / "out")


def test_unreachable_gcs_fails_fast_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(storage, "RETRY_DEADLINE_S", 1.0)
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="STORAGE_EMULATOR_HOST"):
        storage.list_files("gs://bucket/prefix")
    assert time.monotonic() - started < 10


def test_missing_credentials_are_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(SourceUnavailableError, match="gcloud auth application-default login"):
        storage.make_client()
