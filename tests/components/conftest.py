"""Fixtures of the component tests: tiny model folders and split datasets built in a second."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["cyst", "normal", "stone", "tumor"]
# Each class is an image of one grey level (plus noise); a "brightness" model separates them.
CLASS_LEVELS = [40.0, 100.0, 160.0, 220.0]


def brightness_png(label: int, size: tuple[int, int], seed: int, mode: str = "RGB") -> bytes:
    """A noisy image whose mean grey level codes `label`."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(CLASS_LEVELS[label] + rng.normal(0, 8, size=(*size, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def make_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """Build a train-step model folder whose model classifies by mean brightness.

    `confusion` swaps that many class centres, so the model gets those classes wrong: two models
    of different quality on the same images. `exported` adds the serving export and its digests,
    as the pipeline's train step does.
    """

    def make(
        name: str = "model",
        image_size: tuple[int, int] = (32, 32),
        confusion: int = 0,
        run_id: str | None = None,
        exported: bool = False,
    ) -> Path:
        import keras

        centres = list(CLASS_LEVELS)
        for index in range(confusion):
            centres[index], centres[index + 1] = centres[index + 1], centres[index]
        inputs = keras.Input((*image_size, 3))
        pooled = keras.layers.GlobalAveragePooling2D(name="embedding")(inputs)
        outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name="scores")(pooled)
        model = keras.Model(inputs, outputs)
        scale = 0.002
        kernel = np.array([[2 * c * scale / 3 for c in centres]] * 3, dtype=np.float32)
        bias = np.array([-(c**2) * scale for c in centres], dtype=np.float32)
        model.get_layer("scores").set_weights([kernel, bias])
        folder = tmp_path / name
        folder.mkdir()
        model.save(folder / "model.keras")
        info = {
            "backbone": "custom_cnn",
            "weights": "none",
            "image_size": list(image_size),
            "classes": CLASSES,
            "mlflow_run_id": run_id,
        }
        (folder / "model_info.json").write_text(json.dumps(info))
        if exported:
            from tumorflow.components.export import export_model_artifact

            export_model_artifact(folder)
        return folder

    return make


@pytest.fixture()
def split_dir(tmp_path: Path) -> Path:
    """A split dataset with a 24-image test split (6 per class, assorted sizes)."""
    from tumorflow.components.tfrecords import MANIFEST_JSON, Record, write_shards

    folder = tmp_path / "split"
    records = [
        Record(
            encoded=brightness_png(label, (40 + 3 * i, 36 + 5 * i), seed=10 * label + i),
            label=label,
            path=f"{CLASSES[label]}/{i}.png",
            group=f"{label}-{i}",
        )
        for label in range(len(CLASSES))
        for i in range(6)
    ]
    shards = write_shards(records, folder, "test", shard_size=100)
    manifest = {
        "classes": CLASSES,
        "splits": {"test": {"count": len(records), "shards": shards}},
    }
    (folder / MANIFEST_JSON).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-px phantom (12 images per class, 4 slices per patient) in the kidney CT layout."""
    from tumorflow.components.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("phantom"), per_class=12, size=48, seed=3)
