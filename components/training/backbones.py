"""Classifier models: a Keras application backbone (or a small CNN) with a softmax head.

Every model takes float32 `[batch, H, W, 3]` pixel values in 0..255 and applies its backbone's own
`preprocess_input` inside (a `preprocess` sub-model built from Keras ops only, so `model.keras`
loads without custom objects). The pooled features before the head are the layer `embedding`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tumorflow.core.errors import ConfigError, WeightsUnavailableError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

EMBEDDING_LAYER = "embedding"
OUTPUT_LAYER = "scores"
CUSTOM_CNN = "custom_cnn"
# The input sides Keras publishes MobileNetV2 ImageNet weights for.
MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class KerasWeightsFile:
    """An ImageNet "notop" weights file as `keras.applications` downloads it: the file name in
    the Keras cache and the hash Keras checks it against (`None`: Keras publishes none)."""

    name: str
    keras_hash: str | None


@dataclass(frozen=True)
class _Application:
    """How to build one `keras.applications` backbone and which ImageNet weights file it loads.

    The file names and hashes are those of the `get_file` call in each application's Keras
    source (keras 3.15); tests/components/training/test_weights.py checks them against it."""

    constructor: str
    preprocess_module: str
    imagenet_notop_file: Callable[[int], KerasWeightsFile]
    min_image_size: int = 32


def _mobilenet_v2_file(image_size: int) -> KerasWeightsFile:
    # Keras picks the weights trained at the input side when it is one of these, else 224's.
    rows = image_size if image_size in MOBILENET_V2_SIZES else 224
    name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    return KerasWeightsFile(name, None)


def _fixed_file(name: str, keras_hash: str) -> Callable[[int], KerasWeightsFile]:
    return lambda image_size: KerasWeightsFile(name, keras_hash)


_APPLICATIONS: dict[str, _Application] = {
    "vgg16": _Application(
        "VGG16",
        "vgg16",
        _fixed_file(
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"
        ),
    ),
    "resnet50v2": _Application(
        "ResNet50V2",
        "resnet_v2",
        _fixed_file(
            "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "fac2f116257151a9d068a22e544a4917",
        ),
    ),
    "mobilenetv2": _Application("MobileNetV2", "mobilenet_v2", _mobilenet_v2_file),
    "efficientnetb0": _Application(
        "EfficientNetB0",
        "efficientnet",
        _fixed_file("efficientnetb0_notop.h5", "50bc09e76180e00e4465e1a485ddc09d"),
    ),
    "xception": _Application(
        "Xception",
        "xception",
        _fixed_file(
            "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "b0042744bf5b25fce3cb969f33bebb97",
        ),
        # Keras refuses a smaller input: its entry flow shrinks the image 32-fold without padding.
        min_image_size=71,
    ),
    "densenet121": _Application(
        "DenseNet121",
        "densenet",
        _fixed_file(
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "30ee3e1110167f948a6b9946edeeb738",
        ),
    ),
}

BACKBONES: tuple[str, ...] = (*_APPLICATIONS, CUSTOM_CNN)
PRETRAINED_BACKBONES: tuple[str, ...] = tuple(_APPLICATIONS)


def default_image_size(backbone: str) -> int:
    """The input side a backbone is usually trained at (224 for the ImageNet applications)."""
    _check_backbone(backbone)
    return 96 if backbone == CUSTOM_CNN else 224


def min_image_size(backbone: str) -> int:
    """The smallest input side the backbone builds at."""
    _check_backbone(backbone)
    return _APPLICATIONS[backbone].min_image_size if backbone in _APPLICATIONS else 32


def imagenet_weights_file(backbone: str, image_size: int) -> KerasWeightsFile:
    """The ImageNet "notop" file Keras loads for `backbone` at `image_size` (name and hash)."""
    _check_backbone(backbone)
    if backbone == CUSTOM_CNN:
        raise ConfigError("custom_cnn has no ImageNet weights: it is trained from scratch")
    return _APPLICATIONS[backbone].imagenet_notop_file(image_size)


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(BACKBONES)}")


def keras_weights_cache() -> Path:
    """Where Keras looks for downloaded application weights: `models/` in its home folder
    (`$KERAS_HOME` as Keras read it when it was imported, default `~/.keras`)."""
    from keras.src.backend.config import keras_home

    return Path(keras_home()).expanduser() / "models"


def _preprocess_model(backbone: str, image_size: int) -> keras.Model:
    """The backbone's own input preprocessing as a sub-model of Keras ops (0..255 RGB in)."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="pixels")
    if backbone == CUSTOM_CNN:
        outputs = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    else:
        module = getattr(keras.applications, _APPLICATIONS[backbone].preprocess_module)
        outputs = module.preprocess_input(inputs)
    return keras.Model(inputs, outputs, name="preprocess")


