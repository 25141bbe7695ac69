"""Drift features: one row of numbers per image (and per model output) that drift reports compare.

Image features are intensity statistics, contrast, entropy, sharpness and size, computed with
numpy on a downscaled grayscale copy so that thousands of images take seconds. Model features are
a PCA projection of the model's `embedding` layer (fitted on the training split and stored beside
the reference table), the predicted class and the confidence.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tumorflow.components.data import dicom
from tumorflow.components.data.image_files import list_images
from tumorflow.core import serving_layout
from tumorflow.core.artifacts import MODEL_FILE
from tumorflow.core.config import DicomConfig, DriftConfig
from tumorflow.core.errors import DatasetError, ModelError

logger = logging.getLogger(__name__)

# Longest side of the grayscale copy the statistics are computed on.
ANALYSIS_SIDE = 128
IMAGE_FEATURES = (
    "intensity_mean",
    "intensity_std",
    "intensity_p5",
    "intensity_p25",
    "intensity_p50",
    "intensity_p75",
    "intensity_p95",
    "contrast",
    "entropy",
    "sharpness",
    "edge_strength",
    "width",
    "height",
    "aspect_ratio",
)
EMBEDDING_PREFIX = "embedding_pc"
PREDICTION_COLUMNS = ("predicted_class", "confidence")
PROJECTION_FILE = serving_layout.DRIFT_PROJECTION
REFERENCE_FILE = serving_layout.DRIFT_REFERENCE
# PCA components of the embedding in a drift reference, unless the caller says otherwise.
DEFAULT_EMBEDDING_COMPONENTS = DriftConfig.model_fields["embedding_components"].default
_PERCENTILES = (5, 25, 50, 75, 95)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageFeatureError(DatasetError):
    """An image cannot be decoded or has a shape no drift feature can be computed from."""


def _gray_from_bytes(data: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        size = image.size
        if image.format == "JPEG":
            image.draft("L", (ANALYSIS_SIDE, ANALYSIS_SIDE))
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            pixels = np.asarray(image, dtype=np.float32)
            peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
            image = Image.fromarray(np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8))
        else:
            image = image.convert("L")
    except UnidentifiedImageError:
        # PIL's own message names the in-memory buffer (`<_io.BytesIO object at 0x...>`)
        raise ImageFeatureError(
            f"cannot decode image ({len(data)} bytes): not an image format PIL reads"
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFeatureError(f"cannot decode image ({len(data)} bytes): {exc}") from None
    return image, size


def _gray_from_array(array: np.ndarray):
    from PIL import Image

    pixels = np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4):
        pixels = (
            pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3].astype(np.float32) @ _LUMA
        )
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ImageFeatureError(
            f"an image array must be [H, W] or [H, W, 1|3|4], got shape {np.shape(array)}"
        )
    pixels = pixels.astype(np.float32)
    if np.issubdtype(np.asarray(array).dtype, np.floating) and float(np.nanmax(pixels)) <= 1.0:
        pixels = pixels * 255.0
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
    height, width = pixels.shape
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), (width, height)


def image_features(image: np.ndarray | bytes) -> dict[str, float]:
    """Drift features of one image: encoded bytes (PNG/JPEG/...) or a pixel array (0..255, or 0..1 floats)."""
    from PIL import Image

    gray, (width, height) = (
        _gray_from_bytes(image) if isinstance(image, bytes | bytearray) else _gray_from_array(image)
    )
    if max(gray.size) > ANALYSIS_SIDE:
        gray.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(gray)
    hist = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    count = hist.sum()
    cdf = np.cumsum(hist)
    p5, p25, p50, p75, p95 = (float(np.searchsorted(cdf, count * q / 100.0)) for q in _PERCENTILES)
    probabilities = hist[hist > 0] / count
    values = pixels.astype(np.float32)
    features = {
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std()),
        "intensity_p5": p5,
        "intensity_p25": p25,
        "intensity_p50": p50,
        "intensity_p75": p75,
        "intensity_p95": p95,
        "contrast": p95 - p5,
        "entropy": float(-(probabilities * np.log2(probabilities)).sum()),
        "sharpness": 0.0,
        "edge_strength": 0.0,
        "width": float(width),
        "height": float(height),
        "aspect_ratio": float(width) / float(height),
    }
    if min(values.shape) >= 3:
        laplacian = (
            values[:-2, 1:-1]
            + values[2:, 1:-1]
            + values[1:-1, :-2]
            + values[1:-1, 2:]
            - 4.0 * values[1:-1, 1:-1]
        )
        features["sharpness"] = float(laplacian.var())
        features["edge_strength"] = float(
            np.abs(np.diff(values, axis=0)).mean() + np.abs(np.diff(values, axis=1)).mean()
        )
    return features


def image_files(folder: Path) -> list[Path]:
    """The image and DICOM files under `folder` (any depth), sorted; hidden ones are skipped, by
    the rule the dataset download follows."""
    return list_images(folder)[0]


@dataclass(frozen=True)
class FolderImage:
    """One image a folder contributes: an image file, or one slice of a DICOM file. `reason`
    (and no bytes) for a DICOM file that cannot be decoded: it is quarantined, not skipped."""

    path: Path
    name: str
    encoded: bytes = b""
    reason: str | None = None


def folder_images(
    folder: Path, prefix: str = "", dicom_config: DicomConfig | None = None
) -> Iterator[FolderImage]:
    """The images under `folder`, named `<prefix><relative path>` (`#<frame>` for the slices of a
    multi-frame DICOM file). DICOM files are decoded as training decodes them
    (components/data/dicom.py, `dicom_config` or the default window); unreadable files are logged
    and left out, undecodable DICOM files come back with their quarantine reason."""
    config = dicom_config or DicomConfig()
    for path in image_files(folder):
        name = prefix + path.relative_to(folder).as_posix()
        try:
            data = path.read_bytes()
        except OSError as exc:
            logger.warning("skipping %s: %s", name, exc)
            continue
        try:
            images = dicom.encoded_images(name, data, config)
        except dicom.DicomDecodeError as exc:
            reason = f"DICOM not decodable: {exc}"
            logger.warning("quarantined %s: %s", name, reason)
            yield FolderImage(path, name, reason=reason)
            continue
        for image_name, encoded in images:
            yield FolderImage(path, image_name, encoded)


def image_feature_table(images: Iterable[np.ndarray | bytes]) -> pd.DataFrame:
    """One row of `IMAGE_FEATURES` per image, in order."""
    rows = [image_features(image) for image in images]
    return pd.DataFrame(rows, columns=list(IMAGE_FEATURES), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class EmbeddingProjection:
    """PCA of the model's embeddings, fitted on the training split: `(x - mean) @ components.T`.

    Compared by identity (it rides along in `DataFrame.attrs`, which pandas compares with `==`).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, n_components: int) -> EmbeddingProjection:
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 2 or len(embeddings) < 2:
            raise DatasetError(
                f"fitting the embedding projection needs at least 2 embeddings, got shape {embeddings.shape}"
            )
        n_components = min(n_components, embeddings.shape[0], embeddings.shape[1])
        mean = embeddings.mean(axis=0)
        _, singular, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
        variance = singular**2
        total = variance.sum()
        ratio = variance[:n_components] / total if total > 0 else np.zeros(n_components)
        return cls(mean=mean, components=vt[:n_components], explained_variance_ratio=ratio)

    @property
    def columns(self) -> list[str]:
        return [f"{EMBEDDING_PREFIX}{i + 1}" for i in range(len(self.components))]

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        embeddings = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)
        if embeddings.shape[1] != self.mean.shape[0]:
            raise ModelError(
                f"the embedding has {embeddings.shape[1]} values but the drift projection was fitted "
                f"on {self.mean.shape[0]}: rebuild the drift reference for this model"
            )
        return (embeddings - self.mean) @ self.components.T

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(
                handle,
                mean=self.mean,
                components=self.components,
                explained_variance_ratio=self.explained_variance_ratio,
            )
        return path

    @classmethod
    def load(cls, path: Path) -> EmbeddingProjection:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    mean=data["mean"],
                    components=data["components"],
                    explained_variance_ratio=data["explained_variance_ratio"],
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"{path} is not a drift projection file: {exc}") from None


