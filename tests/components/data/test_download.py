"""The download step for every source kind: phantom, folder, archive, Kaggle (at its boundary), GCS."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import kagglehub
import pytest
import requests
from helpers import HOSTILE_NAMES, image_bytes, write_hostile_name_corpus

from tumorflow.components.data.dataset_version import resolve_dataset_version
from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.manifest import read_manifest
from tumorflow.components.data.safe_names import original_name
from tumorflow.core import storage
from tumorflow.core.config import DatasetConfig, PhantomConfig, load_config
from tumorflow.core.errors import DatasetError, SourceUnavailableError, UnsafeArchiveError

KIDNEY_SUBDIR = (
    "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone/CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
)


def _manifest(raw: Path) -> list[dict]:
    with (raw / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def _chest_like(root: Path) -> Path:
    """Split folders whose class folder names differ by split, plus files that must be skipped."""
    for split, folder in (
        ("train", "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib"),
        ("test", "Adenocarcinoma"),
    ):
        (root / "Data" / split / folder).mkdir(parents=True)
        (root / "Data" / split / folder / "1.png").write_bytes(b"png " + split.encode())
        (root / "Data" / split / folder / "notes.txt").write_text("not an image")
        (root / "Data" / split / folder / ".DS_Store").write_bytes(b"junk")
        (root / "Data" / split / folder / "._1.png").write_bytes(b"junk")
        (root / "Data" / split / "normal").mkdir()
        (root / "Data" / split / "normal" / "2.JPG").write_bytes(b"jpg " + split.encode())
        (root / "Data" / split / "unknown_class").mkdir()
        (root / "Data" / split / "unknown_class" / "3.png").write_bytes(b"x")
    (root / "Data" / "README.png").write_bytes(b"not under a class folder")
    return root


CHEST = DatasetConfig(
    subdir="Data",
    split_dirs={"train": "train", "test": "test"},
    class_map={
        "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib": "adenocarcinoma",
        "adenocarcinoma": "adenocarcinoma",
        "normal": "normal",
    },
)


def test_phantom_source_writes_the_raw_dataset(tmp_path: Path) -> None:
    dataset = load_config(preset="phantom").dataset.model_copy(
        update={"phantom": PhantomConfig(per_class=4, size=32)}
    )
    result = download_dataset("phantom", tmp_path / "raw", dataset)
    assert result.label_counts == {"cyst": 4, "normal": 4, "stone": 4, "tumor": 4}
    rows = _manifest(tmp_path / "raw")
    assert list(rows[0]) == ["path", "label", "sha256", "bytes", "source_split", "original_path"]
    first = tmp_path / "raw" / "files" / rows[0]["path"]
    assert rows[0]["path"].startswith(KIDNEY_SUBDIR + "/")
    assert hashlib.sha256(first.read_bytes()).hexdigest() == rows[0]["sha256"]
    assert int(rows[0]["bytes"]) == first.stat().st_size
    source = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert source["source"] == "phantom" and source["version"] is None and source["downloaded_at"]
    assert not (tmp_path / "raw" / ".staging").exists()


def test_folder_source_maps_labels_and_split_folders(tmp_path: Path) -> None:
    source = _chest_like(tmp_path / "chest")
    result = download_dataset(str(source), tmp_path / "raw", CHEST)
    rows = {(r["path"], r["label"], r["source_split"]) for r in _manifest(tmp_path / "raw")}
    assert rows == {
        ("Data/test/Adenocarcinoma/1.png", "adenocarcinoma", "test"),
        ("Data/test/normal/2.JPG", "normal", "test"),
        ("Data/train/adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib/1.png", "adenocarcinoma", "train"),
        ("Data/train/normal/2.JPG", "normal", "train"),
    }
    assert sorted(result.skipped_folders) == ["test/unknown_class", "train/unknown_class"]
    assert (tmp_path / "raw" / "files" / "Data/test/normal/2.JPG").read_bytes() == b"jpg test"
    assert (source / "Data/test/normal/2.JPG").exists(), "a local source is copied, never moved"


def test_without_a_class_map_folder_names_are_lower_cased_labels(tmp_path: Path) -> None:
    (tmp_path / "src" / "Glioma").mkdir(parents=True)
    (tmp_path / "src" / "Glioma" / "a.png").write_bytes(b"a")
    (tmp_path / "src" / "NoTumor").mkdir()
    (tmp_path / "src" / "NoTumor" / "b.png").write_bytes(b"b")
    result = download_dataset(str(tmp_path / "src"), tmp_path / "raw", DatasetConfig())
    assert result.label_counts == {"glioma": 1, "notumor": 1}


def test_zip_and_tar_sources_are_extracted_through_a_wrapper_folder(tmp_path: Path) -> None:
    source = _chest_like(tmp_path / "chest")
    shutil.make_archive(str(tmp_path / "chest"), "zip", tmp_path, "chest")
    shutil.make_archive(str(tmp_path / "chest"), "gztar", tmp_path, "chest")
    for archive in ("chest.zip", "chest.tar.gz"):
        result = download_dataset(
            str(tmp_path / archive), tmp_path / archive.replace(".", "-"), CHEST
        )
        assert result.label_counts == {"adenocarcinoma": 2, "normal": 2}
        assert (
            result.source["sha256"] == hashlib.sha256((tmp_path / archive).read_bytes()).hexdigest()
        )
    assert source.exists()


def test_a_hostile_archive_source_is_refused_and_writes_nothing_outside(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("Cyst/a.jpg", b"fine")
        archive.writestr("../../escaped.txt", b"pwned")
    with pytest.raises(UnsafeArchiveError):
        download_dataset(str(evil), tmp_path / "out" / "raw", DatasetConfig())
    assert (
        not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    )
    assert not any((tmp_path / "out" / "raw").rglob("*.jpg"))

    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as archive:
        link = tarfile.TarInfo("Cyst/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        download_dataset(str(tar_path), tmp_path / "out2", DatasetConfig())


def _kaggle_cache(root: Path, version: int) -> Path:
    """What kagglehub leaves in its cache for the kidney CT handle."""
    folder = (
        root
        / "datasets"
        / "nazmul0087"
        / "ct-kidney-dataset-normal-cyst-tumor-and-stone"
        / "versions"
        / str(version)
    )
    for kind in ("Cyst", "Normal"):
        (folder / KIDNEY_SUBDIR / kind).mkdir(parents=True)
        (folder / KIDNEY_SUBDIR / kind / f"{kind}- (1).jpg").write_bytes(kind.encode())
    (folder / "kidneyData.csv").write_text("image_id,Class\n")
    return folder


def test_kaggle_source_records_the_resolved_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _kaggle_cache(tmp_path / "kagglehub", 1)
    calls = []

    def fake_download(handle: str, *args, **kwargs) -> str:
        calls.append(handle)
        return str(cache)

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    dataset = load_config(preset="kidney_ct").dataset
    result = download_dataset(dataset.source, tmp_path / "raw", dataset)
    assert calls == ["nazmul0087/ct-kidney-dataset-normal-cyst-tumor-and-stone"]
    assert result.source["version"] == "1"
    assert result.source["resolved"] == str(cache)
    assert result.label_counts == {"cyst": 1, "normal": 1}
    download_dataset("kaggle:owner/slug/versions/7", tmp_path / "raw2", dataset)
    assert json.loads((tmp_path / "raw2" / "source.json").read_text())["version"] == "7"


def test_offline_kaggle_says_how_to_work_around_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(handle: str, *args, **kwargs) -> str:
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(SourceUnavailableError, match="Kaggle is unreachable") as caught:
        download_dataset(
            "kaggle:masoudnickparvar/brain-tumor-mri-dataset/versions/1",
            tmp_path / "raw",
            DatasetConfig(),
        )
    assert "KAGGLEHUB_CACHE" in str(caught.value)
    with pytest.raises(SourceUnavailableError, match="not a dataset handle"):
        download_dataset("kaggle:not a handle", tmp_path / "raw", DatasetConfig())


def test_gcs_source_downloads_through_the_storage_layer(tmp_path: Path, gcs_emulator: str) -> None:
    source = _chest_like(tmp_path / "chest")
    storage.upload_tree(source, "gs://tumorflow-test/chest-ct")
    result = download_dataset("gs://tumorflow-test/chest-ct", tmp_path / "raw", CHEST)
    assert result.label_counts == {"adenocarcinoma": 2, "normal": 2}
    assert result.source["resolved"] == "gs://tumorflow-test/chest-ct"
    assert len(read_manifest(tmp_path / "raw")) == 4


def test_unusable_sources_and_outputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        download_dataset(str(tmp_path / "nowhere"), tmp_path / "raw", DatasetConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        download_dataset(str(tmp_path / "empty"), tmp_path / "raw", DatasetConfig())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    with pytest.raises(SourceUnavailableError, match="not a raw dataset"):
        download_dataset("phantom", tmp_path / "mine", DatasetConfig())
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"


def test_any_file_name_is_kept_with_a_reversible_original(tmp_path: Path) -> None:
    written = write_hostile_name_corpus(tmp_path / "src", per_class=2)
    result = download_dataset(str(tmp_path / "src"), tmp_path / "raw", DatasetConfig())
    rows = read_manifest(tmp_path / "raw")
    assert len(rows) == len(result.rows) == 2 * (2 + len(HOSTILE_NAMES))
    originals = {os.fsencode(original_name(row.original_path or row.path)) for row in rows}
    for label, names in written.items():
        assert {label.encode() + b"/" + name for name in names} <= originals
    copies = [row.path for row in rows]
    assert len({path.casefold() for path in copies}) == len(copies)
    for row in rows:
        copy = tmp_path / "raw" / "files" / row.path
        assert copy.is_file() and hashlib.sha256(copy.read_bytes()).hexdigest() == row.sha256
        row.path.encode("ascii" if row.original_path else "utf-8")
        assert "\n" not in row.path and not Path(row.path).name.startswith("-")
    kept = {row.path for row in rows if not row.original_path}
    assert "normal/ok_\u00e9_utf8 with spaces.png" in kept
    assert len(kept & {"normal/Case.png", "normal/case.png", "normal/CASE.PNG"}) == 1
    # the folder's fingerprint (what the pipeline caches on) is the downloaded manifest's
    version = resolve_dataset_version(DatasetConfig(source=str(tmp_path / "src")))
    assert version.fingerprint == result.dataset_version


def test_a_class_folder_whose_name_is_not_utf8_becomes_a_printable_label(tmp_path: Path) -> None:
    for folder in (b"caf\xe9", b"normal"):
        os.makedirs(os.path.join(bytes(tmp_path / "src"), folder))
        with open(os.path.join(bytes(tmp_path / "src"), folder, b"a.png"), "wb") as handle:
            handle.write(image_bytes(len(folder)))
    result = download_dataset(str(tmp_path / "src"), tmp_path / "raw", DatasetConfig())
    assert result.label_counts == {"caf%E9": 1, "normal": 1}
    assert {row.label for row in read_manifest(tmp_path / "raw")} == {"caf%E9", "normal"}
