"""Validation and the written split dataset: quarantine, normalisation, groups, errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import noise_image
from PIL import Image

from tumorflow.components.data.download import download_dataset
from tumorflow.components.data.tfrecords import read_records, read_split_manifest
from tumorflow.components.data.validate import to_rgb8, validate_and_split
from tumorflow.core.config import DatasetConfig, SplitConfig
from tumorflow.core.errors import DatasetError

SMALL_SPLIT = SplitConfig(val_fraction=0.2, test_fraction=0.2, min_test_per_class=1)


def _save(path: Path, image: Image.Image | bytes, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path, format=fmt)


def _dataset_folder(
    root: Path, per_class: int = 6, classes: tuple[str, ...] = ("cyst", "tumor"), seed: int = 0
) -> Path:
    for index, name in enumerate(classes):
        for number in range(per_class):
            _save(
                root / name / f"{name}-{number}.png",
                noise_image(seed + 1000 * index + number, mode="L"),
            )
    return root


def _split_rows(split_dir: Path) -> list[dict]:
    with (split_dir / "split_manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def _run(
    source: Path, tmp_path: Path, split: SplitConfig = SMALL_SPLIT, classes=None, dataset=None
):
    download_dataset(str(source), tmp_path / "raw", dataset or DatasetConfig())
    return validate_and_split(tmp_path / "raw", tmp_path / "split", split, classes)


def test_corrupt_phantom_files_are_quarantined_and_the_split_completes(tmp_path: Path) -> None:
    from tumorflow.components.data.phantom import generate_phantom

    source = generate_phantom(
        tmp_path / "phantom", per_class=8, size=40, slices_per_patient=1, corrupt=3
    )
    dataset = DatasetConfig(
        subdir="CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone/CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
    )
    result = _run(source, tmp_path, SMALL_SPLIT, dataset=dataset)
    with (tmp_path / "split" / "quarantine.csv").open() as handle:
        quarantined = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(handle)}
    assert quarantined.keys() == {
        "corrupt-1-empty.jpg",
        "corrupt-2-truncated.jpg",
        "corrupt-3-not-an-image.png",
    }
    assert quarantined["corrupt-1-empty.jpg"].startswith("empty file")
    assert quarantined["corrupt-2-truncated.jpg"].startswith("truncated")
    assert quarantined["corrupt-3-not-an-image.png"].startswith("not an image")
    manifest = read_split_manifest(tmp_path / "split")
    assert manifest["quarantined"] == 3
    assert manifest["classes"] == ["cyst", "normal", "stone", "tumor"]
    assert sum(info["count"] for info in manifest["splits"].values()) == 32
    assert manifest["source"]["source"] == str(source)
    assert result.strategy == "grouped-stratified"
    records = list(read_records(tmp_path / "split", "train"))
    assert len(records) == manifest["splits"]["train"]["count"]
    assert {r.path for r in records} == {
        row["path"] for row in _split_rows(tmp_path / "split") if row["split"] == "train"
    }


def test_near_duplicate_slices_never_straddle_splits(tmp_path: Path, tiny_phantom: Path) -> None:
    dataset = DatasetConfig(
        subdir="CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone/CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
    )
    source = tmp_path / "source"
    shutil.copytree(tiny_phantom, source)
    cyst = source / dataset.subdir / "Cyst"
    shutil.copy(cyst / "Cyst- (1).jpg", cyst / "copy of cyst 1.jpg")
    split = SplitConfig(
        group_consecutive_numbers=True, val_fraction=0.2, test_fraction=0.25, min_test_per_class=1
    )
    result = _run(source, tmp_path, split, dataset=dataset)
    rows = _split_rows(tmp_path / "split")
    split_of_group: dict[str, set[str]] = {}
    for row in rows:
        split_of_group.setdefault(row["group_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_group.values())
    by_name = {Path(row["path"]).name: row for row in rows}
    assert by_name["copy of cyst 1.jpg"]["group_id"] == by_name["Cyst- (1).jpg"]["group_id"]
    assert by_name["Cyst- (2).jpg"]["group_id"] == by_name["Cyst- (1).jpg"]["group_id"]
    assert result.grouping["exact_duplicate_groups"] == 1
    assert result.grouping["groups"] < len(rows) / 2
    naive = result.manifest["leak_report"]["random_split"]
    assert naive["test_share"] > 0.5, "slices of one patient would land on both sides"
    assert result.manifest["leak_report"]["source_split"] is None
    assert f"{naive['test_share']:.1%} of test images" in result.report_markdown()


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda: noise_image(1, mode="L")),
        ("RGBA", lambda: noise_image(2, mode="RGBA")),
        ("LA", lambda: noise_image(3, mode="LA")),
        ("P", lambda: noise_image(4, mode="P")),
        (
            "I;16",
            lambda: Image.fromarray(np.linspace(0, 4000, 32 * 32, dtype=np.uint16).reshape(32, 32)),
        ),
        ("CMYK", lambda: noise_image(5, mode="CMYK")),
        ("1", lambda: noise_image(6, mode="1")),
        (
            "F",
            lambda: Image.fromarray(
                np.linspace(-1000, 3000, 1024, dtype=np.float32).reshape(32, 32)
            ),
        ),
    ],
)
def test_every_supported_mode_becomes_8_bit_rgb(mode: str, make) -> None:
    image = make()
    assert image.mode == mode
    normalised = to_rgb8(image)
    assert normalised.mode == "RGB"
    assert normalised.size == image.size
    values = np.asarray(normalised)
    assert values.dtype == np.uint8 and values.shape == (32, 32, 3)
    if mode in ("I;16", "F"):
        assert values.min() == 0 and values.max() == 255


def test_transparency_is_composited_on_black() -> None:
    rgba = Image.new("RGBA", (20, 20), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    values = np.asarray(to_rgb8(rgba))
    assert values[0, 0].tolist() == [200, 100, 50]
    assert values[5, 5].tolist() == [0, 0, 0]


def test_gray_rgba_and_16_bit_files_are_written_as_rgb_png_and_jpegs_kept(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for number in range(5):
        _save(source / "cyst" / f"gray-{number}.png", noise_image(number, size=40, mode="L"))
        _save(
            source / "cyst" / f"gray-{number}.jpg",
            noise_image(50 + number, size=40, mode="L"),
            fmt="JPEG",
        )
        _save(source / "tumor" / f"rgba-{number}.png", noise_image(100 + number, mode="RGBA"))
        deep = np.random.default_rng(number).integers(0, 65535, (36, 36), dtype=np.uint16)
        _save(source / "tumor" / f"deep-{number}.png", Image.fromarray(deep))
    _run(source, tmp_path)
    sizes = {
        Path(row["path"]).name: (int(row["width"]), int(row["height"]))
        for row in _split_rows(tmp_path / "split")
    }
    raw_files = tmp_path / "raw" / "files"
    for split in ("train", "val", "test"):
        for record in read_records(tmp_path / "split", split):
            decoded = Image.open(io.BytesIO(record.encoded))
            if record.path.endswith(".jpg"):
                # an 8-bit JPEG is stored byte for byte: no second lossy encoding
                assert record.encoded == (raw_files / record.path).read_bytes()
            else:
                assert decoded.format == "PNG" and decoded.mode == "RGB"
            assert decoded.size == sizes[Path(record.path).name]


def test_small_huge_changed_and_conflicting_files_are_quarantined(tmp_path: Path) -> None:
    source = _dataset_folder(tmp_path / "source")
    _save(source / "cyst" / "tiny.png", noise_image(7, size=8, mode="L"))
    Image.new("1", (8200, 8200)).save(source / "tumor" / "bomb.png")
    _save(source / "cyst" / "same.png", noise_image(8, mode="L"))
    _save(source / "tumor" / "same.png", noise_image(8, mode="L"))
    download_dataset(str(source), tmp_path / "raw", DatasetConfig())
    changed = tmp_path / "raw" / "files" / "cyst" / "cyst-0.png"
    noise_image(99, mode="L").save(changed)
    validate_and_split(tmp_path / "raw", tmp_path / "split", SMALL_SPLIT)
    with (tmp_path / "split" / "quarantine.csv").open() as handle:
        reasons = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert reasons["cyst/tiny.png"].startswith("too small")
    assert reasons["tumor/bomb.png"].startswith("decompression bomb")
    assert reasons["cyst/cyst-0.png"].startswith("sha256 mismatch")
    assert reasons["cyst/same.png"].startswith("identical copies under different labels")
    assert reasons["tumor/same.png"] == reasons["cyst/same.png"]
    assert len(reasons) == 5


def test_predefined_split_folders_are_kept(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _dataset_folder(source / "Training", per_class=8)
    _dataset_folder(source / "Testing", per_class=3, seed=500)
    shutil.copy(source / "Training/cyst/cyst-0.png", source / "Testing/cyst/leaked.png")
    dataset = DatasetConfig(split_dirs={"Training": "train", "Testing": "test"})
    result = _run(
        source, tmp_path, SplitConfig(val_fraction=0.25, min_test_per_class=1), dataset=dataset
    )
    assert result.strategy == "predefined"
    rows = _split_rows(tmp_path / "split")
    assert {row["split"] for row in rows if row["path"].startswith("Testing/")} == {"test"}
    training = {
        row["split"]
        for row in rows
        if row["path"].startswith("Training/") and "cyst-0" not in row["path"]
    }
    assert training == {"train", "val"}
    assert result.manifest["carved_from_train"] == ["val"]
    leaked = {row["path"]: row["split"] for row in rows}
    assert leaked["Training/cyst/cyst-0.png"] == leaked["Testing/cyst/leaked.png"] == "test"
    assert result.manifest["source_split_leaks"] == {"groups": 1, "images": 2}
    own = json.loads((tmp_path / "split/split_manifest.json").read_text())["leak_report"]
    assert own["source_split"] == {"test_share": 0.1429, "test_images": 7, "leaked_images": 1}
    assert "1 of 7 test images (14.3%) have a near-duplicate" in result.report_markdown()


def test_a_listed_class_without_images_is_an_error(tmp_path: Path) -> None:
    source = _dataset_folder(tmp_path / "source")
    with pytest.raises(DatasetError, match="class stone has no valid images"):
        _run(source, tmp_path, classes=["cyst", "stone", "tumor"])


def test_a_single_class_is_an_error(tmp_path: Path) -> None:
    source = _dataset_folder(tmp_path / "source", classes=("cyst",))
    with pytest.raises(DatasetError, match="at least two classes"):
        _run(source, tmp_path)


def test_nothing_valid_is_an_error(tmp_path: Path) -> None:
    for name in ("cyst", "tumor"):
        _save(tmp_path / "source" / name / "broken.jpg", b"not a jpeg")
    with pytest.raises(DatasetError, match="no valid images"):
        _run(tmp_path / "source", tmp_path)
    assert (tmp_path / "split" / "quarantine.csv").exists()


def test_a_test_split_too_small_to_evaluate_is_an_error(tmp_path: Path) -> None:
    source = _dataset_folder(tmp_path / "source", per_class=5)
    with pytest.raises(DatasetError, match="test split is too small"):
        _run(source, tmp_path, SplitConfig(min_test_per_class=4))


def test_rerunning_replaces_the_split_but_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    source = _dataset_folder(tmp_path / "source")
    _run(source, tmp_path)
    first = json.loads((tmp_path / "split" / "split_manifest.json").read_text())
    validate_and_split(tmp_path / "raw", tmp_path / "split", SMALL_SPLIT)
    assert (
        json.loads((tmp_path / "split" / "split_manifest.json").read_text())["splits"]
        == first["splits"]
    )
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a split dataset"):
        validate_and_split(tmp_path / "raw", tmp_path / "foreign", SMALL_SPLIT)


def test_checking_on_every_core_gives_what_threads_give(tmp_path: Path, monkeypatch) -> None:
    from tumorflow.components.data import validate
    from tumorflow.components.data.manifest import read_manifest
    from tumorflow.core.artifacts import RAW_FILES as FILES
    from tumorflow.core.config import PhantomConfig, load_config

    dataset = load_config(preset="phantom").dataset.model_copy(
        update={"phantom": PhantomConfig(per_class=6, size=40, corrupt=3)}
    )
    download_dataset("phantom", tmp_path / "raw", dataset)
    rows = read_manifest(tmp_path / "raw")
    threads = validate.check_images(tmp_path / "raw" / FILES, rows, workers=1)
    monkeypatch.setattr(validate, "PROCESS_POOL_MIN_IMAGES", 1)
    processes = validate.check_images(tmp_path / "raw" / FILES, rows, workers=2)
    assert processes == threads
    assert sum(check.reason is not None for check in processes) == 3


def test_the_validate_step_checks_in_worker_processes_above_the_threshold(
    tmp_path: Path, monkeypatch
) -> None:
    """Decoding and hashing run on every core: in a pool of processes (their CPU time is the
    children's) for sets above `PROCESS_POOL_MIN_IMAGES`, in this process below it."""
    import resource

    from tumorflow.components.data import validate
    from tumorflow.core.config import PhantomConfig, load_config

    dataset = load_config(preset="phantom").dataset.model_copy(
        update={"phantom": PhantomConfig(per_class=12, size=64)}
    )
    download_dataset("phantom", tmp_path / "raw", dataset)
    monkeypatch.setattr(validate, "available_cores", lambda: 2)

    def children_cpu_of_a_split(name: str) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        validate_and_split(tmp_path / "raw", tmp_path / name, SMALL_SPLIT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    assert children_cpu_of_a_split("threads") == 0.0
    monkeypatch.setattr(validate, "PROCESS_POOL_MIN_IMAGES", 10)
    assert children_cpu_of_a_split("processes") > 0.0
    for name in ("threads", "processes"):
        assert (tmp_path / name / "split_manifest.csv").read_text() == (
            tmp_path / "threads" / "split_manifest.csv"
        ).read_text()
