"""The split dataset's TFRecord format (docs/artifacts.md): writing shards and reading them back."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tumorflow.core.artifacts import SPLIT_MANIFEST_JSON as MANIFEST_JSON
from tumorflow.core.errors import DatasetError

ENCODED = "image/encoded"
LABEL = "image/label"
PATH = "image/path"
GROUP = "image/group"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One example of a split: PNG bytes (8-bit RGB), label index, source path, duplicate group."""

    encoded: bytes
    label: int
    path: str
    group: str


def serialize(record: Record) -> bytes:
    import tensorflow as tf

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                ENCODED: _bytes(record.encoded),
                LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[record.label])),
                PATH: _bytes(record.path.encode()),
                GROUP: _bytes(record.group.encode()),
            }
        )
    )
    return example.SerializeToString()


def write_shards(records: list[Record], output_dir: Path, split: str, shard_size: int) -> list[str]:
    """Write `records` as `<split>-0000i-of-0000n.tfrecord` shards; return the file names."""
    import tensorflow as tf

    output_dir.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, -(-len(records) // shard_size))
    names = []
    for index in range(n_shards):
        name = f"{split}-{index:05d}-of-{n_shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(output_dir / name)) as writer:
            for record in records[index * shard_size : (index + 1) * shard_size]:
                writer.write(serialize(record))
        names.append(name)
    return names


def feature_spec() -> dict:
    import tensorflow as tf

    return {
        ENCODED: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        PATH: tf.io.FixedLenFeature([], tf.string, default_value=""),
        GROUP: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def class_counts(labels: Sequence[int], classes: Sequence[str]) -> dict[str, int]:
    """Images per class name, every class listed (0 where none), as the split manifest holds them."""
    labels = [int(label) for label in labels]
    return {name: labels.count(index) for index, name in enumerate(classes)}


def write_split_manifest(
    folder: Path, classes: Sequence[str], splits: Mapping[str, Mapping], **fields: object
) -> Path:
    """`split_manifest.json` (docs/artifacts.md "Split dataset"): the classes, per split its
    `count`, `class_counts` and `shards`, and any further fields; the one writer of it."""
    path = Path(folder) / MANIFEST_JSON
    manifest = {"classes": list(classes), "splits": {k: dict(v) for k, v in splits.items()}}
    path.write_text(json.dumps(manifest | fields, indent=2) + "\n")
    return path


def write_split(
    folder: Path,
    classes: Sequence[str],
    records: Mapping[str, Sequence[Record]],
    shard_size: int = 1024,
    **fields: object,
) -> Path:
    """A split dataset holding `records[split]`: TFRecord shards and their manifest (with any
    further manifest fields given); returns `folder`."""
    folder = Path(folder)
    splits = {
        split: {
            "count": len(rows),
            "class_counts": class_counts([row.label for row in rows], classes),
            "shards": write_shards(list(rows), folder, split, shard_size),
        }
        for split, rows in records.items()
    }
    write_split_manifest(folder, classes, splits, **fields)
    return folder


def read_split_manifest(split_dir: Path) -> dict:
    path = Path(split_dir) / MANIFEST_JSON
    if not path.exists():
        raise DatasetError(f"{split_dir} is not a split dataset: {MANIFEST_JSON} is missing")
    return json.loads(path.read_text())


def shard_paths(split_dir: Path, split: str) -> list[str]:
    """The shard files of one split, as listed in the split manifest."""
    manifest = read_split_manifest(split_dir)
    if split not in manifest["splits"]:
        raise DatasetError(f"{split_dir} has no {split!r} split")
    return [str(Path(split_dir) / name) for name in manifest["splits"][split]["shards"]]


def read_records(split_dir: Path, split: str) -> Iterator[Record]:
    """Iterate the examples of one split in file order (eager; for evaluation and drift)."""
    import tensorflow as tf

    spec = feature_spec()
    for raw in tf.data.TFRecordDataset(shard_paths(split_dir, split)):
        parsed = tf.io.parse_single_example(raw, spec)
        yield Record(
            encoded=parsed[ENCODED].numpy(),
            label=int(parsed[LABEL].numpy()),
            path=parsed[PATH].numpy().decode(),
            group=parsed[GROUP].numpy().decode(),
        )
