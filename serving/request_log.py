"""The request log: drift features of served requests, appended as Parquet part files.

`RequestLogger.log` runs on the request path, so it only samples, stamps and enqueues (a few
microseconds). A background thread decodes the images, computes the drift features, projects the
model's embedding with the served version's stored projection, and appends rows under
`<root>/<model_name>/date=YYYY-MM-DD/part-*.parquet` (a local folder or a gs:// prefix). When the
bounded queue is full a request is dropped and counted, never waited for.

Where the official `tensorflow_model_server` serves the model, `ingest_prediction_logs` fills the
same store from its request log (TFRecord files of `PredictionLog`) and `ingest_image_folder` from
a folder of recent images; both build and write rows with the same `_PartWriter` as the logger.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import re
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tumorflow.components.drift_features import (
    EmbeddingProjection,
    ImageFeatureError,
    find_projection,
    image_features,
)
from tumorflow.core import storage
from tumorflow.core.errors import ConfigError, DatasetError, ModelError

logger = logging.getLogger(__name__)

IMAGE_INPUT = "image_bytes"
# `model_version` of rows whose source names no version (a folder of images, a log without one).
UNKNOWN_VERSION = 0
_UNSAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class _Entry:
    timestamp: datetime
    request_id: str
    model_name: str
    model_version: int
    inputs: Mapping[str, np.ndarray]
    # None when no model ran (a folder of images): the rows then have no prediction columns.
    outputs: Mapping[str, np.ndarray] | None


_STOP = object()


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


class _PartWriter:
    """Turns logged requests into rows of the store's schema and appends them as part files.

    Shared by the `RequestLogger` thread and the ingest functions; not thread-safe. `count(key, n)`
    receives "skipped", "rows" and "files".
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

    def add(self, entry: _Entry) -> None:
        """Buffer one row per image of `entry`; images that cannot be read are counted skipped."""
        try:
            self._add(entry)
        except Exception:
            logger.exception("request log: cannot compute features of request %s", entry.request_id)
            self._count("skipped", 1)

    def _add(self, entry: _Entry) -> None:
        images = _images_of(entry.inputs)
        if images is None:
            logger.debug("request log: no image input in %s", sorted(entry.inputs))
            self._count("skipped", 1)
            return
        n = len(images)
        outputs = entry.outputs
        classes, confidence = _predictions(outputs, n) if outputs is not None else (None, None)
        projected = None
        projection = self._projection(entry.model_name, entry.model_version)
        if projection is not None and outputs is not None and "embedding" in outputs:
            try:
                projected = projection.transform(np.asarray(outputs["embedding"]).reshape(n, -1))
            except (ModelError, ValueError) as exc:
                logger.warning("request log: %s", exc)
        day = entry.timestamp.date().isoformat()
        rows = self._buffers[(entry.model_name, day)]
        for index, image in enumerate(images):
            try:
                features = image_features(image)
            except ImageFeatureError as exc:
                logger.debug("request log: %s", exc)
                self._count("skipped", 1)
                continue
            row = {
                "timestamp": entry.timestamp,
                "model_name": entry.model_name,
                "model_version": entry.model_version,
                "request_id": entry.request_id,
                **features,
            }
            if projected is not None:
                row.update(zip(projection.columns, projected[index].tolist(), strict=True))
            if classes is not None:
                row["predicted_class"] = classes[index]
                row["confidence"] = confidence[index]
            rows.append(row)

    def flush(self) -> None:
        """Write the buffered rows, one part file per model and day."""
        import pandas as pd

        for (model_name, day), rows in list(self._buffers.items()):
            if not rows:
                continue
            name = f"part-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
            target = storage.join(self.root_uri, _segment(model_name), f"date={day}", name)
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
    def _write(table, target: str) -> None:
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


