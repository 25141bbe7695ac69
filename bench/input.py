"""`tumorflow bench input`: the training input pipeline against the Keras baseline and bare decoding.

One run makes synthetic CT-like images, writes them both as JPEG class folders (what a Keras user
loads with `image_dataset_from_directory`) and as a TFRecord split (the same JPEG bytes inside, as
the split step keeps 8-bit JPEGs), then measures images/s of:
(a) our pipeline, a cold first epoch (decode, cache, shuffle, batch, resize + augment) and a
    cached second epoch, in RGB and in the one-channel mode of the CT/MRI presets;
(b) the Keras guide's way: `image_dataset_from_directory` + Keras augmentation layers mapped over
    the batches (with AUTOTUNE parallelism and prefetch, as the guide writes it);
(c) bare parallel decoding of the same TFRecords (read + decode only), the limit, in RGB and in
    one channel (the limit of the one-channel mode).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorflow.components.data.synthetic import SYNTHETIC_CLASSES, draw_synthetic_scan, encode_image
from tumorflow.components.data.tfrecords import Record, write_split

log = logging.getLogger(__name__)

OURS_RGB = "ours, first epoch (decode+resize+augment)"
OURS_RGB_CACHED = "ours, cached epoch"
OURS_GREY = "ours grey (CT/MRI presets), first epoch"
OURS_GREY_CACHED = "ours grey, cached epoch"
KERAS = "keras image_dataset_from_directory + layers"
BARE = "bare parallel decode (same JPEGs)"
BARE_GREY = "bare parallel decode, one channel"


def _write_bench_data(
    workdir: Path, n_images: int, source_size: int, seed: int
) -> tuple[Path, Path]:
    """The same synthetic JPEG scans as class folders and as a TFRecord `train` split (the JPEG
    bytes kept as they are, as the validate step keeps 8-bit JPEGs)."""
    rng = np.random.default_rng(seed)
    jpeg_dir, split_dir = workdir / "folders", workdir / "split"
    records = []
    for index in range(n_images):
        label = index % len(SYNTHETIC_CLASSES)
        pixels = draw_synthetic_scan(rng, label, len(SYNTHETIC_CLASSES), source_size)
        folder = jpeg_dir / SYNTHETIC_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        jpeg = encode_image(pixels, "JPEG")
        (folder / f"{index:05d}.jpg").write_bytes(jpeg)
        records.append(Record(jpeg, label, f"{index:05d}", str(index)))
    write_split(split_dir, SYNTHETIC_CLASSES, {"train": records}, max(1, -(-n_images // 8)))
    return jpeg_dir, split_dir


@dataclass(frozen=True)
class Pass:
    """One full pass over a dataset: the images it gave, images/s of wall time and CPU ms per
    image (all threads)."""

    images: int
    rate: float
    cpu_ms: float


def _one_pass(dataset, batched: bool) -> Pass:
    """Time from creating the iterator to its last element. Deleting a tf.data iterator now and
    then blocks for about 1.3 s after the work is done, so that happens after the clock stops."""
    wall, cpu = time.perf_counter(), time.process_time()
    iterator = iter(dataset)
    count = 0
    for element in iterator:
        count += int(element[0].shape[0]) if batched else 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del iterator
    return Pass(count, count / wall, 1000.0 * cpu / max(count, 1))


def _warm_up(dataset, batches: int = 3) -> None:
    for _ in dataset.take(batches):
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=2000, help="synthetic images (default 2000)")
    parser.add_argument("--size", type=int, default=224, help="training input side (default 224)")
    parser.add_argument(
        "--source-size", type=int, default=512, help="side of the source images (default 512)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--workdir", type=Path, help="where to write the images (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="passes per pipeline, taking turns; the table shows the median (default 3)",
    )


def run(args: argparse.Namespace) -> int:
    """Measure the three pipelines on the same images and print the table with ratios."""
    import keras
    import tensorflow as tf

    from tumorflow.components.data.tfrecords import ENCODED, feature_spec, shard_paths
    from tumorflow.components.training.input_pipeline import make_dataset
    from tumorflow.core.config import AugmentConfig

    with tempfile.TemporaryDirectory(prefix="tumorflow-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        log.info("writing %d synthetic %dpx scans to %s", args.images, args.source_size, workdir)
        jpeg_dir, split_dir = _write_bench_data(workdir, args.images, args.source_size, args.seed)
        size, batch = args.size, args.batch_size
        augment = AugmentConfig()

        def ours(grayscale: bool) -> tf.data.Dataset:
            return make_dataset(
                split_dir, "train", size, batch, augment, True, args.seed, grayscale
            )

        def keras_baseline() -> tf.data.Dataset:
            ds = keras.utils.image_dataset_from_directory(
                jpeg_dir, image_size=(size, size), batch_size=batch, seed=args.seed, verbose=False
            )
            augmentation = keras.Sequential(
                [
                    keras.layers.RandomFlip("horizontal"),
                    keras.layers.RandomRotation(augment.rotation_degrees / 360.0),
                    keras.layers.RandomZoom(augment.zoom),
                    keras.layers.RandomContrast(augment.contrast),
                ]
            )
            ds = ds.map(
                lambda x, y: (augmentation(x, training=True), y),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            return ds.prefetch(tf.data.AUTOTUNE)

        def bare_decode(channels: int) -> tf.data.Dataset:
            spec = feature_spec()
            files = shard_paths(split_dir, "train")
            return (
                tf.data.Dataset.from_tensor_slices(files)
                .interleave(
                    tf.data.TFRecordDataset,
                    cycle_length=len(files),
                    num_parallel_calls=tf.data.AUTOTUNE,
                )
                .map(
                    lambda raw: (
                        tf.io.decode_image(
                            tf.io.parse_single_example(raw, spec)[ENCODED],
                            channels=channels,
                            expand_animations=False,
                        ),
                    ),
                    num_parallel_calls=tf.data.AUTOTUNE,
                )
                .prefetch(tf.data.AUTOTUNE)
            )

        for dataset in (ours(False), ours(True), keras_baseline(), bare_decode(3)):
            _warm_up(dataset)
        # The pipelines take turns, a fresh dataset each time (so "first epoch" really decodes),
        # and the median of the repeats is reported.
        rows = (OURS_RGB, OURS_RGB_CACHED, OURS_GREY, OURS_GREY_CACHED, KERAS, BARE, BARE_GREY)
        passes: dict[str, list[Pass]] = {name: [] for name in rows}
        for _ in range(max(1, args.repeats)):
            for grayscale, first, cached in (
                (False, OURS_RGB, OURS_RGB_CACHED),
                (True, OURS_GREY, OURS_GREY_CACHED),
            ):
                ds = ours(grayscale)
                passes[first].append(_one_pass(ds, batched=True))
                passes[cached].append(_one_pass(ds, batched=True))
            passes[KERAS].append(_one_pass(keras_baseline(), batched=True))
            passes[BARE].append(_one_pass(bare_decode(3), batched=False))
            passes[BARE_GREY].append(_one_pass(bare_decode(1), batched=False))
    rates = {name: statistics.median(p.rate for p in runs) for name, runs in passes.items()}
    keras_rate, decode_rate = rates[KERAS], rates[BARE]
    print(
        f"\ninput pipeline, {args.images} images {args.source_size}px -> {size}px, "
        f"batch {batch}, {len(os.sched_getaffinity(0))} CPU cores, "
        f"median of {max(1, args.repeats)} passes"
    )
    print(
        f"{'pipeline':<46} {'images':>7} {'images/s':>10} {'min-max':>13} {'cpu ms/img':>11} "
        f"{'vs keras':>9} {'vs decode':>10}"
    )
    for name, runs in passes.items():
        rate = rates[name]
        spread = f"{min(p.rate for p in runs):.0f}-{max(p.rate for p in runs):.0f}"
        cpu_ms = statistics.median(p.cpu_ms for p in runs)
        print(
            f"{name:<46} {min(p.images for p in runs):>7} {rate:>10.1f} {spread:>13} "
            f"{cpu_ms:>11.2f} "
            f"{rate / keras_rate:>8.2f}x {rate / decode_rate:>9.2f}x"
        )
    for label, name, bare in (("rgb", OURS_RGB, BARE), ("grey", OURS_GREY, BARE_GREY)):
        first = rates[name]
        print(
            f"targets, {label} first epoch: >= 3x keras ({first / keras_rate:.2f}x), "
            f">= 0.8x bare decode with as many channels ({first / rates[bare]:.2f}x)"
        )
    return 0
