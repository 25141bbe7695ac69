"""Fill the request-log store where `tumorflow serve` did not log the requests.

Where the official `tensorflow_model_server` serves the model, `ingest_prediction_logs` reads its
request log (TFRecord files of `PredictionLog`); `ingest_image_folder` takes a folder of recent
images or raw DICOM, decoded as training decodes it. Both write rows with the store's
`PartWriter`, the one the server's logger uses.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tumorflow.components.monitoring.features import folder_images
from tumorflow.components.monitoring.store import UNKNOWN_VERSION, LoggedRequest, PartWriter
from tumorflow.components.training.export import INPUT as IMAGE_INPUT
from tumorflow.core.config import DicomConfig
from tumorflow.core.errors import DatasetError

logger = logging.getLogger(__name__)


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


def _request_of_prediction_log(
    record: bytes, timestamp: datetime, model_name: str | None, source: str
) -> LoggedRequest | None:
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
    return LoggedRequest(
        timestamp=timestamp,
        model_name=name,
        model_version=version,
        inputs={key: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()},
        outputs={key: tf.make_ndarray(tensor) for key, tensor in response.outputs.items()} or None,
        source=source,
    )


def _report_ingest(source: object, root_uri: str, counts: Mapping[str, int]) -> int:
    logger.info(
        "ingested %s: %d rows in %d part files under %s; %d records or images skipped, "
        "%d DICOM files quarantined (not decodable)",
        source,
        counts["rows"],
        counts["files"],
        root_uri,
        counts["skipped"],
        counts["quarantined"],
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
    parts = PartWriter(str(root_uri), model_dir_lookup, lambda key, n: counts.update({key: n}))
    for path in tqdm(files, desc="prediction logs", unit="file", disable=None):
        timestamp = _mtime(path)
        records = tf.data.TFRecordDataset(
            str(path), compression_type="GZIP" if path.suffix == ".gz" else ""
        )
        try:
            for number, record in enumerate(records.as_numpy_iterator(), start=1):
                source = f"{path} record {number}"
                try:
                    request = _request_of_prediction_log(record, timestamp, model_name, source)
                except (DecodeError, ValueError, TypeError) as exc:
                    logger.debug("%s: skipped: %s", source, exc)
                    counts["skipped"] += 1
                    continue
                if request is None:
                    counts["skipped"] += 1
                    continue
                parts.add(request)
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
    dicom_config: DicomConfig | None = None,
) -> int:
    """Append one row of image drift features per image under `folder` to the store at
    `root_uri`, stamped with the file's modification time; returns the rows written.

    DICOM files (`.dcm`, or series files without an extension) become one row per slice, decoded
    by the training decode (components/data/dicom.py with `dicom_config`, by default the default
    window); one that cannot be decoded is quarantined: logged with its reason and counted.
    No model ran, so the rows have no prediction or embedding columns; `model_version` defaults to
    `UNKNOWN_VERSION`. Images that cannot be read are skipped and counted.
    """
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder: pass a folder of recent images")
    counts: Counter[str] = Counter()
    parts = PartWriter(str(root_uri), None, lambda key, n: counts.update({key: n}))
    version = UNKNOWN_VERSION if model_version is None else int(model_version)
    images = folder_images(folder, str(folder) + "/", dicom_config)
    for image in tqdm(images, desc="images", unit="img", disable=None):
        if image.reason is not None:
            counts["quarantined"] += 1
            continue
        parts.add(
            LoggedRequest(
                timestamp=_mtime(image.path),
                model_name=model_name,
                model_version=version,
                inputs={IMAGE_INPUT: np.array([image.encoded], dtype=object)},
                outputs=None,
                source=image.name,
            )
        )
        if parts.buffered >= batch_rows:
            parts.flush()
    parts.flush()
    return _report_ingest(folder, root_uri, counts)
