"""Drift reports: load feature tables from images, stored tables or the request log, compare them
with Evidently, and decide whether the data drifted.

A report holds Evidently's data drift over the drift feature columns (the share of drifted columns
decides) and, when both tables hold model outputs, prediction drift on `predicted_class` and
`confidence`. It is written as `report.html`, `report.json` (the Evidently snapshot) and
`verdict.json` (the decision).
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from tumorflow.components.data.image_files import describe as describe_images
from tumorflow.components.monitoring.features import (
    DEFAULT_EMBEDDING_COMPONENTS,
    EMBEDDING_PREFIX,
    IMAGE_FEATURES,
    PREDICTION_COLUMNS,
    PROJECTION_FILE,
    REFERENCE_FILE,
    EmbeddingProjection,
    ModelProbe,
    feature_table,
    find_projection,
    folder_images,
    projection_path_for,
)
from tumorflow.components.monitoring.store import (
    apply_window,
    holds_request_log,
    partition_in_window,
    read_request_log,
)
from tumorflow.components.training.export import IN_DISTRIBUTION
from tumorflow.core import serving_layout, storage
from tumorflow.core.artifacts import DRIFT_REPORT_HTML, DRIFT_REPORT_JSON, VERDICT_FILE
from tumorflow.core.config import DicomConfig
from tumorflow.core.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

# Each table is sampled (deterministically) down to this many rows before Evidently runs. Above
# 1,000 rows Evidently uses the normed Wasserstein distance for numeric columns, whose verdict does
# not depend on the sample size, so the cap bounds the time without changing the tests chosen.
MAX_ROWS = 100_000
SAMPLE_SEED = 0


@dataclass
class ColumnDrift:
    """Evidently's per-column result: the statistical method, its score and threshold."""

    column: str
    method: str
    score: float
    threshold: float
    drifted: bool


