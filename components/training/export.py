"""Export a trained Keras model as the TF Serving SavedModel of docs/artifacts.md.

The served signature takes encoded image bytes (JPEG/PNG/BMP, any size up to
`MAX_IMAGE_PIXELS`, gray or colour), so clients never need to know the model's input size, and
decoding happens in one place for every client. Undecodable bytes, other formats and images whose
header declares too many pixels (decompression bombs) make the call fail with
`InvalidArgumentError` before anything large is decoded, which TF Serving and our own servers
answer as gRPC `INVALID_ARGUMENT`.

The `explain` signatures answer a heat map of the explained class at input resolution, for every
backbone: Grad-CAM of the last feature map, where it enters the `embedding` pooling, times the
Gaussian-smoothed magnitude of the class score's gradient with respect to the input pixels
(`explanation_heatmap`). Grad-CAM says which region (one cell of the last map is 16-32 pixels);
the pixel gradient says which pixels inside it, so lesions smaller than a cell, such as kidney
stones, get the peak. On the phantom's pointing game (`tumorflow bench explain`) this raised the
hits from 72.6% (Grad-CAM alone) to 84.1% at 128 px, and from 59.1% to 90.9% at 64 px.

Where the train step fitted them (serving_statistics.py), the export folds in the calibration
temperature, so every signature's `scores` are softmax(logits / T) (the heat map still follows the
uncalibrated score, whose argmax is the same), and the OOD detector, so `serving_default` and
the `explain` signatures also answer `ood_score` (Mahalanobis distance of the embedding to the nearest training class) and
`in_distribution` (the score at or below the threshold chosen on the validation split).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tumorflow.components.training.backbones import OUTPUT_LAYER
from tumorflow.components.training.input_pipeline import decode_to_size
from tumorflow.components.training.serving_statistics import (
    ServingStatistics,
    read_serving_statistics,
)
from tumorflow.core import serving_layout
from tumorflow.core.artifacts import MODEL_FILE, MODEL_INFO_FILE, SERVING_EXPORT
from tumorflow.core.errors import ModelError

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
# Grad-CAM of the predicted class; EXPLAIN_CLASS_SIGNATURE takes the class as `class_index` too.
EXPLAIN_SIGNATURE = "explain"
EXPLAIN_CLASS_SIGNATURE = "explain_class"
INPUT = "image_bytes"
CLASS_INPUT = "class_index"
HEATMAP = "heatmap"
OOD_SCORE = "ood_score"
IN_DISTRIBUTION = "in_distribution"
EMBEDDING_LAYER = "embedding"
# The Gaussian smoothing of the pixel evidence in explanations, as a fraction of the image side.
PIXEL_EVIDENCE_SIGMA = 1 / 32
SAVED_MODEL_DIGEST = "saved_model_sha256"
WEIGHTS_DIGEST = "weights_sha256"


def read_model_info(model_dir: Path) -> dict[str, Any]:
    """The `model_info.json` of a model folder, checked for the fields serving needs."""
    info_path = Path(model_dir) / MODEL_INFO_FILE
    if not (Path(model_dir) / MODEL_FILE).exists() or not info_path.exists():
        raise ModelError(
            f"{model_dir} is not a model folder: it needs {MODEL_FILE} and {MODEL_INFO_FILE} "
            "(the output of the train step)"
        )
    info = json.loads(info_path.read_text())
    missing = [key for key in ("classes", "image_size") if not info.get(key)]
    if missing:
        raise ModelError(f"{info_path} lacks {', '.join(missing)}; re-run the train step")
    return info


def saved_model_digest(folder: Path) -> str:
    """sha256 over a SavedModel's files (relative path and bytes, in path order), leaving out
    `assets.extra/`, which deploy writes into: equal digests mean byte-identical models."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != serving_layout.ASSETS_EXTRA
    )
    if not any(p.name == serving_layout.SAVED_MODEL for p in files):
        raise ModelError(f"{folder} holds no {serving_layout.SAVED_MODEL}: not a SavedModel")
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def weights_digest(model: Any) -> str:
    """sha256 over a Keras model's weight arrays in order (dtype, shape, values): the same for
    the same weights however the model file was written."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_saved_model(folder: str, mtime_ns: int, size: int) -> Any:
    import tensorflow as tf

    return tf.saved_model.load(folder)


def load_serving_model(saved_model_dir: Path) -> Any:
    """The SavedModel of `saved_model_dir`, loaded once per process and version of its
    saved_model.pb: evaluate scores the test split and every external set, explains its mistakes
    and builds the drift reference with one load, the gate its champion likewise. A SavedModel
    written again at the same place is loaded again. OSError when saved_model.pb is missing."""
    folder = Path(saved_model_dir).resolve()
    stamp = (folder / serving_layout.SAVED_MODEL).stat()
    return _load_saved_model(str(folder), stamp.st_mtime_ns, stamp.st_size)


def decode_for_model(image_bytes: Any, image_size: int, grayscale: bool = False) -> Any:
    """Decode one encoded image to float32 [S, S, 3] with values 0..255, exactly as training does."""
    import tensorflow as tf

    return tf.cast(decode_to_size(image_bytes, image_size, grayscale), tf.float32)


def _warmup_png(image_size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): key, length, bytes."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def warmup_request_bytes(png: bytes, model_name: str) -> bytes:
    """A serialized `tensorflow.serving.PredictionLog` holding one Predict request of `png` to
    `model_name`'s serving signature: the bytes `PredictionLog.SerializeToString()` gives for
    the message TF Serving's own docs build (tests compare them), written here without
    importing TensorFlow, so deploy does not load it for one record."""
    # TensorProto{dtype: DT_STRING (7), tensor_shape: {dim {size: 1}}, string_val: [png]}
    tensor = b"\x08\x07" + _field(2, _field(2, b"\x08\x01")) + _field(8, png)
    # ModelSpec{name: 1, signature_name: 3}; PredictRequest{model_spec: 1, inputs (map): 2}
    spec = _field(1, model_name.encode()) + _field(3, SIGNATURE.encode())
    request = _field(1, spec) + _field(2, _field(1, INPUT.encode()) + _field(2, tensor))
    # PredictionLog{predict_log: 6}; PredictLog{request: 1}
    return _field(6, _field(1, request))


def _write_warmup(path: Path, png: bytes, model_name: str) -> None:
    """One `PredictionLog` record in the TFRecord file TF Serving replays before serving."""
    from tumorflow.components.data.tfrecords import write_tfrecord

    write_tfrecord(path, [warmup_request_bytes(png, model_name)])


def _serving_module(
    model: Any,
    classes: list[str],
    image_size: int,
    grayscale: bool,
    statistics: ServingStatistics | None = None,
) -> Any:
    import keras
    import tensorflow as tf

    statistics = statistics or ServingStatistics()

    try:
        embedding = model.get_layer(EMBEDDING_LAYER).output
    except ValueError:
        raise ModelError(
            f"the model has no layer named {EMBEDDING_LAYER!r} (pooled features); "
            "re-train it with the project's train step"
        ) from None
    dual = keras.Model(model.inputs, [model.outputs[0], embedding])
    features_model, head_model = _split_at_feature_map(model)
    class_names = tf.constant(classes)

    module = tf.Module()
    module.model = dual
    module.features_model = features_model
    module.head_model = head_model
    head = model.get_layer(OUTPUT_LAYER)
    temperature = tf.constant(statistics.temperature, tf.float32)

    def calibrated(embedding: tf.Tensor) -> tf.Tensor:
        """softmax(logits / T): the head's Dense on the pooled features (its dropout is off)."""
        logits = tf.matmul(tf.cast(embedding, tf.float32), head.kernel) + head.bias
        return tf.nn.softmax(logits / temperature, axis=-1)

    def out_of_distribution(embedding: tf.Tensor) -> dict[str, tf.Tensor]:
        detector = statistics.detector
        if detector is None:
            return {}
        means = tf.constant(detector.class_means, tf.float64)
        precision = tf.constant(detector.precision, tf.float64)
        diff = tf.cast(embedding, tf.float64)[:, tf.newaxis, :] - means[tf.newaxis]
        distances = tf.einsum("ncd,de,nce->nc", diff, precision, diff)
        score = tf.reduce_min(distances, axis=1)
        return {
            OOD_SCORE: tf.cast(score, tf.float32),
            IN_DISTRIBUTION: score <= tf.constant(detector.threshold, tf.float64),
        }

    def decode(image_bytes: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(
            lambda one: decode_for_model(one, image_size, grayscale),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )

    def explain(image_bytes: tf.Tensor, class_index: tf.Tensor | None) -> dict[str, tf.Tensor]:
        images = decode(image_bytes)
        with tf.GradientTape() as tape:
            tape.watch(images)
            feature_map = tf.cast(features_model(images, training=False), tf.float32)
            scores = tf.cast(head_model(feature_map, training=False), tf.float32)
            predicted = tf.argmax(scores, axis=1, output_type=tf.int64)
            target = predicted if class_index is None else class_index
            chosen = tf.gather(scores, target, axis=1, batch_dims=1)
        map_gradients, pixel_gradients = tape.gradient(chosen, [feature_map, images])
        heatmap = explanation_heatmap(feature_map, map_gradients, pixel_gradients)
        batch = tf.shape(image_bytes)[0]
        pooled = tf.reduce_mean(feature_map, axis=[1, 2])
        return {
            "scores": calibrated(pooled),
            "classes": tf.tile(class_names[tf.newaxis, :], [batch, 1]),
            "predicted_class": tf.gather(class_names, predicted),
            "predicted_index": predicted,
            "explained_class": tf.gather(class_names, target),
            HEATMAP: heatmap,
            **out_of_distribution(pooled),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT)])
    def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        _, features = dual(decode(image_bytes), training=False)
        scores = calibrated(features)
        batch = tf.shape(image_bytes)[0]
        index = tf.argmax(scores, axis=1, output_type=tf.int64)
        return {
            "scores": scores,
            "classes": tf.tile(class_names[tf.newaxis, :], [batch, 1]),
            "predicted_class": tf.gather(class_names, index),
            "predicted_index": index,
            "embedding": tf.cast(features, tf.float32),
            **out_of_distribution(features),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT)])
    def explain_predicted(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return explain(image_bytes, None)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name=INPUT),
            tf.TensorSpec([None], tf.int64, name=CLASS_INPUT),
        ]
    )
    def explain_requested(image_bytes: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        checks = [
            tf.debugging.assert_less(
                class_index,
                tf.constant(len(classes), tf.int64),
                message=f"class_index must be below {len(classes)} (the number of classes)",
            ),
            tf.debugging.assert_non_negative(class_index, message="class_index must be >= 0"),
        ]
        # The checks run before anything gathers by the index, so a bad one is always refused
        # with their message (not, at random, by a gather's own out-of-range error).
        with tf.control_dependencies(checks):
            class_index = tf.identity(class_index)
        return explain(image_bytes, class_index)

    module.serve = serve
    module.explain_predicted = explain_predicted
    module.explain_requested = explain_requested
    return module


def _split_at_feature_map(model: Any) -> tuple[Any, Any]:
    """The classifier cut where its last spatial feature map enters the `embedding` pooling:
    (pixels -> feature map, feature map -> scores). Every backbone ends in that pooling, so
    this finds the last convolutional feature map of any of them."""
    import keras

    pooling = model.get_layer(EMBEDDING_LAYER)
    feature_map = pooling.input
    if len(feature_map.shape) != 4:
        raise ModelError(
            f"the {EMBEDDING_LAYER!r} layer pools a {len(feature_map.shape)}-D tensor, not a "
            "spatial feature map: Grad-CAM needs one"
        )
    features_model = keras.Model(model.inputs, feature_map, name="feature_map")
    return features_model, keras.Model(feature_map, model.outputs[0], name="head")


def grad_cam(feature_map: Any, gradients: Any, image_size: int) -> Any:
    """Grad-CAM (Selvaraju et al. 2017): the feature map's channels weighted by their mean
    gradient, ReLU, upsampled bilinearly to `image_size` and scaled to 0..1 per image."""
    import tensorflow as tf

    weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, (image_size, image_size), method="bilinear")[..., 0]
    return _scaled_to_unit_peak(cam)


