from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tumorflow.components.training.backbones import BACKBONES, build_classifier, min_image_size
from tumorflow.components.training.export import explanation_heatmap, export_serving_model, grad_cam
from tumorflow.core.errors import ModelError

pytestmark = pytest.mark.e2e


def _encode(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(model_dir_in, tmp_path_factory):
    """One export for the module's tests, which only read it."""
    import tensorflow as tf

    tmp_path = tmp_path_factory.mktemp("exported")
    model_dir = model_dir_in(tmp_path, run_id="abc123")
    export_dir = tmp_path / "export"
    export_serving_model(
        model_dir, export_dir, model_name="kidney-ct", extra_info={"pipeline_run": "r1"}
    )
    return model_dir, export_dir, tf.saved_model.load(str(export_dir))


def test_signature_matches_the_contract(exported):
    import tensorflow as tf

    _, _, loaded = exported
    signature = loaded.signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.name == "image_bytes" and spec.dtype == tf.string and spec.shape.as_list() == [None]
    outputs = signature.structured_outputs
    assert {name: outputs[name].dtype for name in outputs} == {
        "scores": tf.float32,
        "classes": tf.string,
        "predicted_class": tf.string,
        "predicted_index": tf.int64,
        "embedding": tf.float32,
    }
    assert outputs["scores"].shape.as_list() == [None, 4]


def test_any_format_size_and_colour_gives_the_keras_prediction(exported):
    import keras
    import tensorflow as tf

    model_dir, _, loaded = exported
    model = keras.saving.load_model(model_dir / "model.keras")
    rng = np.random.default_rng(1)
    images, encoded = [], []
    for level, size, fmt, mode in [
        (40, (50, 70), "PNG", "RGB"),
        (100, (33, 33), "JPEG", "RGB"),
        (160, (64, 17), "PNG", "L"),
        (220, (90, 45), "BMP", "RGB"),
        (160, (20, 20), "PNG", "L"),
    ]:
        pixels = np.clip(level + rng.normal(0, 5, (*size, 3)), 0, 255).astype(np.uint8)
        data = _encode(pixels, fmt, mode)
        encoded.append(data)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
        resized = tf.image.resize(decoded, (32, 32), method="bilinear")
        images.append(np.clip(np.round(resized.numpy()), 0, 255))
    result = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    expected = model.predict(np.stack(images), verbose=0)
    # PIL and TensorFlow decode JPEG with slightly different IDCTs: scores agree to 1e-3.
    np.testing.assert_allclose(result["scores"].numpy(), expected, atol=1e-3)
    assert result["predicted_index"].numpy().tolist() == [0, 1, 2, 3, 2]
    assert [c.decode() for c in result["predicted_class"].numpy()] == [
        "cyst",
        "normal",
        "stone",
        "tumor",
        "stone",
    ]
    assert result["classes"].numpy()[0].tolist() == [b"cyst", b"normal", b"stone", b"tumor"]
    assert result["embedding"].numpy().shape == (5, 3)


def test_garbage_bytes_raise_invalid_argument(exported):
    import tensorflow as tf

    _, _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](image_bytes=tf.constant([b"not an image at all"]))