@dataclass
class DriftVerdict:
    """The decision of one drift report, as written to `verdict.json`."""

    drift_detected: bool
    share_of_drifted_columns: float
    drift_share_threshold: float
    drifted_columns: list[str]
    columns: list[ColumnDrift]
    prediction_drift: list[ColumnDrift]
    reference_rows: int
    current_rows: int
    sampled_to: int | None
    html_path: str | None
    json_path: str | None
    verdict_path: str
    message: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # Its own signal, beside the drift: current requests the model's OOD detector flagged, of
    # those logged with a flag (None: the request log has no flags, e.g. an older model).
    ood_flagged_rows: int | None = None
    ood_checked_rows: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal: the decision, the drifted features and the report paths."""
        if not self.columns:
            return f"drift: not checked: {self.message}\n  verdict: {self.verdict_path}"
        state = "DETECTED" if self.drift_detected else "not detected"
        lines = [
            f"drift: {state}: {len(self.drifted_columns)} of {len(self.columns)} feature columns drifted "
            f"(share {self.share_of_drifted_columns:.2f}, threshold {self.drift_share_threshold:.2f})",
        ]
        if self.drifted_columns:
            lines.append(f"  drifted: {', '.join(self.drifted_columns)}")
        for column in self.prediction_drift:
            lines.append(
                f"  prediction drift on {column.column}: {'yes' if column.drifted else 'no'} "
                f"({column.method} {column.score:.3g}, threshold {column.threshold:.3g})"
            )
        if self.ood_checked_rows:
            lines.append(
                f"  flagged out of distribution: {self.ood_flagged_rows} of "
                f"{self.ood_checked_rows} requests "
                f"({self.ood_flagged_rows / self.ood_checked_rows:.1%}: not scans like the "
                "training data)"
            )
        if self.sampled_to:
            lines.append(f"  tables sampled to {self.sampled_to} rows each")
        lines.append(f"  html: {self.html_path}")
        lines.append(f"  json: {self.json_path}")
        lines.append(f"  verdict: {self.verdict_path}")
        return "\n".join(lines)


def feature_columns(table: pd.DataFrame) -> list[str]:
    """The drift feature columns a table holds, image features first, then the embedding PCs."""
    embedding = sorted(
        (c for c in table.columns if c.startswith(EMBEDDING_PREFIX)),
        key=lambda name: int(name[len(EMBEDDING_PREFIX) :]),
    )
    return [c for c in IMAGE_FEATURES if c in table.columns] + embedding


def _local_copy(source: str, workdir: Path, window: tuple[datetime, datetime] | None) -> Path:
    """A local path for `source`: itself, or a download of a gs:// table (with its projection)
    or prefix (only the request-log partitions inside `window`)."""

    if not storage.is_remote(source):
        return Path(source)
    suffix = PurePosixPath(source).suffix
    if suffix in (".parquet", ".csv"):
        local = storage.download_file(source, workdir / f"table{suffix}")
        projection = f"{source.rsplit('/', 1)[0]}/{PROJECTION_FILE}"
        if storage.exists(projection):
            storage.download_file(projection, projection_path_for(local))
        return local
    names = [
        name
        for name in storage.list_files(source)
        if ".." not in PurePosixPath(name).parts
        and partition_in_window(PurePosixPath(name), window)
    ]
    if not names:
        raise DatasetError(f"{source} holds no files (in the time window): check the URI")
    logger.info("downloading %d files from %s", len(names), source)
    for name in names:
        storage.download_file(
            storage.join(source, name), workdir.joinpath(*PurePosixPath(name).parts)
        )
    return workdir


def _split_images(split_dir: Path) -> tuple[list[str], list[bytes]]:
    from tumorflow.components.data.tfrecords import read_records

    records = list(read_records(split_dir, "train"))
    return [record.path for record in records], [record.encoded for record in records]


def _folder_images(
    folder: Path, source: str, dicom_config: DicomConfig | None = None
) -> tuple[list[str], list[bytes]]:
    """The images under `folder` (the local copy of `source`), named as under `source`; DICOM
    as its slices (decoded with `dicom_config`, the training window), an undecodable one
    quarantined (logged with the reason)."""
    found = list(folder_images(folder, dicom_config=dicom_config))
    if not found:
        raise DatasetError(f"{source} holds no images ({describe_images()})")
    images = [image for image in found if image.reason is None]
    if not images:
        raise DatasetError(f"none of the files under {source} decode (first: {found[0].reason})")
    return [storage.join(source, i.name) for i in images], [i.encoded for i in images]


def load_table(
    source: str | Path,
    window: tuple[datetime, datetime] | None = None,
    model_dir: Path | None = None,
    *,
    projection: EmbeddingProjection | None = None,
    model_name: str | None = None,
    n_components: int = DEFAULT_EMBEDDING_COMPONENTS,
    dicom_config: DicomConfig | None = None,
) -> pd.DataFrame:
    """A drift feature table from a folder of images, a split dataset (its train split), a stored
    table (.parquet/.csv), or a request-log root (rows inside `window`), local or `gs://`.

    For images, `model_dir` adds the model features; their embedding projection is `projection`,
    else the one stored with the model, else one fitted here. The projection a table's embedding
    columns were made with is returned in `table.attrs["projection"]` (None when none).
    DICOM files in a folder are decoded with `dicom_config` (the training decode's window).
    """
    with tempfile.TemporaryDirectory(prefix="tumorflow-drift-") as workdir:
        path = _local_copy(str(source), Path(workdir), window)
        if not path.exists():
            raise DatasetError(
                f"{source} does not exist: pass a folder of images, a table or a request log"
            )
        if path.is_file():
            if path.suffix == ".parquet":
                table = pd.read_parquet(path)
            elif path.suffix == ".csv":
                table = pd.read_csv(path)
            else:
                raise DatasetError(f"{source} is not a feature table: use a .parquet or .csv file")
            table = apply_window(table, window)
            stored = projection_path_for(path)
            table.attrs["projection"] = (
                EmbeddingProjection.load(stored) if stored.exists() else None
            )
            return table
        if (path / "split_manifest.json").exists():
            names, encoded = _split_images(path)
        elif holds_request_log(path):
            table = read_request_log(path, window, model_name)
            table.attrs["projection"] = None
            return table
        else:
            names, encoded = _folder_images(path, str(source), dicom_config)
    probe = ModelProbe(model_dir) if model_dir is not None else None
    if probe is not None and projection is None:
        projection = find_projection(model_dir)
    table, used = feature_table(
        encoded, probe, projection, n_components, skip_unreadable=True, names=names
    )
    table.attrs["projection"] = used
    return table


def _deterministic_sample(table: pd.DataFrame, cap: int) -> pd.DataFrame:
    if len(table) <= cap:
        return table
    return table.sample(n=cap, random_state=SAMPLE_SEED).reset_index(drop=True)


def _column_results(snapshot: dict) -> dict[str, ColumnDrift]:
    """Per-column drift from an Evidently snapshot dict: its tests' status where present, else the
    method's own rule (p-values drift below the threshold, distances at or above it)."""
    failed: dict[str, bool] = {}
    for test in snapshot.get("tests", []):
        params = (test.get("metric_config") or {}).get("params") or {}
        if params.get("type", "").endswith("ValueDrift") and "column" in params:
            failed[params["column"]] = test.get("status") == "FAIL"
    results = {}
    for metric in snapshot.get("metrics", []):
        config = metric.get("config") or {}
        if not config.get("type", "").endswith("ValueDrift"):
            continue
        column = config["column"]
        method = str(config.get("method") or "")
        threshold = float(config.get("threshold") or 0.0)
        value = metric.get("value")
        score = float(value if not isinstance(value, dict) else value.get("value", np.nan))
        by_rule = score < threshold if "p_value" in method else score >= threshold
        results[column] = ColumnDrift(
            column=column,
            method=method,
            score=score,
            threshold=threshold,
            drifted=failed.get(column, by_rule),
        )
    return results


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    output_dir: Path,
    drift_share: float,
    max_rows: int = MAX_ROWS,
) -> DriftVerdict:
    """Run Evidently's data drift (and prediction drift) and write the HTML, JSON and verdict."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    columns = [c for c in feature_columns(reference) if c in current.columns]
    if not columns:
        raise DatasetError(
            "the reference and current tables share no drift feature columns: build both with "
            "tumorflow's drift features"
        )
    for name, table in (("reference", reference), ("current", current)):
        if len(table) < 2:
            raise DatasetError(
                f"the {name} table has {len(table)} rows: a drift report needs at least 2"
            )
    predictions = [c for c in PREDICTION_COLUMNS if c in reference.columns and c in current.columns]
    sampled_to = max_rows if max(len(reference), len(current)) > max_rows else None
    frames = []
    for table in (reference, current):
        frame = _deterministic_sample(table[columns + predictions], max_rows).copy()
        frame[columns] = frame[columns].astype(np.float64)
        if "confidence" in predictions:
            frame["confidence"] = frame["confidence"].astype(np.float64)
        if "predicted_class" in predictions:
            frame["predicted_class"] = frame["predicted_class"].astype(str)
        frames.append(frame)
    numerical = columns + (["confidence"] if "confidence" in predictions else [])
    categorical = ["predicted_class"] if "predicted_class" in predictions else []
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    datasets = [Dataset.from_pandas(frame, data_definition=definition) for frame in frames]
    report = Report(
        [DataDriftPreset(columns=columns, drift_share=drift_share)]
        + [ValueDrift(column=column) for column in predictions],
        include_tests=True,
    )
    logger.info(
        "drift report: %d reference vs %d current rows, %d feature columns",
        len(frames[0]),
        len(frames[1]),
        len(columns),
    )
    with warnings.catch_warnings():
        # constant columns (one image size) make scipy warn about zero variance; the tests still hold
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(datasets[1], datasets[0])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = output_dir / DRIFT_REPORT_HTML, output_dir / DRIFT_REPORT_JSON
    snapshot.save_html(str(html_path))
    snapshot_dict = snapshot.dict()
    json_path.write_text(json.dumps(snapshot_dict, indent=1, default=str))
    results = _column_results(snapshot_dict)
    feature_results = [results[c] for c in columns if c in results]
    drifted = [r.column for r in feature_results if r.drifted]
    share = len(drifted) / len(feature_results) if feature_results else 0.0
    verdict = DriftVerdict(
        drift_detected=bool(feature_results) and share >= drift_share,
        share_of_drifted_columns=share,
        drift_share_threshold=drift_share,
        drifted_columns=drifted,
        columns=feature_results,
        prediction_drift=[results[c] for c in predictions if c in results],
        reference_rows=len(reference),
        current_rows=len(current),
        sampled_to=sampled_to,
        html_path=str(html_path),
        json_path=str(json_path),
        verdict_path=str(output_dir / VERDICT_FILE),
        **ood_flag_counts(current),
    )
    _write_verdict(verdict)
    return verdict


def ood_flag_counts(table: pd.DataFrame) -> dict[str, int]:
    """`ood_flagged_rows` and `ood_checked_rows` of a request-log table with OOD flags (rows
    logged without one, by a model without a detector, are not counted); {} without any."""
    if IN_DISTRIBUTION not in table.columns:
        return {}
    flags = table[IN_DISTRIBUTION].dropna().astype(bool)
    if flags.empty:
        return {}
    return {"ood_flagged_rows": int((~flags).sum()), "ood_checked_rows": len(flags)}


def _write_verdict(verdict: DriftVerdict) -> None:
    Path(verdict.verdict_path).write_text(json.dumps(verdict.to_dict(), indent=2))


def nothing_to_compare(
    output_dir: Path, drift_share: float, message: str, current_rows: int = 0
) -> DriftVerdict:
    """A verdict that records why no comparison was made (no reference yet, no recent requests)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    verdict = DriftVerdict(
        drift_detected=False,
        share_of_drifted_columns=0.0,
        drift_share_threshold=drift_share,
        drifted_columns=[],
        columns=[],
        prediction_drift=[],
        reference_rows=0,
        current_rows=current_rows,
        sampled_to=None,
        html_path=None,
        json_path=None,
        verdict_path=str(output_dir / VERDICT_FILE),
        message=message,
    )
    _write_verdict(verdict)
    return verdict


