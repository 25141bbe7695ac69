"""Backbones: every name builds, has an `embedding` layer, and weight problems say what to do."""

from __future__ import annotations

import numpy as np
import pytest

from tumorflow.components.training.backbones import (
    BACKBONES,
    EMBEDDING_LAYER,
    build_backbone,
    build_classifier,
    default_image_size,
    keras_weights_cache,
    min_image_size,
)
from tumorflow.core.errors import ConfigError, WeightsUnavailableError


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_builds_a_softmax_classifier_with_an_embedding(backbone):
    size = min_image_size(backbone)
    model, base = build_classifier(backbone, 3, size, "none", 0.2)

    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, 3)
    assert model.get_layer(EMBEDDING_LAYER).output.shape[-1] > 0
    assert base.name in [layer.name for layer in model.layers]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    probs = model(pixels, training=False).numpy()
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_default_sizes_and_unknown_backbone():
    assert default_image_size("resnet50v2") == 224
    assert default_image_size("custom_cnn") < 224
    with pytest.raises(ConfigError, match="choose one of"):
        default_image_size("alexnet")


# vgg16's preprocessing is "caffe" mode (BGR, mean subtracted), densenet121's "torch" mode (scaled
# to 0..1, normalised per channel; half a minute on 2 cores, so `pytest -m exhaustive`).
@pytest.mark.parametrize(
    "backbone", ["vgg16", pytest.param("densenet121", marks=pytest.mark.exhaustive)]
)
def test_saved_classifier_loads_without_custom_objects(backbone, tmp_path):
    import keras

    model, _ = build_classifier(backbone, 2, 32, "none", 0.0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")

    pixels = np.random.default_rng(1).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(pixels).numpy(), model(pixels).numpy(), rtol=1e-5)


def test_imagenet_offline_says_how_to_provide_weights():
    expected = (
        keras_weights_cache() / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    )
    if expected.exists():
        pytest.skip("ImageNet weights are cached here, so the download is not attempted")
    with pytest.raises(WeightsUnavailableError) as error:
        build_backbone("mobilenetv2", 96, "imagenet")
    message = str(error.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in message
    assert "train.weights" in message and "KERAS_HOME" in message


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_classifier("custom_cnn", 2, 48, str(tmp_path / "nope.weights.h5"), 0.1)


def test_weights_file_of_another_shape_is_a_clear_error(tmp_path):
    path = tmp_path / "vgg.weights.h5"
    build_backbone("vgg16", 32, "none").save_weights(path)
    with pytest.raises(WeightsUnavailableError, match="cannot load weights file"):
        build_backbone("custom_cnn", 48, str(path))


def test_weights_file_round_trips(tmp_path):
    source = build_backbone("custom_cnn", 48, "none")
    path = tmp_path / "cnn.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("custom_cnn", 48, str(path))
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_backbone_below_its_smallest_input_is_a_clear_error():
    assert min_image_size("xception") == 71
    with pytest.raises(ConfigError, match="xception needs an image_size of at least 71"):
        build_backbone("xception", 64, "none")
