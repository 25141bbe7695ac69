"""The split dataset's TFRecord format (docs/artifacts.md): writing shards and reading them back.

Shards are written and read here without TensorFlow: a TFRecord file is a sequence of
(length, masked CRC-32C of the length, data, masked CRC-32C of the data) and each record a
serialized `tf.train.Example`, whose message types are declared below from TensorFlow's
example.proto and feature.proto (same package, names and field numbers), so the bytes are
those TensorFlow writes and reads. Validate, evaluate, the gate and the drift steps then never
import TensorFlow just to move image bytes; training reads the same shards with tf.data
(`feature_spec`).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@functools.cache
def _example_message() -> Any:
    """The `tensorflow.Example` message class, declared in a pool of its own (no clash with
    TensorFlow's when both are loaded)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="tumorflow/example.proto", package="tensorflow", syntax="proto3"
    )

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> Any:
        declared = proto.message_type.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            field = declared.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = type_name
        return declared

    repeated, optional = fdp.LABEL_REPEATED, fdp.LABEL_OPTIONAL
    message("BytesList", ("value", 1, repeated, fdp.TYPE_BYTES, ""))
    floats = message("FloatList", ("value", 1, repeated, fdp.TYPE_FLOAT, ""))
    floats.field[0].options.packed = True
    ints = message("Int64List", ("value", 1, repeated, fdp.TYPE_INT64, ""))
    ints.field[0].options.packed = True
    feature = message(
        "Feature",
        ("bytes_list", 1, optional, fdp.TYPE_MESSAGE, ".tensorflow.BytesList"),
        ("float_list", 2, optional, fdp.TYPE_MESSAGE, ".tensorflow.FloatList"),
        ("int64_list", 3, optional, fdp.TYPE_MESSAGE, ".tensorflow.Int64List"),
    )
    feature.oneof_decl.add(name="kind")
    for field in feature.field:
        field.oneof_index = 0
    features = message(
        "Features", ("feature", 1, repeated, fdp.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry")
    )
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=optional, type=fdp.TYPE_STRING)
    entry.field.add(
        name="value",
        number=2,
        label=optional,
        type=fdp.TYPE_MESSAGE,
        type_name=".tensorflow.Feature",
    )
    message("Example", ("features", 1, optional, fdp.TYPE_MESSAGE, ".tensorflow.Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def serialize(record: Record) -> bytes:
    """One record as a serialized `tf.train.Example` (its features in key order)."""
    example = _example_message()()
    features = example.features.feature
    features[ENCODED].bytes_list.value.append(record.encoded)
    features[LABEL].int64_list.value.append(record.label)
    features[PATH].bytes_list.value.append(record.path.encode())
    features[GROUP].bytes_list.value.append(record.group.encode())
    return example.SerializeToString(deterministic=True)


def parse(data: bytes) -> Record:
    """A serialized `tf.train.Example` of a split as its Record (path and group may be absent)."""
    example = _example_message().FromString(data)
    features = example.features.feature

    def first(key: str, kind: str) -> Any:
        values = getattr(features[key], kind).value if key in features else ()
        return values[0] if values else None

    encoded, label = first(ENCODED, "bytes_list"), first(LABEL, "int64_list")
    if encoded is None or label is None:
        raise DatasetError(f"a split record lacks {ENCODED!r} or {LABEL!r}")
    return Record(
        encoded=encoded,
        label=int(label),
        path=(first(PATH, "bytes_list") or b"").decode(),
        group=(first(GROUP, "bytes_list") or b"").decode(),
    )


_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def write_tfrecord(path: Path, records: Iterator[bytes] | Sequence[bytes]) -> None:
    """An uncompressed TFRecord file of `records` (as `tf.io.TFRecordWriter` writes it)."""
    with open(path, "wb") as handle:
        for data in records:
            length = struct.pack("<Q", len(data))
            handle.write(length + struct.pack("<I", _masked_crc(length)))
            handle.write(data + struct.pack("<I", _masked_crc(data)))


def read_tfrecord(path: str | Path) -> Iterator[bytes]:
    """The records of an uncompressed TFRecord file, their checksums verified."""
    with open(path, "rb") as handle:
        while header := handle.read(12):
            if len(header) < 12:
                raise DatasetError(f"{path} ends inside a record header: the file is truncated")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise DatasetError(f"{path} is corrupted (a record length fails its checksum)")
            data = handle.read(length)
            footer = handle.read(4)
            if len(data) < length or len(footer) < 4:
                raise DatasetError(f"{path} ends inside a record: the file is truncated")
            if _masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise DatasetError(f"{path} is corrupted (a record fails its checksum)")
            yield data


def write_shards(records: list[Record], output_dir: Path, split: str, shard_size: int) -> list[str]:
    """Write `records` as `<split>-0000i-of-0000n.tfrecord` shards; return the file names."""
    output_dir.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, -(-len(records) // shard_size))
    names = []
    for index in range(n_shards):
        name = f"{split}-{index:05d}-of-{n_shards:05d}.tfrecord"
        shard = records[index * shard_size : (index + 1) * shard_size]
        write_tfrecord(output_dir / name, (serialize(record) for record in shard))
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
    """Iterate the examples of one split in file order (for evaluation, the gate and drift)."""
    for shard in shard_paths(split_dir, split):
        for data in read_tfrecord(shard):
            yield parse(data)