def _custom_cnn(image_size: int, batchnorm_momentum: float) -> keras.Model:
    """A small from-scratch CNN (four conv blocks) for quick runs and the offline demo.

    `batchnorm_momentum` sets how fast the BatchNormalization statistics used at inference follow
    the training batches: with few steps per epoch a high momentum lags the weights and makes
    validation scores swing."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="cnn_input")
    x = inputs
    for filters in (32, 64, 128, 192):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=batchnorm_momentum)(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name=CUSTOM_CNN)


def _application(backbone: str, image_size: int, weights: str) -> keras.Model:
    import keras

    spec = _APPLICATIONS[backbone]
    constructor = getattr(keras.applications, spec.constructor)
    keras_weights: str | None = {"none": None, "imagenet": "imagenet"}.get(weights, weights)
    try:
        return constructor(
            include_top=False,
            weights=keras_weights,
            input_shape=(image_size, image_size, 3),
        )
    except Exception as exc:
        if keras_weights == "imagenet" and "URL fetch failure" in str(exc):
            file_name = spec.imagenet_notop_file(image_size).name
            raise WeightsUnavailableError(
                f"cannot download the ImageNet weights of {backbone} (offline?). Copy the Keras "
                f"no-top file {file_name} from a machine with network access and run "
                f"`tumorflow weights import {file_name} --backbone {backbone} --image-size "
                f"{image_size}`, which checks it and puts it into the Keras cache "
                f"{keras_weights_cache()} (set KERAS_HOME to use another folder); or set "
                f"`train.weights` to a local weights file (a .weights.h5 saved from this backbone)."
            ) from exc
        if keras_weights not in (None, "imagenet"):
            raise WeightsUnavailableError(
                f"cannot load weights file {weights} into the {backbone} backbone at "
                f"{image_size}x{image_size}: {exc}. Give a no-top weights file of this backbone."
            ) from exc
        raise


def _load_backbone_weights(backbone: keras.Model, name: str, path: str) -> None:
    try:
        backbone.load_weights(path)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"cannot load weights file {path} into the {name} backbone: {exc}. "
            f"Give a weights file saved from this backbone at this image size."
        ) from exc


def build_backbone(
    backbone: str, image_size: int, weights: str, batchnorm_momentum: float = 0.9
) -> keras.Model:
    """The feature extractor alone: `[batch, H, W, 3]` preprocessed pixels to a feature map.

    `weights` is `none` (random init), `imagenet` (Keras download / cache) or a weights file path.
    `batchnorm_momentum` applies to the from-scratch custom_cnn only.
    """
    if image_size < min_image_size(backbone):
        raise ConfigError(
            f"{backbone} needs an image_size of at least {min_image_size(backbone)} pixels, "
            f"got {image_size}"
        )
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise WeightsUnavailableError(
            f"weights file {weights} does not exist; give the path of a weights file "
            f"(.h5 / .weights.h5), `imagenet` or `none`"
        )
    if backbone != CUSTOM_CNN:
        return _application(backbone, image_size, weights)
    if weights == "imagenet":
        raise ConfigError(
            "custom_cnn has no ImageNet weights: use `train.weights=none` or a weights file"
        )
    model = _custom_cnn(image_size, batchnorm_momentum)
    if weights != "none":
        _load_backbone_weights(model, backbone, weights)
    return model


def build_classifier(
    backbone: str,
    num_classes: int,
    image_size: int,
    weights: str,
    dropout: float,
    batchnorm_momentum: float = 0.9,
) -> tuple[keras.Model, keras.Model]:
    """The full classifier and its backbone sub-model (the part frozen in stage 1).

    The backbone is called with `training=False`, so its BatchNormalization layers stay in
    inference mode even when unfrozen for fine-tuning. The softmax output is float32 under
    mixed precision too.
    """
    import keras

    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least two classes, got {num_classes}")
    base = build_backbone(backbone, image_size, weights, batchnorm_momentum)
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = _preprocess_model(backbone, image_size)(inputs)
    # A pretrained backbone keeps BatchNormalization in inference mode; one trained from scratch
    # must learn its statistics.
    x = base(x, training=None if backbone == CUSTOM_CNN else False)
    embedding = keras.layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(embedding)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name=OUTPUT_LAYER
    )(x)
    model = keras.Model(inputs, outputs, name=f"{backbone}_classifier")
    log.info(
        "built %s classifier: %dx%d input, %d classes, weights=%s, %d parameters",
        backbone,
        image_size,
        image_size,
        num_classes,
        weights,
        model.count_params(),
    )
    return model, base