def pixel_evidence(pixel_gradients: Any) -> Any:
    """How much each pixel's brightness moves the class score: |d score / d pixel| summed over
    the colour channels, Gaussian-smoothed (sigma `PIXEL_EVIDENCE_SIGMA` of the side, at least
    one pixel, mirrored at the borders) so that a lesion a few pixels wide stands out from pixel
    noise, scaled to 0..1 per image."""
    import tensorflow as tf

    side = int(pixel_gradients.shape[1])
    sigma = max(1.0, side * PIXEL_EVIDENCE_SIGMA)
    radius = min(int(np.ceil(3 * sigma)), side - 1)
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    kernel = tf.constant(taps / taps.sum(), tf.float32)
    evidence = tf.abs(tf.reduce_sum(pixel_gradients, axis=-1, keepdims=True))
    padding = [[0, 0], [radius, radius], [radius, radius], [0, 0]]
    evidence = tf.pad(evidence, padding, mode="SYMMETRIC")
    evidence = tf.nn.conv2d(evidence, tf.reshape(kernel, [-1, 1, 1, 1]), 1, "VALID")
    evidence = tf.nn.conv2d(evidence, tf.reshape(kernel, [1, -1, 1, 1]), 1, "VALID")
    return _scaled_to_unit_peak(evidence[..., 0])


