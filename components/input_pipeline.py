"""The training input pipeline: TFRecord shards to batches of augmented float32 pixels.

Shards are read with a parallel interleave; parsing, PNG decoding and resizing run in parallel;
the resized uint8 images are cached (so later epochs skip decoding), shuffled and batched; the
augmentation runs once per batch, vectorised over the batch, inside the tf.data graph. Randomness
comes from stateless ops keyed by the seed, so a seed gives the same batches in the same order.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tumorflow.components.errors import DatasetError
from tumorflow.components.tfrecords import (
    ENCODED,
    LABEL,
    PATH,
    feature_spec,
    read_split_manifest,
    shard_paths,
)
from tumorflow.pipelines.config import AugmentConfig

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

SHUFFLE_BUFFER_MAX = 4096


def split_size(split_dir: Path, split: str) -> int:
    """The number of examples of one split, from the split manifest."""
    manifest = read_split_manifest(split_dir)
    if split not in manifest["splits"]:
        raise DatasetError(f"{split_dir} has no {split!r} split")
    return int(manifest["splits"][split]["count"])


def resize_pixels(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize decoded RGB pixels (any size) to `image_size` square, as uint8."""
    import tensorflow as tf

    resized = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def decode_to_size(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode one encoded image to uint8 RGB [S, S, 3]; training, evaluation and serving share it.

    A JPEG is decoded with DCT scaling (libjpeg's `ratio` 2, 4 or 8), the largest that keeps its
    short side at or above `image_size`: a 512 px slice bound for 224 px decodes at 256 px, about
    three times faster, and the scaled decode averages pixels rather than aliasing. Other formats
    decode at full size. Either way `resize_pixels` brings the result to `image_size`.
    """
    import tensorflow as tf

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(encoded)
        short_side = tf.minimum(shape[0], shape[1])
        scaled = [
            (short_side >= ratio * image_size, _jpeg_decoder(encoded, ratio)) for ratio in (8, 4, 2)
        ]
        return tf.case(scaled, default=_jpeg_decoder(encoded, 1), exclusive=False)

    def other() -> tf.Tensor:
        return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return resize_pixels(image, image_size)


def _jpeg_decoder(encoded: tf.Tensor, ratio: int):
    import tensorflow as tf

    return lambda: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)


def decoded_examples(
    split_dir: Path, split: str, image_size: int, ordered: bool = True
) -> tf.data.Dataset:
    """Examples of a split as `{"image": uint8 [S, S, 3], "label": int32, "path": string}`.

    `ordered` keeps the shard and record order of the manifest (evaluation); otherwise the
    shards are interleaved in parallel (training), still deterministically.
    """
    import tensorflow as tf

    if split_size(split_dir, split) == 0:
        raise DatasetError(f"the {split!r} split of {split_dir} is empty; re-run the split step")
    files = shard_paths(split_dir, split)
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise DatasetError(f"shards listed in the split manifest are missing: {missing[:3]}")
    spec = feature_spec()

    def parse(raw: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_single_example(raw, spec)
        return {
            "image": decode_to_size(parsed[ENCODED], image_size),
            "label": tf.cast(parsed[LABEL], tf.int32),
            "path": parsed[PATH],
        }

    if ordered or len(files) == 1:
        records = tf.data.TFRecordDataset(files)
    else:
        records = tf.data.Dataset.from_tensor_slices(files).interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(files), 8),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _uniform(seed: tf.Tensor, salt: int, shape: list, low: float, high: float) -> tf.Tensor:
    import tensorflow as tf

    return tf.random.stateless_uniform(
        shape, seed=seed + tf.constant([0, salt], tf.int64), minval=low, maxval=high
    )


def augment_batch(images: tf.Tensor, augment: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """Randomly flip, rotate, zoom and change brightness/contrast of a 0..255 batch.

    One draw per image for each transform. Flips, rotation and zoom are folded into one projective
    warp (run in the input dtype: uint8 from the cache moves a quarter of the bytes), brightness
    and contrast into one multiply-add. `seed` is a stateless seed `[2]` (int64): the same seed
    gives the same augmentation. Returns float32 in 0..255.
    """
    import tensorflow as tf

    batch = tf.shape(images)[0]
    seed = tf.cast(seed, tf.int64)
    geometric = (
        augment.flip_horizontal
        or augment.flip_vertical
        or augment.rotation_degrees > 0
        or augment.zoom > 0
    )
    if geometric:
        height = tf.cast(tf.shape(images)[1], tf.float32)
        width = tf.cast(tf.shape(images)[2], tf.float32)

        def random_sign(enabled: bool, salt: int) -> tf.Tensor:
            if not enabled:
                return tf.ones([batch])
            return tf.where(_uniform(seed, salt, [batch], 0.0, 1.0) < 0.5, -1.0, 1.0)

        flip_x = random_sign(augment.flip_horizontal, 1)
        flip_y = random_sign(augment.flip_vertical, 2)
        max_angle = math.radians(augment.rotation_degrees)
        angle = _uniform(seed, 3, [batch], -max_angle, max_angle)
        k = _uniform(seed, 4, [batch], 1.0 - augment.zoom, 1.0 + augment.zoom)
        # Output pixel p samples input c + k * R(angle) * diag(flip_x, flip_y) * (p - c);
        # k < 1 zooms in, a flip is a reflection about the centre c.
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        a0, a1 = k * tf.cos(angle) * flip_x, -k * tf.sin(angle) * flip_y
        b0, b1 = k * tf.sin(angle) * flip_x, k * tf.cos(angle) * flip_y
        a2 = cx - a0 * cx - a1 * cy
        b2 = cy - b0 * cx - b1 * cy
        zeros = tf.zeros_like(angle)
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1),
            output_shape=tf.shape(images)[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
    images = tf.cast(images, tf.float32)
    if augment.brightness > 0 or augment.contrast > 0:
        # Brightness delta d then contrast factor f about the image mean m:
        # ((x + d) - (m + d)) * f + (m + d) = x * f + (m * (1 - f) + d).
        delta = _uniform(seed, 5, [batch], -augment.brightness, augment.brightness) * 255.0
        factor = _uniform(seed, 6, [batch], 1.0 - augment.contrast, 1.0 + augment.contrast)
        mean = tf.reduce_mean(images, axis=[1, 2, 3])
        offset = mean * (1.0 - factor) + delta
        images = images * factor[:, None, None, None] + offset[:, None, None, None]
    return tf.clip_by_value(images, 0.0, 255.0)


def make_dataset(
    split_dir: Path,
    split: str,
    image_size: int,
    batch_size: int,
    augment: AugmentConfig | None,
    training: bool,
    seed: int,
) -> tf.data.Dataset:
    """Batches `(images float32 [B, S, S, 3] in 0..255, labels int32 [B])` of one split.

    `training` shuffles (reshuffled every epoch) and applies `augment` (None: no augmentation);
    otherwise the order is the manifest's and the images are only resized.
    """
    import tensorflow as tf

    examples = decoded_examples(Path(split_dir), split, image_size, ordered=not training)
    ds = examples.map(lambda e: (e["image"], e["label"])).cache()
    if training:
        buffer = min(split_size(Path(split_dir), split), SHUFFLE_BUFFER_MAX)
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    # The manifest's count as the cardinality: Keras shows progress and a wrong count fails loudly.
    n_batches = -(-split_size(Path(split_dir), split) // batch_size)
    ds = ds.batch(batch_size).apply(tf.data.experimental.assert_cardinality(n_batches))
    if not training or augment is None:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, r: (
                augment_batch(batch[0], augment, tf.stack([tf.constant(seed, tf.int64), r])),
                batch[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return ds.prefetch(tf.data.AUTOTUNE)
