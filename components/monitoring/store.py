"""The request-log store: drift-feature rows of served requests as partitioned Parquet part files.

Layout (docs/artifacts.md, "Request log"): `<root>/<model_name>/date=YYYY-MM-DD/part-*.parquet`,
a local folder or a gs:// prefix. One row per request image: `timestamp, model_name,
model_version, request_id`, the image drift features, the projected embedding when the served
version has a projection, `predicted_class, confidence` when a model ran, and `ood_score,
in_distribution` when the model has an OOD detector.

`PartWriter` is the one writer of rows (the server's request logger and the ingest of TF Serving
logs and image folders all use it); `read_request_log` reads the rows of a time window back.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from tumorflow.components.monitoring.features import (
    IMAGE_FEATURES,
    EmbeddingProjection,
    ImageFeatureError,
    find_projection,
    image_features,
)
from tumorflow.components.training.export import IN_DISTRIBUTION, OOD_SCORE
from tumorflow.components.training.export import INPUT as IMAGE_INPUT
from tumorflow.core import storage
from tumorflow.core.errors import ModelError

logger = logging.getLogger(__name__)

# `model_version` of rows whose source names no version (a folder of images, a log without one).
UNKNOWN_VERSION = 0
LOG_PART_GLOB = "part-*.parquet"
PARTITION_PREFIX = "date="
_UNSAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class LoggedRequest:
    """One request to store: its images (in `inputs`) and, when a model ran, its outputs."""

    timestamp: datetime
    model_name: str
    model_version: int
    inputs: Mapping[str, np.ndarray]
    # None when no model ran (a folder of images): the rows then have no prediction columns.
    outputs: Mapping[str, np.ndarray] | None
    # What messages about this request name: a file, a log record; default "request <id>".
    source: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def name(self) -> str:
        return self.source or f"request {self.request_id}"


def _segment(name: str) -> str:
    """A model name as one safe folder name."""
    cleaned = _UNSAFE_SEGMENT.sub("_", name).strip(".")
    return cleaned or "_"


def _images_of(inputs: Mapping[str, np.ndarray]) -> list[bytes | np.ndarray] | None:
    """The request's images: encoded bytes from a string tensor, or pixel arrays [b, H, W(, C)]."""
    if IMAGE_INPUT in inputs:
        return [bytes(value) for value in np.asarray(inputs[IMAGE_INPUT], dtype=object).ravel()]
    for tensor in inputs.values():
        array = np.asarray(tensor)
        if array.dtype.kind in "OSa":
            return [bytes(value) for value in array.astype(object).ravel()]
        if array.dtype.kind in "fiu" and array.ndim in (3, 4):
            return list(array)
    return None


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _out_of_distribution(
    outputs: Mapping[str, np.ndarray] | None, n: int, index: int
) -> dict[str, float | bool]:
    """The OOD score and flag of image `index`, when the signature answered them."""
    if outputs is None or any(name not in outputs for name in (OOD_SCORE, IN_DISTRIBUTION)):
        return {}
    scores = np.asarray(outputs[OOD_SCORE], dtype=np.float64).reshape(n)
    flags = np.asarray(outputs[IN_DISTRIBUTION], dtype=bool).reshape(n)
    return {OOD_SCORE: float(scores[index]), IN_DISTRIBUTION: bool(flags[index])}


def _predictions(outputs: Mapping[str, np.ndarray], n: int) -> tuple[list[str | None], list[float]]:
    """Predicted class and confidence per image, from the signature's outputs when present."""
    scores = outputs.get("scores")
    if scores is None:
        candidates = [np.asarray(v) for v in outputs.values() if np.asarray(v).dtype.kind == "f"]
        scores = next((c for c in candidates if c.ndim == 2 and len(c) == n), None)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(n, -1)
    confidence = [float("nan")] * n if scores is None else scores.max(axis=1).tolist()
    if "predicted_class" in outputs:
        names = [_text(v) for v in np.asarray(outputs["predicted_class"], dtype=object).ravel()]
        return names[:n] + [None] * (n - len(names)), confidence
    if scores is None:
        return [None] * n, confidence
    index = scores.argmax(axis=1)
    classes = outputs.get("classes")
    if classes is not None:
        classes = np.asarray(classes, dtype=object).reshape(n, -1)
        return [_text(classes[i, k]) for i, k in enumerate(index)], confidence
    return [str(k) for k in index], confidence


