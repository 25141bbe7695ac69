"""Validate/split step: decode every image, quarantine the bad ones, group duplicates, split, shard.

Input: a raw dataset (components/data/download.py). Output: the "Split dataset" of docs/artifacts.md:
TFRecord shards per split, split_manifest.json/.csv and quarantine.csv.

Each image is opened with Pillow, verified and fully decoded. Rejected with a reason (and the
run goes on): missing or empty files, SHA-256 different from the manifest, undecodable or
truncated data, absurd sizes (decompression bombs), images under `MIN_SIDE` pixels, unsupported
modes, and exact copies filed under different labels. 8-bit grayscale/RGB JPEGs are stored as
they are; other accepted images are normalised to 8-bit RGB PNG: grayscale is repeated,
RGBA/LA/palette transparency is composited on black, 16-bit and float images are windowed to 8
bits between their 0.5th and 99.5th percentiles, CMYK/YCbCr converted.

Decoding runs twice: once to validate and hash, in a pool of processes on every core this process
may use (Pillow's checks and the pHash DCT hold the GIL, so threads would use about one core;
`tumorflow bench validate` measures it), and once per shard to encode, in a thread pool, so memory
stays at one shard of encoded bytes even for the 12,446-image kidney CT set. Sets under
`PROCESS_POOL_MIN_IMAGES` are checked in threads (starting processes costs more).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tumorflow.components.data import dicom, split, tfrecords
from tumorflow.components.data.image_files import MAX_IMAGE_PIXELS
from tumorflow.components.data.manifest import ARCHIVE_QUARANTINE, ManifestRow, read_manifest
from tumorflow.components.data.near_duplicates import phash64
from tumorflow.core.artifacts import RAW_FILES, SOURCE_JSON, SPLIT_MANIFEST_CSV
from tumorflow.core.config import SplitConfig
from tumorflow.core.errors import DatasetError

logger = logging.getLogger(__name__)

MIN_SIDE = 16
QUARANTINE_CSV = "quarantine.csv"
SPLIT_MANIFEST_COLUMNS = (
    "path",
    "label",
    "label_index",
    "split",
    "group_id",
    "sha256",
    "width",
    "height",
)
_CONVERTIBLE = {"1", "L", "RGB", "CMYK", "YCbCr", "RGBX"}
_WITH_ALPHA = {"RGBA", "LA", "PA", "La", "RGBa"}
_HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Fewer images than this are checked in threads: starting processes would cost more.
PROCESS_POOL_MIN_IMAGES = 500


@dataclass(frozen=True)
class ImageCheck:
    """The outcome of validating one file: a reason when rejected, else its size and pHash."""

    path: str
    reason: str | None = None
    width: int = 0
    height: int = 0
    phash: int = 0


@dataclass(frozen=True)
class SplitResult:
    """What `validate_and_split` wrote, for summaries and the next steps."""

    output_dir: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]
    quarantined: list[tuple[str, str]]
    grouping: dict
    strategy: str
    manifest: dict

    def summary(self) -> dict:
        """Flat key/values for the pipeline artifact's metadata."""
        return {
            "strategy": self.strategy,
            "classes": self.classes,
            "images": {name: sum(counts.values()) for name, counts in self.counts.items()},
            "groups": self.grouping["groups"],
            "quarantined": len(self.quarantined),
            "dataset_version": self.manifest.get("source", {}).get("dataset_version", ""),
        }

    def report_markdown(self, max_quarantine_rows: int = 50) -> str:
        """Counts per split and class, duplicate groups, leaks and quarantined files, as Markdown."""
        lines = [
            f"## Split dataset ({self.strategy})",
            "",
            "| split | total | " + " | ".join(self.classes) + " |",
            "|---|---:|" + "---:|" * len(self.classes),
        ]
        for name, counts in self.counts.items():
            cells = " | ".join(str(counts[c]) for c in self.classes)
            lines.append(f"| {name} | {sum(counts.values())} | {cells} |")
        grouping = self.grouping
        lines += [
            "",
            f"Duplicate groups: {grouping['groups']} ({grouping['exact_duplicate_groups']} "
            f"exact-duplicate, {grouping['near_duplicate_groups']} near-duplicate at pHash "
            f"distance <= {grouping['max_distance']}, largest {grouping['largest_group']} "
            "images); no group straddles two splits.",
        ]
        if grouping.get("patients"):
            lines.append(
                f"Patients (DICOM PatientID or the metadata table): {grouping['patients']}, "
                "each kept within one group."
            )
        leaks = self.manifest.get("source_split_leaks", {})
        if leaks.get("groups"):
            lines.append(
                f"The dataset's own split folders leaked: {leaks['groups']} groups "
                f"({leaks['images']} images) straddled them and were moved to one held-out split."
            )
        lines += leak_report_markdown(self.manifest.get("leak_report"))
        lines += ["", f"### Quarantined: {len(self.quarantined)} files", ""]
        if self.quarantined:
            lines += ["| path | reason |", "|---|---|"]
            lines += [
                f"| {path} | {reason} |" for path, reason in self.quarantined[:max_quarantine_rows]
            ]
            if len(self.quarantined) > max_quarantine_rows:
                lines.append(
                    f"| ... | {len(self.quarantined) - max_quarantine_rows} more in {QUARANTINE_CSV} |"
                )
        return "\n".join(lines) + "\n"


