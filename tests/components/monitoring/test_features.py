"""Drift features of single images, the embedding projection, and the reference table."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from tumorflow.components.monitoring.features import (
    IMAGE_FEATURES,
    EmbeddingProjection,
    ImageFeatureError,
    build_reference,
    feature_table,
    image_feature_table,
    image_features,
    model_features,
)
from tumorflow.core.errors import DatasetError, ModelError, TumorflowError


def encode(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def textured(seed: int = 0, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(110, 30, shape), 0, 255).astype(np.uint8)


def test_bytes_and_arrays_of_the_same_image_give_the_same_features():
    gray = textured()
    rgb = np.repeat(gray[..., None], 3, axis=2)
    from_png = image_features(encode(gray))
    assert set(from_png) == set(IMAGE_FEATURES)
    assert image_features(gray) == pytest.approx(from_png)
    assert image_features(rgb) == pytest.approx(from_png)
    assert image_features(encode(rgb)) == pytest.approx(from_png)
    assert image_features(gray.astype(np.float32) / 255.0) == pytest.approx(from_png, abs=0.6)


def test_features_follow_what_changed_in_the_image():
    base = textured(1)
    brighter = image_features(np.clip(base.astype(int) + 40, 0, 255).astype(np.uint8))
    plain = image_features(base)
    blurred = image_features(np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(2))))
    flat = image_features(np.full((32, 32), 77, dtype=np.uint8))
    assert brighter["intensity_mean"] == pytest.approx(plain["intensity_mean"] + 40, abs=2)
    assert brighter["intensity_p50"] > plain["intensity_p50"]
    assert blurred["sharpness"] < plain["sharpness"] / 10
    assert blurred["edge_strength"] < plain["edge_strength"]
    assert flat["intensity_std"] == 0 and flat["entropy"] == 0 and flat["contrast"] == 0
    assert flat["intensity_p5"] == flat["intensity_p95"] == 77


def test_size_and_aspect_are_those_of_the_original_not_the_analysis_copy():
    features = image_features(encode(textured(2, (300, 900)), fmt="JPEG"))
    assert (features["width"], features["height"]) == (900, 300)
    assert features["aspect_ratio"] == pytest.approx(3.0)


def test_16_bit_images_are_scaled_to_8_bit_intensities():
    pixels = np.full((16, 16), 32768, dtype=np.uint16)
    features = image_features(encode(pixels))
    assert features["intensity_mean"] == pytest.approx(127.5, abs=1)


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x89PNG\r\n\x1a\n not really", b"hello", np.zeros((2, 3, 5)), np.zeros(7)],
    ids=["empty", "truncated-png", "text", "five-channels", "1-d"],
)
def test_undecodable_images_raise_a_tumorflow_error(bad):
    with pytest.raises(ImageFeatureError) as info:
        image_features(bad)
    assert isinstance(info.value, TumorflowError)
    assert "BytesIO" not in str(info.value) and "\n" not in str(info.value)


def test_unreadable_images_are_named_in_warnings_and_errors(caplog: pytest.LogCaptureFixture):
    good = encode(textured(3))
    names = ["scans/a.png", "scans/b.png"]
    with caplog.at_level(logging.WARNING, logger="tumorflow.components.monitoring.features"):
        table, _ = feature_table([good, b"junk"], skip_unreadable=True, names=names)
    assert len(table) == 1
    assert "skipping scans/b.png: cannot decode image (4 bytes)" in caplog.text
    assert "BytesIO" not in caplog.text
    with pytest.raises(ImageFeatureError, match=r"^scans/b\.png: cannot decode image"):
        feature_table([good, b"junk"], names=names)
    with pytest.raises(DatasetError, match=r"none of the 2 images .*\(first: scans/a\.png: "):
        feature_table([b"junk", b"more junk"], skip_unreadable=True, names=names)


def test_feature_table_has_one_row_per_image_in_order():
    images = [textured(seed) for seed in range(5)]
    table = image_feature_table(images)
    assert list(table.columns) == list(IMAGE_FEATURES)
    assert len(table) == 5
    assert table.iloc[3].to_dict() == pytest.approx(image_features(images[3]))


def test_projection_keeps_the_main_directions_and_round_trips(tmp_path: Path):
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(200, 2)) * [10.0, 3.0]
    embeddings = latent @ rng.normal(size=(2, 16)) + rng.normal(0, 0.01, (200, 16)) + 5
    projection = EmbeddingProjection.fit(embeddings, 4)
    assert projection.columns == [f"embedding_pc{i}" for i in range(1, 5)]
    assert projection.explained_variance_ratio[:2].sum() > 0.99
    projected = projection.transform(embeddings)
    assert projected.shape == (200, 4)
    assert abs(projected[:, 0].mean()) < 1e-6
    loaded = EmbeddingProjection.load(projection.save(tmp_path / "p.npz"))
    np.testing.assert_allclose(loaded.transform(embeddings), projected)
    with pytest.raises(ModelError, match="rebuild the drift reference"):
        projection.transform(np.zeros((3, 8)))
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ModelError, match="not a drift projection"):
        EmbeddingProjection.load(tmp_path / "bad.npz")


def test_model_features_name_the_predicted_class_and_its_confidence():
    scores = np.array([[0.1, 0.9], [0.7, 0.3]])
    projection = EmbeddingProjection.fit(np.random.default_rng(1).normal(size=(10, 3)), 2)
    frame = model_features(np.ones((2, 3)), scores, ["normal", "tumor"], projection)
    assert list(frame.columns) == [
        "embedding_pc1",
        "embedding_pc2",
        "predicted_class",
        "confidence",
    ]
    assert frame["predicted_class"].tolist() == ["tumor", "normal"]
    assert frame["confidence"].tolist() == [0.9, 0.7]
    with pytest.raises(ModelError, match="names 3 classes"):
        model_features(None, scores, ["a", "b", "c"], None)


def test_reference_without_a_model_holds_image_features_and_labels(split_dir: Path, tmp_path: Path):
    path = build_reference(split_dir, None, tmp_path / "ref", split="test")
    assert path == tmp_path / "ref" / "drift_reference.parquet"
    table = pd.read_parquet(path)
    assert len(table) == 24
    assert {"path", "label", *IMAGE_FEATURES} == set(table.columns)
    assert sorted(table["label"].unique()) == ["cyst", "normal", "stone", "tumor"]
    assert not (tmp_path / "ref" / "drift_projection.npz").exists()


def test_reference_with_a_model_adds_the_projected_embedding_and_predictions(
    split_dir: Path, make_model_dir, tmp_path: Path
):
    model_dir = make_model_dir()
    path = build_reference(split_dir, model_dir, tmp_path / "drift_reference.parquet", split="test")
    table = pd.read_parquet(path)
    # the test model's embedding is the 3 channel means, so 3 components at most
    assert [c for c in table.columns if c.startswith("embedding_pc")] == [
        "embedding_pc1",
        "embedding_pc2",
        "embedding_pc3",
    ]
    projection = EmbeddingProjection.load(tmp_path / "drift_projection.npz")
    assert projection.mean.shape == (3,)
    # the brightness model gets these images right: predictions follow the labels
    assert (table["predicted_class"] == table["label"]).mean() > 0.9
    assert table["confidence"].between(0, 1).all()


@pytest.mark.parametrize("components", [2, 0])
def test_the_reference_has_as_many_embedding_components_as_configured(
    split_dir: Path, make_model_dir, tmp_path: Path, components: int
):
    model_dir = make_model_dir()
    path = build_reference(
        split_dir, model_dir, tmp_path / "ref", split="test", embedding_components=components
    )
    table = pd.read_parquet(path)
    embedding = [c for c in table.columns if c.startswith("embedding_pc")]
    assert embedding == [f"embedding_pc{i}" for i in range(1, components + 1)]
    assert (tmp_path / "ref" / "drift_projection.npz").exists() == (components > 0)
    assert {"predicted_class", "confidence"} <= set(table.columns)