class PartWriter:
    """Turns logged requests into rows of the store's schema and appends them as part files.

    `model_dir_lookup(model_name, version)` returns the served version folder whose
    `assets.extra/drift_projection.npz` projects the `embedding` output. Not thread-safe.
    `count(key, n)` receives "skipped", "rows" and "files".
    """

    def __init__(
        self,
        root_uri: str,
        model_dir_lookup: Callable[[str, int], Path | None] | None,
        count: Callable[[str, int], None],
    ) -> None:
        self.root_uri = root_uri
        self._lookup = model_dir_lookup
        self._count = count
        self._projections: dict[tuple[str, int], EmbeddingProjection | None] = {}
        self._buffers: dict[tuple[str, str], list[dict]] = defaultdict(list)

    @property
    def buffered(self) -> int:
        """Rows waiting for the next `flush`."""
        return sum(len(rows) for rows in self._buffers.values())

    def _projection(self, model_name: str, version: int) -> EmbeddingProjection | None:
        key = (model_name, version)
        if key not in self._projections:
            model_dir = self._lookup(model_name, version) if self._lookup else None
            try:
                self._projections[key] = find_projection(model_dir)
            except ModelError as exc:
                logger.warning("request log: %s; embedding features are not logged", exc)
                self._projections[key] = None
        return self._projections[key]

    def add(self, request: LoggedRequest) -> None:
        """Buffer one row per image of `request`; images that cannot be read are counted skipped."""
        try:
            self._add(request)
        except Exception:
            logger.exception("request log: cannot compute features of %s", request.name)
            self._count("skipped", 1)

    def _add(self, request: LoggedRequest) -> None:
        images = _images_of(request.inputs)
        if images is None:
            logger.debug(
                "request log: no image input in %s: %s", request.name, sorted(request.inputs)
            )
            self._count("skipped", 1)
            return
        n = len(images)
        outputs = request.outputs
        classes, confidence = _predictions(outputs, n) if outputs is not None else (None, None)
        projected = None
        projection = self._projection(request.model_name, request.model_version)
        if projection is not None and outputs is not None and "embedding" in outputs:
            try:
                projected = projection.transform(np.asarray(outputs["embedding"]).reshape(n, -1))
            except (ModelError, ValueError) as exc:
                logger.warning("request log: %s: %s", request.name, exc)
        day = request.timestamp.date().isoformat()
        rows = self._buffers[(request.model_name, day)]
        for index, image in enumerate(images):
            try:
                features = image_features(image)
            except ImageFeatureError as exc:
                where = request.name if n == 1 else f"image {index + 1} of {request.name}"
                logger.debug("request log: skipping %s: %s", where, exc)
                self._count("skipped", 1)
                continue
            row = {
                "timestamp": request.timestamp,
                "model_name": request.model_name,
                "model_version": request.model_version,
                "request_id": request.request_id,
                **features,
            }
            if projected is not None:
                row.update(zip(projection.columns, projected[index].tolist(), strict=True))
            if classes is not None:
                row["predicted_class"] = classes[index]
                row["confidence"] = confidence[index]
            row.update(_out_of_distribution(outputs, n, index))
            rows.append(row)

    def flush(self) -> None:
        """Write the buffered rows, one part file per model and day."""
        for (model_name, day), rows in list(self._buffers.items()):
            if not rows:
                continue
            name = f"part-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
            target = storage.join(
                self.root_uri, _segment(model_name), f"{PARTITION_PREFIX}{day}", name
            )
            try:
                self._write(pd.DataFrame(rows), target)
            except Exception:
                logger.exception("request log: cannot write %d rows to %s", len(rows), target)
                self._count("skipped", len(rows))
            else:
                self._count("rows", len(rows))
                self._count("files", 1)
            self._buffers.pop((model_name, day))

    @staticmethod
    def _write(table: pd.DataFrame, target: str) -> None:
        """Write a part file so that readers never see half of one (temp name, then rename)."""
        if storage.is_remote(target):
            with tempfile.TemporaryDirectory(prefix="tumorflow-log-") as workdir:
                local = Path(workdir) / "part.parquet"
                table.to_parquet(local, index=False)
                storage.upload_file(local, target)
            return
        final = Path(target)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(f".{final.name}.tmp")
        table.to_parquet(partial, index=False)
        os.replace(partial, final)


def partition_in_window(
    path: PurePosixPath | Path, window: tuple[datetime, datetime] | None
) -> bool:
    """Whether a file under the store (path relative to it) may hold rows inside `window`:
    its `date=` partition is within the window's days (files outside partitions always may)."""
    if window is None:
        return True
    for part in path.parts:
        if part.startswith(PARTITION_PREFIX):
            try:
                day = date.fromisoformat(part[len(PARTITION_PREFIX) :])
            except ValueError:
                return True
            return window[0].date() <= day <= window[1].date()
    return True


def _as_utc(moment: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def apply_window(table: pd.DataFrame, window: tuple[datetime, datetime] | None) -> pd.DataFrame:
    """The rows of `table` whose `timestamp` is in [start, end) (all rows without a window)."""
    if window is None:
        return table
    if "timestamp" not in table.columns:
        logger.warning("the table has no timestamp column: the time window is not applied")
        return table
    stamps = pd.to_datetime(table["timestamp"], utc=True)
    keep = (stamps >= _as_utc(window[0])) & (stamps < _as_utc(window[1]))
    return table.loc[keep].reset_index(drop=True)


def holds_request_log(folder: Path) -> bool:
    """Whether a local folder holds part files of the store."""
    return next(Path(folder).rglob(LOG_PART_GLOB), None) is not None


def read_request_log(
    root: Path, window: tuple[datetime, datetime] | None = None, model_name: str | None = None
) -> pd.DataFrame:
    """Rows of the store under `root` (a store root or one model's folder) inside `window`."""
    parts = sorted(
        path
        for path in Path(root).rglob(LOG_PART_GLOB)
        if partition_in_window(path.relative_to(root), window)
    )
    frames = [pd.read_parquet(path) for path in parts]
    if not frames:
        return pd.DataFrame(columns=["timestamp", *IMAGE_FEATURES])
    table = pd.concat(frames, ignore_index=True)
    if model_name is not None and "model_name" in table.columns:
        table = table.loc[table["model_name"] == model_name].reset_index(drop=True)
    return apply_window(table, window)