class RequestLogger:
    """Logs drift features of served requests off the request path.

    `model_dir_lookup(model_name, version)` returns the served version folder, whose
    `assets.extra/drift_projection.npz` projects the `embedding` output to the reference's columns.
    """

    def __init__(
        self,
        root_uri: str,
        sample_rate: float = 1.0,
        model_dir_lookup: Callable[[str, int], Path | None] | None = None,
        *,
        max_queue: int = 1000,
        batch_rows: int = 1000,
        flush_interval_s: float = 5.0,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ConfigError(f"the request log sample rate must be within 0..1, got {sample_rate}")
        if not str(root_uri).strip():
            raise ConfigError("the request log needs a root folder or gs:// prefix")
        self.root_uri = str(root_uri)
        self.sample_rate = sample_rate
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._random = random.Random(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._counts = defaultdict(int)
        self._parts = _PartWriter(self.root_uri, model_dir_lookup, self._count)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tumorflow-request-log", daemon=True)
        self._thread.start()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    @property
    def stats(self) -> dict[str, int]:
        """Requests enqueued, sampled out, dropped (queue full or closed); images skipped; rows
        and files written."""
        with self._lock:
            return {
                key: self._counts.get(key, 0)
                for key in ("enqueued", "sampled_out", "dropped", "skipped", "rows", "files")
            }

    def log(
        self,
        *,
        model_name: str,
        model_version: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """Enqueue one served request for logging; returns at once and never raises on overload."""
        if self.sample_rate < 1.0 and self._random.random() >= self.sample_rate:
            self._count("sampled_out")
            return
        if self._closed:
            self._count("dropped")
            return
        entry = _Entry(
            timestamp=datetime.now(UTC),
            request_id=uuid.uuid4().hex,
            model_name=model_name,
            model_version=int(model_version),
            inputs=inputs,
            outputs=outputs,
        )
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._count("dropped")
            return
        self._count("enqueued")

    def close(self, timeout: float = 60.0) -> None:
        """Process what is queued, write the last part files and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the request log did not finish writing within %.0f s", timeout)

    def __enter__(self) -> RequestLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            wait = max(0.05, self._flush_interval_s - (time.monotonic() - last_flush))
            try:
                entry = self._queue.get(timeout=wait)
            except queue.Empty:
                entry = None
            if entry is _STOP:
                self._parts.flush()
                return
            if entry is not None:
                self._parts.add(entry)
            if (
                self._parts.buffered >= self._batch_rows
                or time.monotonic() - last_flush >= self._flush_interval_s
            ):
                self._parts.flush()
                last_flush = time.monotonic()


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _prediction_log_files(paths: list[Path] | Path) -> list[Path]:
    """The files named, and every non-hidden file inside the folders named."""
    files = []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        path = Path(path)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            )
        else:
            raise DatasetError(f"{path} does not exist: pass a request-log file or folder")
    return files


def _entry_of_prediction_log(
    record: bytes, timestamp: datetime, model_name: str | None
) -> _Entry | None:
    """The logged Predict request of one `PredictionLog` record; None for other log types."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    log = prediction_log_pb2.PredictionLog.FromString(record)
    if log.WhichOneof("log_type") != "predict_log":
        return None
    request, response = log.predict_log.request, log.predict_log.response
    name = model_name or log.log_metadata.model_spec.name or request.model_spec.name
    if not name:
        raise ValueError("the record names no model: pass model_name")
    version = UNKNOWN_VERSION
    for spec in (log.log_metadata.model_spec, response.model_spec, request.model_spec):
        if spec.HasField("version"):
            version = int(spec.version.value)
            break
    return _Entry(
        timestamp=timestamp,
        request_id=uuid.uuid4().hex,
        model_name=name,
        model_version=version,
        inputs={key: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()},
        outputs={key: tf.make_ndarray(tensor) for key, tensor in response.outputs.items()} or None,
    )


def _report_ingest(source: object, root_uri: str, counts: Mapping[str, int]) -> int:
    logger.info(
        "ingested %s: %d rows in %d part files under %s; %d records or images skipped",
        source,
        counts["rows"],
        counts["files"],
        root_uri,
        counts["skipped"],
    )
    return counts["rows"]


def ingest_prediction_logs(
    paths: list[Path] | Path,
    root_uri: str,
    *,
    model_name: str | None = None,
    model_dir_lookup: Callable[[str, int], Path | None] | None = None,
    batch_rows: int = 1000,
) -> int:
    """Append rows for the Predict requests in TF Serving's request log (TFRecord files of
    `PredictionLog`, `.gz` ones GZIP-compressed) to the store at `root_uri`; returns the rows written.

    A record carries no time, so its rows take the modification time of its file (the time of the
    file's last record). The model name is `model_name`, else `log_metadata.model_spec.name`; the
    version is the first of the metadata's, the response's and the request's model specs that has
    one. Damaged records and unreadable images are skipped and counted; a damaged frame ends its file.
    """
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tqdm import tqdm

    files = _prediction_log_files(paths)
    counts: Counter[str] = Counter()
    parts = _PartWriter(str(root_uri), model_dir_lookup, lambda key, n: counts.update({key: n}))
    for path in tqdm(files, desc="prediction logs", unit="file", disable=None):
        timestamp = _mtime(path)
        records = tf.data.TFRecordDataset(
            str(path), compression_type="GZIP" if path.suffix == ".gz" else ""
        )
        try:
            for record in records.as_numpy_iterator():
                try:
                    entry = _entry_of_prediction_log(record, timestamp, model_name)
                except (DecodeError, ValueError, TypeError) as exc:
                    logger.debug("%s: skipping a record: %s", path, exc)
                    counts["skipped"] += 1
                    continue
                if entry is None:
                    counts["skipped"] += 1
                    continue
                parts.add(entry)
                if parts.buffered >= batch_rows:
                    parts.flush()
        except tf.errors.OpError as exc:
            logger.warning("%s: stopped at a damaged record: %s", path, exc.message)
            counts["skipped"] += 1
    parts.flush()
    return _report_ingest(paths, root_uri, counts)


def ingest_image_folder(
    folder: Path,
    root_uri: str,
    model_name: str,
    model_version: int | None = None,
    *,
    batch_rows: int = 1000,
) -> int:
    """Append one row of image drift features per image under `folder` to the store at
    `root_uri`, stamped with the file's modification time; returns the rows written.

    No model ran, so the rows have no prediction or embedding columns; `model_version` defaults to
    `UNKNOWN_VERSION`. Images that cannot be read are skipped and counted.
    """
    from tqdm import tqdm

    from tumorflow.components.drift import image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder: pass a folder of recent images")
    counts: Counter[str] = Counter()
    parts = _PartWriter(str(root_uri), None, lambda key, n: counts.update({key: n}))
    version = UNKNOWN_VERSION if model_version is None else int(model_version)
    for path in tqdm(image_files(folder), desc="images", unit="img", disable=None):
        try:
            encoded = path.read_bytes()
        except OSError as exc:
            logger.debug("skipping %s: %s", path, exc)
            counts["skipped"] += 1
            continue
        parts.add(
            _Entry(
                timestamp=_mtime(path),
                request_id=uuid.uuid4().hex,
                model_name=model_name,
                model_version=version,
                inputs={IMAGE_INPUT: np.array([encoded], dtype=object)},
                outputs=None,
            )
        )
        if parts.buffered >= batch_rows:
            parts.flush()
    parts.flush()
    return _report_ingest(folder, root_uri, counts)