def explanation_heatmap(feature_map: Any, map_gradients: Any, pixel_gradients: Any) -> Any:
    """The `explain` signatures' heat map: Grad-CAM of the last feature map (which region, at
    the coarse resolution of that map) times `pixel_evidence` (which pixels inside it), scaled
    to 0..1 per image; [batch, S, S] at the input resolution S of `pixel_gradients`."""
    coarse = grad_cam(feature_map, map_gradients, int(pixel_gradients.shape[1]))
    return _scaled_to_unit_peak(coarse * pixel_evidence(pixel_gradients))


def _scaled_to_unit_peak(heatmap: Any) -> Any:
    import tensorflow as tf

    peak = tf.reduce_max(heatmap, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(heatmap, peak)


def export_serving_model(
    model_dir: Path, export_dir: Path, *, model_name: str = "model", extra_info: dict | None = None
) -> None:
    """Write the SavedModel of `model_dir` (a train-step model folder) into `export_dir`.

    `export_dir` gets saved_model.pb, variables/, and assets.extra/ with tumorflow.json (classes,
    image size, backbone, MLflow ids, `weights_sha256`, plus `extra_info`) and the TF Serving
    warm-up request. The export is reloaded and checked against `model.predict` before this
    returns.
    """
    import keras
    import tensorflow as tf

    info = read_model_info(model_dir)
    classes = list(info["classes"])
    height, width = (int(side) for side in info["image_size"])
    if height != width:
        raise ModelError(f"model_info.json image_size {[height, width]} is not square")
    image_size = height
    grayscale = bool(info.get("grayscale"))
    try:
        model = keras.saving.load_model(Path(model_dir) / MODEL_FILE, compile=False)
    except Exception as exc:
        raise ModelError(f"{model_dir}/model.keras cannot be loaded: {exc}") from exc
    if model.outputs[0].shape[-1] != len(classes):
        raise ModelError(
            f"the model outputs {model.outputs[0].shape[-1]} scores but model_info.json lists "
            f"{len(classes)} classes"
        )
    export_dir = Path(export_dir)
    if export_dir.exists():
        shutil.rmtree(export_dir)
    statistics = read_serving_statistics(model_dir)
    module = _serving_module(model, classes, image_size, grayscale, statistics)
    tf.saved_model.save(
        module,
        str(export_dir),
        signatures={
            SIGNATURE: module.serve,
            EXPLAIN_SIGNATURE: module.explain_predicted,
            EXPLAIN_CLASS_SIGNATURE: module.explain_requested,
        },
    )

    meta = {
        "classes": classes,
        "image_size": [image_size, image_size],
        "grayscale": grayscale,
        "backbone": info.get("backbone"),
        "mlflow_run_id": info.get("mlflow_run_id"),
        WEIGHTS_DIGEST: weights_digest(model),
        "temperature": statistics.temperature,
        "ood_threshold": statistics.detector.threshold if statistics.detector else None,
    }
    write_version_assets(export_dir, model_name, {**meta, **(extra_info or {})})
    _check_export(
        export_dir, model, _warmup_png(image_size), image_size, grayscale, statistics.temperature
    )
    log.info(
        "exported %s to %s (%d classes, input %s)", model_dir, export_dir, len(classes), image_size
    )


def write_version_assets(export_dir: Path, model_name: str, info: dict[str, Any]) -> None:
    """(Re)write `assets.extra/`: tumorflow.json updated with `info`, and the warm-up request
    addressed to `model_name`. Outside the SavedModel digest, so deploy may call it on a copy."""
    assets = Path(export_dir) / serving_layout.ASSETS_EXTRA
    assets.mkdir(parents=True, exist_ok=True)
    info_path = assets / serving_layout.MODEL_INFO
    meta = json.loads(info_path.read_text()) if info_path.exists() else {}
    meta.update(info)
    info_path.write_text(json.dumps(meta, indent=2))
    png = _warmup_png(int(meta["image_size"][0]))
    _write_warmup(assets / serving_layout.WARMUP_FILE, png, model_name)


def export_model_artifact(model_dir: Path) -> dict[str, str]:
    """Export the serving SavedModel once, into `<model_dir>/saved_model/`, and record its
    digests (`saved_model_sha256`, `weights_sha256`) in model_info.json; return them.

    Evaluate scores this export, the gate blesses it and deploy publishes it byte for byte.
    """
    model_dir = Path(model_dir)
    export_dir = model_dir / SERVING_EXPORT
    export_serving_model(model_dir, export_dir)
    meta = json.loads(
        (export_dir / serving_layout.ASSETS_EXTRA / serving_layout.MODEL_INFO).read_text()
    )
    digests = {
        SAVED_MODEL_DIGEST: saved_model_digest(export_dir),
        WEIGHTS_DIGEST: meta[WEIGHTS_DIGEST],
    }
    info_path = model_dir / MODEL_INFO_FILE
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), **digests}, indent=2))
    return digests


def _check_export(
    export_dir: Path, model: Any, png: bytes, image_size: int, grayscale: bool, temperature: float
) -> None:
    """Reload the SavedModel and compare its scores with `model.predict` on the same pixels,
    tempered by the calibration temperature."""
    import tensorflow as tf

    from tumorflow.components.training.calibration import log_probabilities, tempered_softmax

    served = tf.saved_model.load(str(export_dir)).signatures[SIGNATURE]
    scores = served(image_bytes=tf.constant([png]))["scores"].numpy()
    pixels = decode_for_model(tf.constant(png), image_size, grayscale).numpy()[np.newaxis]
    expected = tempered_softmax(log_probabilities(model.predict(pixels, verbose=0)), temperature)
    if not np.allclose(scores, expected, atol=1e-4):
        raise ModelError(
            f"the exported SavedModel in {export_dir} disagrees with the Keras model "
            f"(max difference {np.abs(scores - expected).max():.2e})"
        )
