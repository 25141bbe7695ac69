"""The training input pipeline: TFRecord shards to batches of augmented float32 pixels.

Shards are read with a parallel interleave; parsing and decoding (JPEGs DCT-scaled towards the
model's input size) run in parallel; the decoded uint8 images are cached (so later epochs skip
decoding), shuffled and batched. For training, resize and augmentation are one OpenCV warp per
image, run per batch in parallel; evaluation resizes in TF, as the serving signature does. The
random draws come from stateless ops keyed by the seed, so a seed gives the same batches in the
same order.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tumorflow.components.data.image_files import MAX_IMAGE_PIXELS
from tumorflow.components.data.tfrecords import (
    ENCODED,
    LABEL,
    PATH,
    feature_spec,
    read_split_manifest,
    shard_paths,
)
from tumorflow.core.config import AugmentConfig
from tumorflow.core.errors import DatasetError

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
    """Resize decoded pixels (any size, any channels) to `image_size` square, as uint8."""
    import tensorflow as tf

    resized = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def decode_to_size(encoded: tf.Tensor, image_size: int, grayscale: bool = False) -> tf.Tensor:
    """Decode one encoded image to uint8 RGB [S, S, 3]; evaluation and serving share it.

    `decode_scaled`, then `resize_pixels` to `image_size`; a grayscale model's single channel
    is repeated into the three its backbone takes. Training resizes inside its augmentation warp
    instead, which with no transform drawn gives these same pixels.
    """
    import tensorflow as tf

    pixels = resize_pixels(decode_scaled(encoded, image_size, grayscale), image_size)
    return tf.image.grayscale_to_rgb(pixels) if grayscale else pixels


def decode_scaled(encoded: tf.Tensor, image_size: int, grayscale: bool = False) -> tf.Tensor:
    """Decode one encoded image to uint8 [H, W, C] (C = 1 for `grayscale`, else RGB), a JPEG at
    the smallest DCT scale that still covers `image_size`.

    A JPEG is decoded with DCT scaling (libjpeg's `ratio` 2, 4 or 8), the largest that keeps its
    short side at or above `image_size`: a 512 px slice bound for 224 px decodes at 256 px, and
    the scaled decode averages pixels rather than aliasing. PNG and BMP decode at full size.
    Before decoding, another format (GIF, WebP: an animated or compressed one can expand without
    bound) or a header that declares more than `MAX_IMAGE_PIXELS` is an InvalidArgumentError.
    """
    import tensorflow as tf

    channels = 1 if grayscale else 3

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(encoded)
        with tf.control_dependencies([_check_pixels(tf.cast(shape[0] * shape[1], tf.int64))]):
            short_side = tf.minimum(shape[0], shape[1])
        scaled = [
            (short_side >= ratio * image_size, _jpeg_decoder(encoded, ratio, channels))
            for ratio in (8, 4, 2)
        ]
        return tf.case(scaled, default=_jpeg_decoder(encoded, 1, channels), exclusive=False)

    def other() -> tf.Tensor:
        with tf.control_dependencies(_png_or_bmp_within_limit(encoded)):
            return tf.io.decode_image(
                encoded, channels=channels, expand_animations=False, dtype=tf.uint8
            )

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, channels])
    return image


def _png_or_bmp_within_limit(encoded: tf.Tensor) -> list[tf.Operation]:
    """Checks, before decoding, that `encoded` is a PNG or BMP whose header declares at most
    `MAX_IMAGE_PIXELS`; each fails with InvalidArgumentError."""
    import tensorflow as tf

    def side(offset: int, big_endian: bool) -> tf.Tensor:
        """A 4-byte header field, its magnitude capped at 2**31 so a product fits in int64."""
        raw = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, offset, 4), tf.uint8), tf.int64)
        weights = [256 ** (3 - i if big_endian else i) for i in range(4)]
        value = tf.reduce_sum(raw * tf.constant(weights, tf.int64))
        value = tf.where(value >= 2**31, 2**32 - value, value)  # BMP: a negative height
        return tf.minimum(value, 2**31)

    # PNG IHDR: big-endian width and height at bytes 16 and 20. BMP info header: little-endian
    # int32 width and height at 18 and 22 (a negative height means top-down rows).
    length = tf.strings.length(encoded)
    header = tf.strings.substr(encoded, 0, tf.minimum(length, 8))
    is_png = tf.logical_and(length >= 26, tf.equal(header, b"\x89PNG\r\n\x1a\n"))
    is_bmp = tf.logical_and(length >= 26, tf.strings.substr(header, 0, 2) == "BM")
    known = tf.debugging.Assert(
        tf.logical_or(is_png, is_bmp),
        [
            "unsupported or truncated image: send JPEG, PNG or BMP (GIF and WebP are refused: "
            "an animated or compressed one can expand without bound)"
        ],
    )
    with tf.control_dependencies([known]):
        pixels = tf.cond(
            is_png,
            lambda: side(16, True) * side(20, True),
            lambda: side(18, False) * side(22, False),
        )
    return [known, _check_pixels(pixels)]


def _check_pixels(pixels: tf.Tensor) -> tf.Operation:
    import tensorflow as tf

    return tf.debugging.assert_less_equal(
        pixels,
        tf.constant(MAX_IMAGE_PIXELS, tf.int64),
        message=f"the image is larger than {MAX_IMAGE_PIXELS} pixels; send it downscaled",
    )


def decode_for_augmentation(
    encoded: tf.Tensor, image_size: int, grayscale: bool = False
) -> tf.Tensor:
    """Pixels for `augment_batch`, which resizes them: `decode_scaled`, resized here only when
    a side exceeds 1.5 x `image_size`, which bounds what the training cache holds per image."""
    import tensorflow as tf

    image = decode_scaled(encoded, image_size, grayscale)
    too_big = tf.reduce_max(tf.shape(image)[:2]) > int(1.5 * image_size)
    image = tf.cond(too_big, lambda: resize_pixels(image, image_size), lambda: image)
    image.set_shape([None, None, 1 if grayscale else 3])
    return image


def _jpeg_decoder(encoded: tf.Tensor, ratio: int, channels: int):
    import tensorflow as tf

    return lambda: tf.io.decode_jpeg(encoded, channels=channels, ratio=ratio)


def decoded_examples(
    split_dir: Path,
    split: str,
    image_size: int,
    ordered: bool = True,
    resize: bool = True,
    grayscale: bool = False,
) -> tf.data.Dataset:
    """Examples of a split as `{"image": uint8 [S, S, 3], "label": int32, "path": string}`.

    `ordered` keeps the shard and record order of the manifest (evaluation); otherwise the
    shards are interleaved in parallel (training), still deterministically. `resize` False
    gives `decode_for_augmentation` pixels, [H, W, C], for `augment_batch` to resize.
    `grayscale`: decode one channel (see `decode_to_size`).
    """
    import tensorflow as tf

    if split_size(split_dir, split) == 0:
        raise DatasetError(f"the {split!r} split of {split_dir} is empty; re-run the split step")
    files = shard_paths(split_dir, split)
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise DatasetError(f"shards listed in the split manifest are missing: {missing[:3]}")
    spec = feature_spec()
    decode = decode_to_size if resize else decode_for_augmentation

    def parse(raw: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_single_example(raw, spec)
        return {
            "image": decode(parsed[ENCODED], image_size, grayscale),
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


def augment_batch(
    images: tf.Tensor,
    augment: AugmentConfig,
    seed: tf.Tensor,
    image_size: int | None = None,
    sizes: tf.Tensor | None = None,
) -> tf.Tensor:
    """Resize to `image_size` and randomly flip, rotate, zoom, brighten and contrast a batch.

    `images` is a 0..255 batch `[B, H, W, C]` in which image i fills the top-left `sizes[i]`
    (height, width) and the rest is padding (None: every image is H x W). Each image gets one
    draw of every transform. The resize, flips, rotation and zoom are one affine warp per image
    (bilinear; outside the image its edge pixels repeat, as in the resize), and brightness and
    contrast one multiply-add rounded to 0..255. With every transform off this is the bilinear
    resize of `decode_to_size`, so training and serving see the same pixels. The warps run in
    OpenCV, about ten times faster than TF's projective transform on CPU. `seed` is a stateless
    seed `[2]` (int64): the same seed gives the same batch. `image_size` None keeps H x W.
    Returns float32 `[B, S, S, 3]`: a single channel (C = 1) is repeated into three.
    """
    import tensorflow as tf

    batch = tf.shape(images)[0]
    if images.dtype != tf.uint8:
        images = tf.saturate_cast(tf.round(images), tf.uint8)
    if sizes is None:
        sizes = tf.tile(tf.shape(images)[None, 1:3], [batch, 1])
    out_h = images.shape[1] if image_size is None else image_size
    out_w = images.shape[2] if image_size is None else image_size
    seed = tf.cast(seed, tf.int64)

    def random_sign(enabled: bool, salt: int) -> tf.Tensor:
        if not enabled:
            return tf.ones([batch])
        return tf.where(_uniform(seed, salt, [batch], 0.0, 1.0) < 0.5, -1.0, 1.0)

    max_angle = math.radians(augment.rotation_degrees)
    draws = [
        random_sign(augment.flip_horizontal, 1),
        random_sign(augment.flip_vertical, 2),
        _uniform(seed, 3, [batch], -max_angle, max_angle),
        _uniform(seed, 4, [batch], 1.0 - augment.zoom, 1.0 + augment.zoom),
        _uniform(seed, 5, [batch], -augment.brightness, augment.brightness) * 255.0,
        _uniform(seed, 6, [batch], 1.0 - augment.contrast, 1.0 + augment.contrast),
    ]
    out = tf.numpy_function(
        lambda *arrays: _warp_and_adjust(*arrays, out_h, out_w),
        [images, tf.cast(sizes, tf.int32), *draws],
        tf.uint8,
        stateful=False,
    )
    out.set_shape([images.shape[0], out_h, out_w, 3])
    return tf.cast(out, tf.float32)


def _warp_and_adjust(images, sizes, flip_x, flip_y, angle, zoom, delta, factor, out_h, out_w):
    """The OpenCV body of `augment_batch`, on numpy arrays."""
    import numpy as np

    cv2 = _opencv()
    out = np.empty((len(images), out_h, out_w, 3), np.uint8)
    grey = images.shape[3] == 1
    # The output pixel p samples the input at c_in + D k R(angle) F (p - c_out): F the flips, R
    # the rotation, k the zoom (k < 1 zooms in), D the per-axis resize factors. With k = 1 and
    # no rotation or flip this is the half-pixel bilinear resize of tf.image.resize.
    out_cx, out_cy = (out_w - 1) / 2.0, (out_h - 1) / 2.0
    for i, (height, width) in enumerate(sizes):
        cos, sin = math.cos(angle[i]) * zoom[i], math.sin(angle[i]) * zoom[i]
        sx, sy = width / out_w, height / out_h
        a0, a1 = sx * cos * flip_x[i], -sx * sin * flip_y[i]
        b0, b1 = sy * sin * flip_x[i], sy * cos * flip_y[i]
        matrix = np.array(
            [
                [a0, a1, (width - 1) / 2.0 - a0 * out_cx - a1 * out_cy],
                [b0, b1, (height - 1) / 2.0 - b0 * out_cx - b1 * out_cy],
            ],
            np.float64,
        )
        source = images[i, :height, :width, 0] if grey else images[i, :height, :width]
        warped = cv2.warpAffine(
            source,
            matrix,
            (out_w, out_h),
            dst=None if grey else out[i],
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        if delta[i] != 0.0 or factor[i] != 1.0:
            # Brightness delta d, then contrast factor f about the image mean m:
            # ((x + d) - (m + d)) * f + (m + d) = x * f + (m * (1 - f) + d), saturated to 0..255.
            # The mean over every channel at once (OpenCV's 3-channel mean is far slower).
            mean = cv2.mean(warped.reshape(out_h, -1))[0]
            offset = mean * (1.0 - factor[i]) + delta[i]
            cv2.addWeighted(
                warped, float(factor[i]), warped, 0.0, offset, dst=warped, dtype=cv2.CV_8U
            )
        if grey:
            cv2.cvtColor(warped, cv2.COLOR_GRAY2RGB, dst=out[i])
    return out


def _opencv():
    """cv2, single-threaded: tf.data already runs batches in parallel on every core."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def make_dataset(
    split_dir: Path,
    split: str,
    image_size: int,
    batch_size: int,
    augment: AugmentConfig | None,
    training: bool,
    seed: int,
    grayscale: bool = False,
) -> tf.data.Dataset:
    """Batches `(images float32 [B, S, S, 3] in 0..255, labels int32 [B])` of one split.

    `training` shuffles (reshuffled every epoch) and applies `augment` (None: no augmentation);
    otherwise the order is the manifest's and the images are only resized. `grayscale` decodes,
    caches and augments one channel, repeated into three at the end of each batch: CT and MRI
    slices are grey, and this keeps a third of the cache and of the augmentation work.
    """
    import tensorflow as tf

    split_dir = Path(split_dir)
    augmenting = training and augment is not None
    examples = decoded_examples(
        split_dir,
        split,
        image_size,
        ordered=not training,
        resize=not augmenting,
        grayscale=grayscale,
    )
    ds = examples.map(lambda e: (e["image"], tf.shape(e["image"])[:2], e["label"])).cache()
    if training:
        buffer = min(split_size(split_dir, split), SHUFFLE_BUFFER_MAX)
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    # The manifest's count as the cardinality: Keras shows progress and a wrong count fails loudly.
    n_batches = -(-split_size(split_dir, split) // batch_size)
    # Unresized images may differ in size: a batch is padded to its largest, and each image's
    # own size travels with it so the warp reads only its pixels.
    ds = ds.padded_batch(batch_size).apply(tf.data.experimental.assert_cardinality(n_batches))
    if not augmenting:
        ds = ds.map(
            lambda x, _, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, r: (
                augment_batch(
                    batch[0],
                    augment,
                    tf.stack([tf.constant(seed, tf.int64), r]),
                    image_size,
                    batch[1],
                ),
                batch[2],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    options = tf.data.Options()
    # Fuse the per-example maps (parse + decode, then the tuple) into one parallel stage.
    options.experimental_optimization.map_fusion = True
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
