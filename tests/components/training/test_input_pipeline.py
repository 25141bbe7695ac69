"""The tf.data input pipeline: shapes, augmentation that respects the config, seeded order."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import encode, write_split, write_synthetic_split

from tumorflow.components.training.input_pipeline import (
    augment_batch,
    decoded_examples,
    make_dataset,
)
from tumorflow.core.config import AugmentConfig
from tumorflow.core.errors import DatasetError


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return write_synthetic_split(
        tmp_path_factory.mktemp("split"), {"train": 6, "val": 2}, size=40, seed=3, shard_size=7
    )


def _first_epoch(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_batches_have_the_model_input_shape_and_dtype(split_dir):
    ds = make_dataset(split_dir, "train", 32, 5, AugmentConfig(), training=True, seed=0)
    batches = _first_epoch(ds)

    assert sum(len(y) for _, y in batches) == 24
    images, labels = batches[0]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and set(np.concatenate([y for _, y in batches])) == {0, 1, 2, 3}
    assert images.min() >= 0.0 and images.max() <= 255.0 and images.max() > 100.0


def test_evaluation_batches_keep_manifest_order_and_pixels(split_dir):
    ds = make_dataset(split_dir, "val", 40, 3, AugmentConfig(), training=False, seed=0)
    images = np.concatenate([x for x, _ in _first_epoch(ds)])
    examples = list(decoded_examples(split_dir, "val", 40).as_numpy_iterator())

    assert [e["path"].decode() for e in examples][:2] == [
        "cyst/val-00000.png",
        "normal/val-00001.png",
    ]
    np.testing.assert_array_equal(
        images, np.stack([e["image"] for e in examples]).astype("float32")
    )


def test_same_seed_same_batches_and_epochs_reshuffle(split_dir):
    def make(seed):
        return make_dataset(split_dir, "train", 32, 8, AugmentConfig(), training=True, seed=seed)

    first = make(7)
    epoch1, epoch2 = _first_epoch(first), _first_epoch(first)
    again = _first_epoch(make(7))
    other = _first_epoch(make(8))

    for (xa, ya), (xb, yb) in zip(epoch1, again, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_allclose(xa, xb, atol=1e-3)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(epoch1, epoch2, strict=True))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(epoch1, other, strict=True))


def _top_bright_batch(n: int):
    import tensorflow as tf

    image = np.zeros((16, 16, 3), np.float32)
    image[:8] = 200.0
    image[:8, :4] = 250.0
    return tf.constant(np.repeat(image[None], n, axis=0))


def _flips_only(vertical: bool) -> AugmentConfig:
    return AugmentConfig(
        flip_horizontal=True,
        flip_vertical=vertical,
        rotation_degrees=0,
        zoom=0,
        brightness=0,
        contrast=0,
    )


def test_no_vertical_flip_unless_configured():
    import tensorflow as tf

    batch = _top_bright_batch(64)
    upright = []
    left_bright = []
    for draw in range(20):
        out = augment_batch(batch, _flips_only(False), tf.constant([0, draw], tf.int64)).numpy()
        upright.append(out[:, :8].mean(axis=(1, 2, 3)) > out[:, 8:].mean(axis=(1, 2, 3)))
        left_bright.append(
            out[:, :8, :4].mean(axis=(1, 2, 3)) > out[:, :8, 12:].mean(axis=(1, 2, 3))
        )

    assert np.all(upright), "an image was flipped vertically although flip_vertical is off"
    assert 0.3 < np.mean(left_bright) < 0.7, "horizontal flips should happen about half the time"

    flipped = augment_batch(batch, _flips_only(True), tf.constant([0, 1], tf.int64)).numpy()
    assert np.any(flipped[:, :8].mean(axis=(1, 2, 3)) < flipped[:, 8:].mean(axis=(1, 2, 3)))


def test_rotation_zoom_brightness_contrast_change_pixels_within_range():
    import tensorflow as tf

    batch = _top_bright_batch(8)
    config = AugmentConfig(flip_horizontal=False, rotation_degrees=20, zoom=0.2)
    out = augment_batch(batch, config, tf.constant([1, 2], tf.int64)).numpy()

    assert out.shape == batch.shape
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert np.abs(out - batch.numpy()).mean() > 1.0
    assert len({round(float(v), 3) for v in out.mean(axis=(1, 2, 3))}) == 8


def test_empty_or_missing_split_is_a_dataset_error(split_dir):
    with pytest.raises(DatasetError, match="no 'test' split"):
        make_dataset(split_dir, "test", 32, 4, None, training=False, seed=0)


def test_jpeg_decodes_scaled_in_the_dct_and_matches_an_antialiased_resize():
    import tensorflow as tf
    from PIL import Image

    from tumorflow.components.training.input_pipeline import decode_to_size

    smooth = Image.fromarray(_smooth_image(np.random.default_rng(0), 512, 512)[:, :, 0])
    expected = np.asarray(smooth.convert("RGB").resize((64, 64), Image.BOX), dtype=np.float32)
    for data in (encode(smooth, "JPEG"), encode(smooth, "PNG")):
        pixels = decode_to_size(tf.constant(data), 64).numpy()
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        assert np.abs(pixels.astype(np.float32) - expected).mean() < 4.0
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_to_size(tf.constant(b"not an image"), 64)


def _all_off() -> AugmentConfig:
    return AugmentConfig(
        flip_horizontal=False, rotation_degrees=0, zoom=0, brightness=0, contrast=0
    )


def _smooth_image(rng, height: int, width: int) -> np.ndarray:
    from PIL import Image

    coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def test_training_resize_with_every_transform_off_matches_the_serving_resize():
    import tensorflow as tf

    from tumorflow.components.training.input_pipeline import resize_pixels

    rng = np.random.default_rng(0)
    images = np.stack([_smooth_image(rng, 40, 40) for _ in range(3)])
    out = augment_batch(tf.constant(images), _all_off(), tf.constant([0, 0], tf.int64), 32)
    expected = np.stack([resize_pixels(tf.constant(image), 32).numpy() for image in images])

    assert out.shape == (3, 32, 32, 3) and out.dtype == tf.float32
    assert np.abs(out.numpy() - expected.astype(np.float32)).max() <= 2.0


def test_padded_images_are_resized_from_their_own_pixels_only():
    import tensorflow as tf

    batch = np.zeros((2, 40, 40, 3), np.uint8)
    batch[0] = 200
    batch[1, :24, :30] = 100
    sizes = tf.constant([[40, 40], [24, 30]])
    out = augment_batch(
        tf.constant(batch), _all_off(), tf.constant([0, 0], tf.int64), 32, sizes
    ).numpy()

    assert np.all(out[0] == 200.0)
    assert np.all(out[1] == 100.0), "padding leaked into a smaller image"


def test_training_batches_from_images_of_mixed_sizes(tmp_path):
    from tumorflow.components.data.tfrecords import Record

    rng = np.random.default_rng(1)
    sides = [(40, 40), (56, 48), (100, 120), (33, 70)] * 3
    records = [
        Record(encode(_smooth_image(rng, h, w)), i % 2, f"{i}.png", str(i))
        for i, (h, w) in enumerate(sides)
    ]
    write_split(tmp_path, ["a", "b"], {"train": records}, shard_size=5)

    batches = _first_epoch(make_dataset(tmp_path, "train", 32, 5, AugmentConfig(), True, 0))

    assert [x.shape for x, _ in batches] == [(5, 32, 32, 3), (5, 32, 32, 3), (2, 32, 32, 3)]
    # Every image keeps its content: a mostly black image would be a padding or warp bug.
    means = np.concatenate([x.mean(axis=(1, 2, 3)) for x, _ in batches])
    assert means.min() > 40.0


def test_grayscale_training_matches_the_grayscale_serving_decode():
    import tensorflow as tf

    from tumorflow.components.training.input_pipeline import decode_to_size

    rng = np.random.default_rng(2)
    grey = _smooth_image(rng, 48, 48)[:, :, :1].repeat(3, axis=2)
    png = encode(grey)
    served = decode_to_size(tf.constant(png), 32, grayscale=True).numpy()
    one_channel = tf.constant(grey[None, :, :, :1])
    trained = augment_batch(one_channel, _all_off(), tf.constant([0, 0], tf.int64), 32).numpy()

    assert served.shape == (32, 32, 3) and trained.shape == (1, 32, 32, 3)
    assert np.abs(trained[0] - served.astype(np.float32)).max() <= 2.0
    assert np.array_equal(served[..., 0], served[..., 2])


def test_grayscale_batches_repeat_one_augmented_channel(split_dir):
    ds = make_dataset(split_dir, "train", 32, 8, AugmentConfig(), True, 0, grayscale=True)
    images = np.concatenate([x for x, _ in _first_epoch(ds)])

    assert images.shape == (24, 32, 32, 3)
    assert np.array_equal(images[..., 0], images[..., 1])
    assert np.array_equal(images[..., 0], images[..., 2])
    assert images.max() > 100.0