def drift_against_reference(
    split_dir: Path, reference_path: Path | None, output_dir: Path, drift_share: float
) -> DriftVerdict:
    """The pipeline's drift step: the new split's train images against the deployed model's
    reference table. Without a reference (first deployment) the verdict says so."""
    if reference_path is None or not Path(reference_path).exists():
        return nothing_to_compare(
            output_dir,
            drift_share,
            "no deployed model reference to compare against (first deployment?)",
        )
    reference = load_table(reference_path)
    current = load_table(split_dir)
    return drift_report(reference, current, output_dir, drift_share)


def _log_to_mlflow(verdict: DriftVerdict, tracking_uri: str, experiment: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="drift-report", tags={"tumorflow.kind": "drift-report"}):
        mlflow.log_metrics(
            {
                "drift.share_of_drifted_columns": verdict.share_of_drifted_columns,
                "drift.detected": float(verdict.drift_detected),
                "drift.current_rows": float(verdict.current_rows),
            }
        )
        for path in (verdict.html_path, verdict.json_path, verdict.verdict_path):
            if path:
                mlflow.log_artifact(path, artifact_path="drift")


class NoDriftReference(ConfigError):
    """Nothing served under the base path, or the served version has no drift reference."""


def resolve_served_reference(model_base_path: str, model_name: str) -> tuple[str, Path | None]:
    """The one lookup of the served model's drift reference: the reference of the served
    (`stable`, else newest) version and its local folder (None for a remote base path; it lets
    a check add the model's embedding features). NoDriftReference says why there is none."""
    served = serving_layout.served_version(model_base_path, model_name)
    if served is None:
        raise NoDriftReference(
            f"no served version of {model_name!r} under {model_base_path}: "
            "deploy a model first (or compare by hand: tumorflow drift --reference ...)"
        )
    if not storage.exists(served.reference_uri):
        raise NoDriftReference(
            f"served version {served.version} has no drift reference ({served.reference_uri}): "
            "redeploy it, or compare by hand: tumorflow drift --reference ..."
        )
    model_dir = None if storage.is_remote(served.version_uri) else Path(served.version_uri)
    return served.reference_uri, model_dir


