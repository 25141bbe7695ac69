"""Fixtures of the component tests: tiny model folders and split datasets built in a second."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import image_bytes, write_split

CLASSES = ["cyst", "normal", "stone", "tumor"]
# Each class is an image of one grey level (plus noise); a "brightness" model separates them.
CLASS_LEVELS = [40.0, 100.0, 160.0, 220.0]


@pytest.fixture()
def make_model_dir(tmp_path: Path, model_dir_in: Callable[..., Path]) -> Callable[..., Path]:
    """Build a train-step model folder whose model classifies by mean brightness.

    `confusion` swaps that many class centres, so the model gets those classes wrong: two models
    of different quality on the same images. `exported` adds the serving export and its digests,
    as the pipeline's train step does.
    """
    return lambda *args, **kwargs: model_dir_in(tmp_path, *args, **kwargs)


@pytest.fixture(scope="session")
def model_dir_in(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_model_dir` under a folder of the caller's choosing (a module-scoped fixture's):
    `model_dir_in(root, name="model", ...)`.

    A folder of the same settings is built (and exported) once per session and copied after
    that: the export is what costs. `fresh=True` builds it anew, for a test about what a second
    save or export of the same weights gives."""
    built: dict[tuple, Path] = {}
    cache = tmp_path_factory.mktemp("model-dirs")

    def build(
        folder: Path,
        image_size: tuple[int, int],
        confusion: int,
        run_id: str | None,
        exported: bool,
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
            from tumorflow.components.training.export import export_model_artifact

            export_model_artifact(folder)
        return folder

    def make(
        tmp_path: Path,
        name: str = "model",
        image_size: tuple[int, int] = (32, 32),
        confusion: int = 0,
        run_id: str | None = None,
        exported: bool = False,
        fresh: bool = False,
    ) -> Path:
        settings = (tuple(image_size), confusion, run_id, exported)
        if fresh:
            return build(tmp_path / name, *settings)
        if settings not in built:
            built[settings] = build(cache / str(len(built)), *settings)
        return Path(shutil.copytree(built[settings], tmp_path / name))

    return make


@pytest.fixture()
def split_dir(tmp_path: Path) -> Path:
    """A split dataset with a 24-image test split (6 per class, assorted sizes), each image a
    noisy grey whose mean level codes its class."""
    from tumorflow.components.data.tfrecords import Record

    records = [
        Record(
            encoded=image_bytes(
                10 * label + i, (40 + 3 * i, 36 + 5 * i), level=CLASS_LEVELS[label]
            ),
            label=label,
            path=f"{CLASSES[label]}/{i}.png",
            group=f"{label}-{i}",
        )
        for label in range(len(CLASSES))
        for i in range(6)
    ]
    return write_split(tmp_path / "split", CLASSES, {"test": records})


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-px phantom (12 images per class, 4 slices per patient) in the kidney CT layout."""
    from tumorflow.components.data.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("phantom"), per_class=12, size=48, seed=3)
