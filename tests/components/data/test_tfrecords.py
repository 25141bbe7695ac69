"""The split's TFRecord shards, written and read without TensorFlow, are the ones TensorFlow
writes and reads (training reads them with tf.data)."""

from __future__ import annotations

import json

import pytest

from tumorflow.components.data import tfrecords
from tumorflow.components.data.tfrecords import Record
from tumorflow.core.errors import DatasetError


def _records() -> list[Record]:
    return [
        Record(bytes(range(i % 256)) * 3, i % 4, f"scans/é{i}.png", f"group-{i // 2}")
        for i in range(23)
    ] + [Record(b"", 0, "", "")]


def _split(folder, records, shard_size=10):
    names = tfrecords.write_shards(records, folder, "train", shard_size)
    manifest = {"classes": ["a", "b", "c", "d"], "splits": {"train": {"shards": names}}}
    (folder / tfrecords.MANIFEST_JSON).write_text(json.dumps(manifest))
    return names


def test_shards_round_trip_in_order(tmp_path):
    records = _records()
    names = _split(tmp_path, records)
    assert names == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert list(tfrecords.read_records(tmp_path, "train")) == records


def test_shards_are_byte_for_byte_reproducible(tmp_path):
    _split(tmp_path / "one", _records())
    _split(tmp_path / "two", _records())
    for name in ("train-00000-of-00003.tfrecord", "train-00002-of-00003.tfrecord"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_tensorflow_reads_our_shards_and_we_read_its(tmp_path):
    tf = pytest.importorskip("tensorflow")
    records = _records()
    names = _split(tmp_path, records)
    read_by_tf = []
    for raw in tf.data.TFRecordDataset([str(tmp_path / name) for name in names]):
        parsed = tf.io.parse_single_example(raw, tfrecords.feature_spec())
        read_by_tf.append(
            Record(
                parsed[tfrecords.ENCODED].numpy(),
                int(parsed[tfrecords.LABEL].numpy()),
                parsed[tfrecords.PATH].numpy().decode(),
                parsed[tfrecords.GROUP].numpy().decode(),
            )
        )
    assert read_by_tf == records

    def tf_example(record: Record) -> bytes:
        def text(value: bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

        features = {
            tfrecords.ENCODED: text(record.encoded),
            tfrecords.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[record.label])),
            tfrecords.PATH: text(record.path.encode()),
            tfrecords.GROUP: text(record.group.encode()),
        }
        example = tf.train.Example(features=tf.train.Features(feature=features))
        return example.SerializeToString(deterministic=True)

    written_by_tf = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(written_by_tf)) as writer:
        for record in records:
            writer.write(tf_example(record))
    payloads = list(tfrecords.read_tfrecord(written_by_tf))
    assert [tfrecords.parse(data) for data in payloads] == records
    assert payloads == [tfrecords.serialize(record) for record in records]
    tfrecords.write_tfrecord(tmp_path / "ours.tfrecord", payloads)
    assert (tmp_path / "ours.tfrecord").read_bytes() == written_by_tf.read_bytes()


def test_a_corrupted_or_truncated_shard_is_an_error(tmp_path):
    names = _split(tmp_path, _records())
    shard = tmp_path / names[0]
    good = shard.read_bytes()
    shard.write_bytes(good[:40] + bytes([good[40] ^ 1]) + good[41:])
    with pytest.raises(DatasetError, match="corrupted"):
        list(tfrecords.read_records(tmp_path, "train"))
    shard.write_bytes(good[:-3])
    with pytest.raises(DatasetError, match="truncated"):
        list(tfrecords.read_records(tmp_path, "train"))