def leak_report_markdown(report: dict | None) -> list[str]:
    """The leak report's lines: what a naive random split would leak, and what the source's own
    train/test folders leak."""
    if not report:
        return []
    naive = report["random_split"]
    lines = [
        "",
        "### The leak a random split hides",
        "",
        f"Under a naive random split of these images with the same fractions, "
        f"{naive['test_share']:.1%} of test images (range {naive['min']:.1%}-{naive['max']:.1%} "
        f"over {naive['seeds']} shuffles) would have a near-duplicate in train; this grouped "
        "split has none. A paper's figure on such a split is partly memorisation.",
    ]
    own = report.get("source_split")
    if own:
        lines.append(
            f"The dataset's own train/test folders: {own['leaked_images']} of "
            f"{own['test_images']} test images ({own['test_share']:.1%}) have a near-duplicate "
            "in its train folder."
        )
    return lines


def to_rgb8(image: Image.Image) -> Image.Image:
    """Normalise any supported Pillow image to 8-bit RGB (see the module docstring)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _WITH_ALPHA:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _HIGH_DEPTH or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        low, high = np.percentile(values, [0.5, 99.5])
        if high <= low:
            low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8), mode="L").convert(
            "RGB"
        )
    if image.mode in _CONVERTIBLE:
        return image.convert("RGB")
    raise ValueError(f"unsupported mode {image.mode}")


def _decode(path: Path) -> Image.Image:
    """Open, verify and fully decode one image (first frame); raises on any problem."""
    with Image.open(path) as probe:
        width, height = probe.size
        if width * height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{width}x{height} pixels")
        probe.verify()
    with Image.open(path) as image:
        image.load()
        return to_rgb8(image)


def check_image(files_dir: Path, row: ManifestRow) -> ImageCheck:
    """Validate one manifest row; never raises for a bad file, returns the reason instead."""
    parts = PurePosixPath(row.path).parts
    if PurePosixPath(row.path).is_absolute() or ".." in parts:
        return ImageCheck(row.path, "path escapes files/")
    path = files_dir / row.path
    if not path.is_file():
        return ImageCheck(row.path, "file missing")
    if rejected := dicom.rejection_reason(path):
        return ImageCheck(row.path, rejected)
    data = path.read_bytes()
    if not data:
        return ImageCheck(row.path, "empty file (0 bytes)")
    if row.sha256 and hashlib.sha256(data).hexdigest() != row.sha256:
        return ImageCheck(row.path, "sha256 mismatch with manifest (file changed after download)")
    try:
        image = _decode(path)
    except Image.DecompressionBombError as exc:
        return ImageCheck(row.path, f"decompression bomb / absurd size ({exc})")
    except UnidentifiedImageError:
        return ImageCheck(row.path, "not an image (unrecognised format)")
    except ValueError as exc:
        return ImageCheck(row.path, str(exc))
    except (OSError, SyntaxError, EOFError) as exc:
        return ImageCheck(row.path, f"truncated or corrupt image ({str(exc)[:120]})")
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        return ImageCheck(row.path, f"too small ({width}x{height}, under {MIN_SIDE} px)")
    return ImageCheck(row.path, None, width, height, phash64(image))


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def check_pool(workers: int, images: int) -> str:
    """How `check_images` runs `images` checks on `workers`: "processes" (a pool of that many),
    "threads" (a small set, where starting processes costs more) or "serial" (one worker)."""
    if workers <= 1:
        return "serial"
    return "processes" if images >= PROCESS_POOL_MIN_IMAGES else "threads"


def check_images(
    files_dir: Path, rows: list[ManifestRow], workers: int | None = None
) -> list[ImageCheck]:
    """`check_image` of every row, in order, on `workers` processes (default: every core this
    process may use); see `check_pool`."""
    workers = workers or available_cores()
    check = functools.partial(check_image, files_dir)
    progress = {"total": len(rows), "desc": "validate", "unit": "img", "disable": None}
    how = check_pool(workers, len(rows))
    if how == "serial":
        return [check(row) for row in tqdm(rows, **progress)]
    if how == "processes":
        # fork is cheap and needs no `__main__` guard in the caller, but is unsafe once
        # TensorFlow's threads run in this process: spawn then
        start = "fork" if "tensorflow" not in sys.modules and os.name == "posix" else "spawn"
        context = multiprocessing.get_context(start)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            chunk = max(1, min(64, len(rows) // (8 * workers)))
            return list(tqdm(pool.map(check, rows, chunksize=chunk), **progress))
    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        return list(tqdm(pool.map(check, rows), **progress))


def encode_for_training(path: Path) -> bytes:
    """The bytes a split stores for an already validated image.

    An 8-bit grayscale or RGB JPEG (most CT and MRI exports) is kept byte for byte: no second
    lossy encoding, smaller shards, and a decode the input pipeline can scale in the DCT. Anything
    else is normalised to 8-bit RGB and stored as PNG.
    """
    with Image.open(path) as image:
        if image.format == "JPEG" and image.mode in ("L", "RGB"):
            return path.read_bytes()
    buffer = io.BytesIO()
    _decode(path).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


class _LazyShardRecords(Sequence):
    """Records of one split, encoded a slice (one shard) at a time in a thread pool.

    `tfrecords.write_shards` takes the records of a split and slices them shard by shard; this
    sequence makes the bytes of one shard only, so memory stays bounded.
    """

    def __init__(
        self, entries: list[tuple[Path, int, str, str]], pool: ThreadPoolExecutor, name: str
    ) -> None:
        self._entries = entries
        self._pool = pool
        self._progress = tqdm(
            total=len(entries), desc=f"write {name}", unit="img", disable=None, leave=False
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, item):
        chunk = self._entries[item] if isinstance(item, slice) else [self._entries[item]]
        encoded = list(self._pool.map(encode_for_training, [entry[0] for entry in chunk]))
        self._progress.update(len(chunk))
        records = [
            tfrecords.Record(png, label, path, group)
            for png, (_, label, path, group) in zip(encoded, chunk, strict=True)
        ]
        return records if isinstance(item, slice) else records[0]


def _prepare_output(output_dir: Path) -> None:
    """Make `output_dir` empty, replacing an earlier split dataset only."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / tfrecords.MANIFEST_JSON).exists():
            raise DatasetError(
                f"{output_dir} is not empty and is not a split dataset; choose a new folder"
            )
        for old in output_dir.glob("*.tfrecord"):
            old.unlink()
        for name in (tfrecords.MANIFEST_JSON, SPLIT_MANIFEST_CSV, QUARANTINE_CSV, dicom.SLICES_CSV):
            (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def _resolve_classes(labels: list[str], classes: list[str] | None) -> list[str]:
    found = sorted(set(labels))
    if classes:
        empty = [name for name in classes if name not in found]
        if empty:
            raise DatasetError(
                f"class {', '.join(empty)} has no valid images (found: {', '.join(found) or 'none'}); "
                "check dataset.class_map / dataset.classes or the quarantine report"
            )
        classes = list(classes)
    else:
        classes = found
    if len(classes) < 2:
        raise DatasetError(f"need at least two classes to train a classifier, found {classes}")
    return classes


def _conflicting_labels(rows: list[ManifestRow]) -> dict[str, str]:
    """sha256 -> reason, for identical files filed under more than one label."""
    labels_of: dict[str, set[str]] = {}
    for row in rows:
        labels_of.setdefault(row.sha256, set()).add(row.label)
    return {
        digest: f"identical copies under different labels ({', '.join(sorted(labels))})"
        for digest, labels in labels_of.items()
        if len(labels) > 1
    }


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def validate_and_split(
    raw_dir: Path,
    output_dir: Path,
    split_config: SplitConfig,
    classes: list[str] | None = None,
    *,
    held_out: bool = False,
) -> SplitResult:
    """Validate a raw dataset and write the leakage-aware split dataset to `output_dir`.

    `classes` fixes the label order (and drops other labels); by default the sorted labels found.
    Raises `DatasetError` when nothing is valid, a listed class is empty, fewer than two classes
    remain, or the test split holds fewer than `split_config.min_test_per_class` of a class.
    `held_out` (an external-site set, never trained on): every valid image goes to the test
    split, and a listed class may be absent.
    """
    raw_dir, output_dir = Path(raw_dir), Path(output_dir)
    rows = read_manifest(raw_dir)
    source_info = (
        json.loads((raw_dir / SOURCE_JSON).read_text()) if (raw_dir / SOURCE_JSON).exists() else {}
    )
    _prepare_output(output_dir)
    files_dir = raw_dir / RAW_FILES
    workers = min(8, available_cores() + 1)
    checks = check_images(files_dir, rows)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        conflicts = _conflicting_labels(
            [row for row, check in zip(rows, checks, strict=True) if check.reason is None]
        )
        quarantined: list[tuple[str, str]] = [
            (name, f"archive entry not extracted: {reason}")
            for name, reason in source_info.get(ARCHIVE_QUARANTINE, [])
        ]
        kept: list[tuple[ManifestRow, ImageCheck]] = []
        for row, check in zip(rows, checks, strict=True):
            reason = check.reason or conflicts.get(row.sha256)
            if reason:
                quarantined.append((row.path, reason))
            elif classes and row.label not in classes:
                logger.info(
                    "dropping %s: label %r is not in classes %s", row.path, row.label, classes
                )
            else:
                kept.append((row, check))
        _write_csv(output_dir / QUARANTINE_CSV, ("path", "reason"), quarantined)
        if quarantined:
            logger.warning(
                "quarantined %d of %d files (%s); see %s",
                len(quarantined),
                len(rows),
                dict(Counter(reason.split(" (")[0] for _, reason in quarantined)),
                output_dir / QUARANTINE_CSV,
            )
        if not kept:
            raise DatasetError(
                f"no valid images in {raw_dir}: all {len(rows)} files were quarantined (see {output_dir / QUARANTINE_CSV})"
            )
        class_names = (
            list(classes)
            if held_out and classes
            else _resolve_classes([row.label for row, _ in kept], classes)
        )
        slice_table = dicom.read_slice_table(raw_dir)
        result = _split_and_write(
            kept, class_names, split_config, files_dir, output_dir, pool, slice_table, held_out
        )
    manifest = {**result, "quarantined": len(quarantined), "source": source_info}
    fields = {k: v for k, v in manifest.items() if k not in ("classes", "splits")}
    tfrecords.write_split_manifest(output_dir, manifest["classes"], manifest["splits"], **fields)
    counts = {name: info["class_counts"] for name, info in manifest["splits"].items()}
    logger.info("split dataset (%s): %s -> %s", manifest["strategy"], counts, output_dir)
    return SplitResult(
        output_dir,
        class_names,
        counts,
        quarantined,
        manifest["grouping"],
        manifest["strategy"],
        manifest,
    )


def _split_and_write(
    kept: list[tuple[ManifestRow, ImageCheck]],
    classes: list[str],
    split_config: SplitConfig,
    files_dir: Path,
    output_dir: Path,
    pool: ThreadPoolExecutor,
    slice_table: dict[str, dict[str, str]],
    held_out: bool = False,
) -> dict:
    """Group, split, check the split is usable, write shards, split_manifest.csv and (for
    DICOM) slices.csv. Images of one patient (slices.csv) are one group; `held_out`: all in test."""
    paths = [row.path for row, _ in kept]
    labels = [row.label for row, _ in kept]
    label_index = np.array([classes.index(label) for label in labels], dtype=np.int64)
    grouping = split.group_duplicates(
        paths,
        labels,
        [row.sha256 for row, _ in kept],
        np.array([check.phash for _, check in kept], dtype=np.uint64),
        split_config,
    )
    grouping = split.group_patients(
        grouping, [slice_table.get(path, {}).get("patient", "") for path in paths]
    )
    source_splits = [row.source_split for row, _ in kept]
    if held_out:
        assigned, split_info = ["test"] * len(kept), {"strategy": "held-out"}
        leak_report = None
    else:
        assigned, split_info = split.split_by_duplicate_groups(
            grouping.group_of, label_index, len(classes), split_config, source_splits
        )
        leak_report = {
            "random_split": split.random_split_leakage(grouping.group_of, split_config),
            "source_split": split.source_split_leakage(grouping.group_of, source_splits),
        }
    group_names = [f"g{int(g):06d}" for g in grouping.group_of]
    splits_info = {}
    for name in split.SPLITS:
        members = [i for i, s in enumerate(assigned) if s == name]
        splits_info[name] = {
            "count": len(members),
            "class_counts": tfrecords.class_counts(label_index[members], classes),
            "members": members,
        }
    short = {
        c: n
        for c, n in splits_info["test"]["class_counts"].items()
        if n < split_config.min_test_per_class
    }
    if short and not held_out:
        raise DatasetError(
            f"the test split is too small to evaluate: {short} (need at least "
            f"{split_config.min_test_per_class} per class); add images, raise split.test_fraction, "
            "or lower split.min_test_per_class"
        )
    weights = (
        {}
        if held_out
        else split.class_weights(label_index[splits_info["train"]["members"]], classes)
    )
    manifest_rows = []
    for name in split.SPLITS:
        members = splits_info[name].pop("members")
        entries = [
            (files_dir / paths[i], int(label_index[i]), paths[i], group_names[i]) for i in members
        ]
        splits_info[name]["shards"] = tfrecords.write_shards(
            _LazyShardRecords(entries, pool, name), output_dir, name, split_config.shard_size
        )
        for i in members:
            row, check = kept[i]
            manifest_rows.append(
                (
                    row.path,
                    row.label,
                    int(label_index[i]),
                    name,
                    group_names[i],
                    row.sha256,
                    check.width,
                    check.height,
                )
            )
    _write_csv(output_dir / SPLIT_MANIFEST_CSV, SPLIT_MANIFEST_COLUMNS, sorted(manifest_rows))
    kept_slices = [slice_table[path] for path in paths if path in slice_table]
    if kept_slices:
        dicom.write_slice_table(kept_slices, output_dir / dicom.SLICES_CSV)
    return {
        "classes": classes,
        "splits": splits_info,
        "class_weights": weights,
        "seed": split_config.seed,
        "grouping": grouping.stats,
        "leak_report": leak_report,
        **split_info,
    }