def _png_declaring(width: int, height: int) -> bytes:
    """A valid grey PNG of zeros: 16000 x 16000 compresses to about 250 KB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def test_decompression_bombs_gif_and_webp_are_refused_before_decoding(exported):
    import struct
    import time

    import tensorflow as tf

    _, _, loaded = exported
    signature = loaded.signatures["serving_default"]
    pixels = np.full((30, 40, 3), 90, np.uint8)
    bmp = _encode(pixels, "BMP")
    huge_bmp = bmp[:18] + struct.pack("<ii", 20000, -20000) + bmp[26:]
    refused = {
        "pixels": [_png_declaring(16000, 16000), huge_bmp],
        "unsupported": [_encode(pixels, "GIF"), _encode(pixels, "WEBP")],
    }
    for message, images in refused.items():
        for data in images:
            start = time.perf_counter()
            with pytest.raises(tf.errors.InvalidArgumentError, match=message):
                signature(image_bytes=tf.constant([data]))
            assert time.perf_counter() - start < 1.0, "the bomb was decoded before refusal"
    ok = signature(image_bytes=tf.constant([_png_declaring(300, 200), bmp]))
    assert ok["scores"].shape == (2, 4)


def test_assets_extra_holds_metadata_and_a_parseable_warmup(exported):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    _, export_dir, loaded = exported
    meta = json.loads((export_dir / "assets.extra" / "tumorflow.json").read_text())
    assert meta["classes"] == ["cyst", "normal", "stone", "tumor"]
    assert meta["image_size"] == [32, 32]
    assert meta["mlflow_run_id"] == "abc123" and meta["pipeline_run"] == "r1"
    records = list(
        tf.data.TFRecordDataset(str(export_dir / "assets.extra" / "tf_serving_warmup_requests"))
    )
    assert len(records) == 1
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    request = log.predict_log.request
    assert request.model_spec.name == "kidney-ct"
    assert request.model_spec.signature_name == "serving_default"
    warm = tf.make_ndarray(request.inputs["image_bytes"])
    result = loaded.signatures["serving_default"](image_bytes=tf.constant(warm))
    assert result["scores"].shape == (1, 4)


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"model\.keras"):
        export_serving_model(tmp_path, tmp_path / "out")


def test_a_grayscale_model_serves_colour_images_as_grey(make_model_dir, tmp_path):
    import tensorflow as tf

    model_dir = make_model_dir()
    info = json.loads((model_dir / "model_info.json").read_text())
    (model_dir / "model_info.json").write_text(json.dumps({**info, "grayscale": True}))
    export_dir = tmp_path / "grey"
    export_serving_model(model_dir, export_dir)

    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 255
    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    # The test model's embedding is the mean of each input channel.
    embedding = signature(image_bytes=tf.constant([_encode(red, "PNG")]))["embedding"].numpy()

    np.testing.assert_allclose(embedding[0], [76.0, 76.0, 76.0], atol=1.5)
    meta = json.loads((export_dir / "assets.extra" / "tumorflow.json").read_text())
    assert meta["grayscale"] is True


def test_the_model_export_records_digests_that_ignore_assets_extra(make_model_dir):
    from tumorflow.components.training.export import saved_model_digest, write_version_assets

    model_dir = make_model_dir(exported=True)
    info = json.loads((model_dir / "model_info.json").read_text())
    export_dir = model_dir / "saved_model"
    digest = info["saved_model_sha256"]
    assert digest == saved_model_digest(export_dir) and len(digest) == 64

    write_version_assets(export_dir, "kidney-ct", {"deployed_at": "now"})
    (export_dir / "assets.extra" / "drift_reference.parquet").write_bytes(b"reference")
    assert saved_model_digest(export_dir) == digest
    meta = json.loads((export_dir / "assets.extra" / "tumorflow.json").read_text())
    assert meta["deployed_at"] == "now" and meta["weights_sha256"] == info["weights_sha256"]

    (export_dir / "saved_model.pb").write_bytes((export_dir / "saved_model.pb").read_bytes() + b"x")
    assert saved_model_digest(export_dir) != digest


def test_the_weights_digest_follows_the_weights_not_the_file(make_model_dir, tmp_path):
    import keras

    from tumorflow.components.training.export import weights_digest

    one = make_model_dir("one", exported=True)
    same = make_model_dir("same", exported=True, fresh=True)  # built, saved and exported again
    other = make_model_dir("other", confusion=1, exported=True)
    digests = {
        name: json.loads((folder / "model_info.json").read_text())["weights_sha256"]
        for name, folder in (("one", one), ("same", same), ("other", other))
    }
    assert digests["one"] == digests["same"] != digests["other"]
    model = keras.saving.load_model(one / "model.keras")
    model.save(tmp_path / "resaved.keras")
    assert weights_digest(keras.saving.load_model(tmp_path / "resaved.keras")) == digests["one"]


def _bright_corner_png() -> bytes:
    pixels = np.full((32, 32, 3), 30, dtype=np.uint8)
    pixels[20:30, 2:12] = 250
    return _encode(pixels, "PNG")


def test_explain_answers_the_serving_scores_and_a_heat_map_at_input_resolution(exported):
    import tensorflow as tf

    _, _, loaded = exported
    images = tf.constant(
        [_bright_corner_png(), _encode(np.full((40, 50, 3), 100, np.uint8), "PNG")]
    )
    served = loaded.signatures["serving_default"](image_bytes=images)
    explained = loaded.signatures["explain"](image_bytes=images)
    np.testing.assert_allclose(explained["scores"].numpy(), served["scores"].numpy(), atol=1e-5)
    assert (
        explained["predicted_class"].numpy().tolist() == served["predicted_class"].numpy().tolist()
    )
    assert (
        explained["explained_class"].numpy().tolist() == served["predicted_class"].numpy().tolist()
    )
    heatmap = explained["heatmap"].numpy()
    assert heatmap.shape == (2, 32, 32)
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 + 1e-6


def test_explaining_a_requested_class_points_at_the_evidence_for_it(exported):
    import tensorflow as tf

    _, _, loaded = exported
    # The brightness model's evidence for "tumor" (the brightest class) is bright pixels.
    result = loaded.signatures["explain_class"](
        image_bytes=tf.constant([_bright_corner_png()]), class_index=tf.constant([3], tf.int64)
    )
    assert result["explained_class"].numpy().tolist() == [b"tumor"]
    row, column = np.unravel_index(result["heatmap"].numpy()[0].argmax(), (32, 32))
    assert 20 <= row < 30 and 2 <= column < 12
    with pytest.raises(tf.errors.InvalidArgumentError, match="class_index"):
        loaded.signatures["explain_class"](
            image_bytes=tf.constant([_bright_corner_png()]), class_index=tf.constant([7], tf.int64)
        )


def test_the_heat_map_finds_a_small_lesion_inside_a_coarse_feature_map_cell():
    import tensorflow as tf

    # A 2x2 last feature map whose top-left cell holds the evidence, and pixel gradients that
    # single out one small spot inside that cell and a stronger one in a cell without evidence.
    feature_map = np.zeros((1, 2, 2, 1), np.float32)
    feature_map[0, 0, 0, 0] = 1.0
    pixel_gradients = np.zeros((1, 64, 64, 3), np.float32)
    pixel_gradients[0, 23:26, 23:26] = 1.0
    pixel_gradients[0, 50:53, 50:53] = 3.0
    map_gradients = tf.ones_like(feature_map)
    heatmap = explanation_heatmap(
        tf.constant(feature_map), map_gradients, tf.constant(pixel_gradients)
    ).numpy()
    assert heatmap.shape == (1, 64, 64)
    assert heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0)
    row, column = np.unravel_index(heatmap[0].argmax(), (64, 64))
    assert abs(row - 24) <= 2 and abs(column - 24) <= 2
    # Grad-CAM alone knows only the cell: its peak is a corner of the image, far from the spot.
    coarse = grad_cam(tf.constant(feature_map), map_gradients, 64).numpy()[0]
    row, column = np.unravel_index(coarse.argmax(), (64, 64))
    assert np.hypot(row - 24, column - 24) > 15


# make test exports the from-scratch CNN and one nested keras.applications backbone; the others
# (a minute or more each on 2 cores) run with `pytest -m exhaustive`.
IN_MAKE_TEST = {"custom_cnn", "mobilenetv2"}


@pytest.mark.parametrize(
    "backbone",
    [b if b in IN_MAKE_TEST else pytest.param(b, marks=pytest.mark.exhaustive) for b in BACKBONES],
)
def test_every_backbone_exports_explain_signatures(backbone, tmp_path):
    import tensorflow as tf

    size = min_image_size(backbone)
    model, _ = build_classifier(backbone, 4, size, "none", 0.0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    classes = ["cyst", "normal", "stone", "tumor"]
    info = {"backbone": backbone, "weights": "none", "image_size": [size, size], "classes": classes}
    (model_dir / "model_info.json").write_text(json.dumps(info))
    export_serving_model(model_dir, tmp_path / "export")

    loaded = tf.saved_model.load(str(tmp_path / "export"))
    images = tf.constant(
        [_bright_corner_png(), _encode(np.full((40, 50, 3), 100, np.uint8), "JPEG")]
    )
    served = loaded.signatures["serving_default"](image_bytes=images)
    explained = loaded.signatures["explain"](image_bytes=images)
    np.testing.assert_allclose(explained["scores"].numpy(), served["scores"].numpy(), atol=1e-5)
    heatmap = explained["heatmap"].numpy()
    assert heatmap.shape == (2, size, size) and np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 + 1e-6
    requested = loaded.signatures["explain_class"](
        image_bytes=images, class_index=tf.constant([0, 2], tf.int64)
    )
    assert requested["explained_class"].numpy().tolist() == [b"cyst", b"stone"]
    assert requested["heatmap"].shape == (2, size, size)