def drift_against_served_model(
    split_dir: Path,
    model_base_path: str,
    model_name: str,
    output_dir: Path,
    *,
    drift_share: float,
    html_path: Path | None = None,
    tracking_uri: str | None = None,
    experiment: str = "tumorflow",
) -> DriftVerdict:
    """The pipeline's drift step against whatever is served now: finds the champion's reference,
    runs `drift_against_reference`, copies the HTML to `html_path` (the pipeline UI's artifact)
    and logs the verdict and report to MLflow when `tracking_uri` is given."""
    try:
        reference_uri, _ = resolve_served_reference(model_base_path, model_name)
    except NoDriftReference as exc:
        logger.warning("the drift report compares nothing: %s", exc)
        reference_uri = None
    with tempfile.TemporaryDirectory(prefix="tumorflow-reference-") as workdir:
        reference_path = None
        if reference_uri is not None:
            reference_path = Path(workdir) / REFERENCE_FILE
            storage.download_file(reference_uri, reference_path)
        verdict = drift_against_reference(split_dir, reference_path, output_dir, drift_share)
    if html_path is not None:
        html_path = Path(html_path)
        html_path.parent.mkdir(parents=True, exist_ok=True)
        if verdict.html_path:
            shutil.copyfile(verdict.html_path, html_path)
        else:
            html_path.write_text(
                f"<html><body><h1>Drift report</h1><p>{html.escape(verdict.message)}</p></body></html>"
            )
    if tracking_uri:
        _log_to_mlflow(verdict, tracking_uri, experiment)
    return verdict