def model_features(
    embeddings: np.ndarray | None,
    scores: np.ndarray,
    classes: Sequence[str],
    projection: EmbeddingProjection | None,
) -> pd.DataFrame:
    """Projected embedding columns (when both are at hand), `predicted_class` and `confidence`."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    if scores.shape[1] != len(classes):
        raise ModelError(
            f"the model gives {scores.shape[1]} scores but names {len(classes)} classes"
        )
    frame = pd.DataFrame(index=range(len(scores)))
    if projection is not None and embeddings is not None and len(projection.components):
        projected = projection.transform(embeddings)
        for index, column in enumerate(projection.columns):
            frame[column] = projected[:, index]
    frame["predicted_class"] = np.asarray(classes, dtype=object)[scores.argmax(axis=1)]
    frame["confidence"] = scores.max(axis=1)
    return frame


class ModelProbe:
    """Runs a model folder (`model.keras` + `model_info.json`) or a served SavedModel version on
    encoded images and returns its embeddings and class scores."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        if (self.model_dir / MODEL_FILE).exists():
            self._load_keras()
        elif (self.model_dir / "saved_model.pb").exists():
            self._load_saved_model()
        else:
            raise ModelError(
                f"{model_dir} holds neither model.keras nor saved_model.pb: pass a trained model "
                "folder or a served model version folder"
            )

    def _load_keras(self) -> None:
        import keras

        from tumorflow.components.training.export import read_model_info

        info = read_model_info(self.model_dir)
        self.classes = list(info["classes"])
        self.image_size = int(info["image_size"][0])
        self.grayscale = bool(info.get("grayscale"))
        model = keras.saving.load_model(self.model_dir / MODEL_FILE, compile=False)
        try:
            embedding = model.get_layer("embedding").output
        except ValueError:
            logger.warning(
                "%s has no layer named 'embedding': no embedding features", self.model_dir
            )
            embedding = None
        outputs = [embedding, model.output] if embedding is not None else [model.output]
        self._keras = keras.Model(model.inputs, outputs)
        self._has_embedding = embedding is not None
        self._signature = None

    def _load_saved_model(self) -> None:
        from tumorflow.components.training.export import load_serving_model

        info_path = self.model_dir / serving_layout.ASSETS_EXTRA / serving_layout.MODEL_INFO
        if not info_path.exists():
            raise ModelError(
                f"{info_path} is missing: the served version does not name its classes"
            )
        self.classes = list(json.loads(info_path.read_text())["classes"])
        loaded = load_serving_model(self.model_dir)
        if "serving_default" not in loaded.signatures:
            raise ModelError(f"{self.model_dir} has no serving_default signature")
        self._loaded = loaded
        self._signature = loaded.signatures["serving_default"]
        self._has_embedding = "embedding" in self._signature.structured_outputs
        self._keras = None

    def _pixels(self, encoded: Sequence[bytes]) -> np.ndarray:
        import tensorflow as tf

        from tumorflow.components.training.export import decode_for_model

        return np.stack(
            [
                decode_for_model(tf.constant(data), self.image_size, self.grayscale).numpy()
                for data in encoded
            ]
        )

    def predict(
        self, encoded: Sequence[bytes], batch_size: int = 64
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(embeddings or None, scores) for a list of encoded images."""
        import tensorflow as tf

        embeddings, scores = [], []
        for start in range(0, len(encoded), batch_size):
            chunk = list(encoded[start : start + batch_size])
            if self._signature is not None:
                outputs = self._signature(image_bytes=tf.constant(chunk))
                scores.append(outputs["scores"].numpy())
                if self._has_embedding:
                    embeddings.append(outputs["embedding"].numpy())
            else:
                outputs = self._keras.predict_on_batch(self._pixels(chunk))
                if self._has_embedding:
                    embeddings.append(np.asarray(outputs[0]).reshape(len(chunk), -1))
                    scores.append(np.asarray(outputs[1]))
                else:
                    scores.append(np.asarray(outputs))
        n_classes = len(self.classes)
        stacked_scores = np.concatenate(scores) if scores else np.empty((0, n_classes))
        stacked_embeddings = np.concatenate(embeddings) if embeddings else None
        return stacked_embeddings, stacked_scores


def projection_path_for(table_path: Path) -> Path:
    """Where the embedding projection of a reference table lives: beside it."""
    return Path(table_path).parent / PROJECTION_FILE


def find_projection(model_dir: Path | None) -> EmbeddingProjection | None:
    """The stored projection of a served version (`assets.extra/`) or a model folder, if any."""
    if model_dir is None:
        return None
    for candidate in (
        Path(serving_layout.asset_uri(model_dir, PROJECTION_FILE)),
        Path(model_dir) / PROJECTION_FILE,
    ):
        if candidate.exists():
            return EmbeddingProjection.load(candidate)
    return None


def feature_table(
    encoded: Sequence[bytes],
    probe: ModelProbe | None = None,
    projection: EmbeddingProjection | None = None,
    n_components: int = 0,
    skip_unreadable: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, EmbeddingProjection | None]:
    """Drift features of encoded images, with model features when a probe is given.

    Without a `projection`, one with `n_components` is fitted on these images' embeddings (the
    reference side); the projection used is returned with the table. With `skip_unreadable`,
    images that do not decode are left out (and logged) instead of failing the table. `names`
    (file paths, say) name the images in those messages; else they are "image #i".
    """
    rows, kept, failures = [], [], []
    for index, data in enumerate(encoded):
        name = names[index] if names is not None else f"image #{index}"
        try:
            rows.append(image_features(data))
        except ImageFeatureError as exc:
            if not skip_unreadable:
                raise ImageFeatureError(f"{name}: {exc}") from None
            logger.warning("skipping %s: %s", name, exc)
            failures.append(f"{name}: {exc}")
            continue
        kept.append(data)
    if not kept:
        first = f" (first: {failures[0]})" if failures else ""
        raise DatasetError(f"none of the {len(encoded)} images could be decoded{first}")
    if failures:
        logger.warning("%d of %d images could not be decoded", len(failures), len(encoded))
    table = pd.DataFrame(rows, columns=list(IMAGE_FEATURES), dtype=np.float64)
    if probe is None:
        return table, projection
    embeddings, scores = probe.predict(kept)
    if projection is None and embeddings is not None and n_components > 0:
        projection = EmbeddingProjection.fit(embeddings, n_components)
    extra = model_features(embeddings, scores, probe.classes, projection)
    return pd.concat([table, extra], axis=1), projection


def build_reference(
    split_dir: Path,
    model_dir: Path | None,
    output_path: Path,
    split: str = "train",
    embedding_components: int = DEFAULT_EMBEDDING_COMPONENTS,
) -> Path:
    """Write the drift reference table of a split (Parquet) and, with a model, its projection.

    `output_path` is a `.parquet` file, or a folder that gets `drift_reference.parquet`. The
    projection (`drift_projection.npz`, `embedding_components` principal components of the
    model's embedding, or fewer when the embedding or the split is smaller; 0 for none) is written
    beside the table; the pipeline copies both into the served version's `assets.extra/`. Returns
    the table's path.
    """
    from tumorflow.components.data.tfrecords import read_records, read_split_manifest

    classes = read_split_manifest(split_dir)["classes"]
    records = list(read_records(split_dir, split))
    if not records:
        raise DatasetError(
            f"the {split!r} split of {split_dir} is empty: no drift reference to build"
        )
    encoded = [record.encoded for record in records]
    probe = ModelProbe(model_dir) if model_dir is not None else None
    table, projection = feature_table(
        encoded,
        probe,
        n_components=embedding_components,
        names=[record.path for record in records],
    )
    table.insert(0, "label", [classes[record.label] for record in records])
    table.insert(0, "path", [record.path for record in records])
    output_path = Path(output_path)
    if output_path.suffix != ".parquet":
        output_path = output_path / REFERENCE_FILE
    output_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(output_path, index=False)
    if projection is not None:
        projection.save(projection_path_for(output_path))
    logger.info("drift reference: %d rows of %s -> %s", len(table), split, output_path)
    return output_path
