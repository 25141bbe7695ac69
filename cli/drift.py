"""`tumorflow drift` (an Evidently drift report), `tumorflow monitor` (drift check → retrain) and
`tumorflow drift-ingest` (fill the request-log store from TF Serving's request log or images)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tumorflow.cli.pipeline import (
    add_config_arguments,
    add_no_registry_argument,
    config_from_args,
)
from tumorflow.core.errors import ConfigError

_SOURCE_HELP = (
    "a folder of images, a split dataset, a feature table (.parquet/.csv) or a request-log root "
    "(local or gs://)"
)


def _moment(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not an ISO-8601 time: write e.g. 2026-11-22T08:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _window(args: argparse.Namespace) -> tuple[datetime, datetime] | None:
    since, until = _moment(args.since, "--since"), _moment(args.until, "--until")
    if since is None and until is None:
        return None
    window = (since or datetime.min.replace(tzinfo=UTC), until or datetime.now(UTC))
    if window[0] >= window[1]:
        raise ConfigError(
            f"--since {window[0].isoformat()} is not before --until {window[1].isoformat()}"
        )
    return window


def _drift(args: argparse.Namespace) -> int:
    from tumorflow.components.monitoring.drift_report import drift_report, load_table

    config = config_from_args(args, default_preset=None)
    drift_share = args.drift_share if args.drift_share is not None else config.drift.drift_share
    if not 0 < drift_share <= 1:
        raise ConfigError(f"--drift-share must be within (0, 1], got {drift_share}")
    model_dir = Path(args.model) if args.model else None
    window = _window(args)
    dicom = config.dataset.dicom
    reference = load_table(args.reference, window=None, model_dir=model_dir, dicom_config=dicom)
    current = load_table(
        args.current,
        window,
        model_dir=model_dir,
        projection=reference.attrs.get("projection"),
        dicom_config=dicom,
    )
    verdict = drift_report(reference, current, Path(args.output), drift_share)
    print(verdict.summary())
    return 1 if args.fail_on_drift and verdict.drift_detected else 0


def _monitor(args: argparse.Namespace) -> int:
    """Run the monitoring pipeline: the drift check, and the retraining DAG when it drifted."""
    from tumorflow.components.monitoring.drift_report import resolve_served_reference

    config = config_from_args(args)
    if args.host:
        from tumorflow.pipelines.runner import submit

        run_id = submit(
            config,
            args.host,
            pipeline="monitor",
            monitor_source=args.current,
            no_registry=args.no_registry,
        )
        print(f"submitted monitoring run {run_id} to {args.host}")
        return 0
    # Fail in one line, before any task starts, when there is nothing to compare with.
    from tumorflow.cli.pipeline import check_local_source, write_summary_json

    check_local_source(args.current, "--current")
    resolve_served_reference(config.resolved_model_base_path(), config.deploy.model_name)
    from tumorflow.pipelines.run_folder import RunFolder
    from tumorflow.pipelines.runner import run_local

    summary = run_local(config, enable_caching=not args.no_cache, monitor_source=args.current)
    write_summary_json(summary, args.summary_json)
    found = RunFolder(summary.run_dir).drift_check_verdict()
    if found is not None:
        if found.get("columns"):
            state = "DETECTED" if found["drift_detected"] else "not detected"
            print(
                f"drift: {state}: {len(found['drifted_columns'])} of {len(found['columns'])} "
                f"feature columns drifted (share {found['share_of_drifted_columns']:.2f}, "
                f"threshold {found['drift_share_threshold']:.2f})"
            )
        else:
            print(f"drift: not checked: {found.get('message', '')}")
    if summary.trigger_reason:
        print(summary.report())
    else:
        print("no retraining needed")
    return 0


def _projection_lookup(model_base_path: str, workdir: Path) -> Callable[[str, int], Path | None]:
    """Served version folders under `<base>/<name>/<version>`; from gs:// only the drift
    projection is downloaded, into `workdir`."""
    from tumorflow.components.monitoring.features import PROJECTION_FILE
    from tumorflow.core import serving_layout, storage

    def lookup(model_name: str, version: int) -> Path | None:
        version_uri = serving_layout.version_uri(model_base_path, model_name, version)
        if not storage.is_remote(version_uri):
            return Path(version_uri)
        remote = serving_layout.asset_uri(version_uri, PROJECTION_FILE)
        if not storage.exists(remote):
            return None
        local = workdir / f"{model_name}-{version}"
        storage.download_file(remote, Path(serving_layout.asset_uri(local, PROJECTION_FILE)))
        return local

    return lookup


def _drift_ingest(args: argparse.Namespace) -> int:
    import tempfile

    from tumorflow.components.monitoring.ingest import ingest_image_folder, ingest_prediction_logs

    if args.images:
        if not args.model_name:
            raise ConfigError("--images needs --model-name: the model the images' rows belong to")
        version = None
        if args.model_base_path:
            from tumorflow.core.serving_layout import served_version

            served = served_version(args.model_base_path, args.model_name)
            version = served.version if served else None
        rows = ingest_image_folder(
            Path(args.images),
            args.store,
            args.model_name,
            version,
            dicom_config=config_from_args(args, default_preset=None).dataset.dicom,
        )
    else:
        with tempfile.TemporaryDirectory(prefix="tumorflow-ingest-") as workdir:
            lookup = (
                _projection_lookup(args.model_base_path, Path(workdir))
                if args.model_base_path
                else None
            )
            rows = ingest_prediction_logs(
                Path(args.prediction_logs),
                args.store,
                model_name=args.model_name,
                model_dir_lookup=lookup,
            )
    print(f"wrote {rows} rows to the request log at {args.store}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    drift = subparsers.add_parser(
        "drift",
        help="Evidently drift report of current data against a reference",
        description="Compare drift features (intensity, contrast, entropy, sharpness, size, and "
        "with --model the embedding projection, predicted class and confidence) of two sources; "
        "write report.html, report.json and verdict.json to --output. DICOM files in image "
        "folders are decoded with the dataset.dicom window of --preset/--config/--set.",
    )
    add_config_arguments(drift)
    drift.add_argument("--reference", required=True, metavar="SRC", help=_SOURCE_HELP)
    drift.add_argument("--current", required=True, metavar="SRC", help=_SOURCE_HELP)
    drift.add_argument("--output", required=True, metavar="DIR", help="folder for the report")
    drift.add_argument(
        "--model",
        metavar="DIR",
        help="a trained model folder or a served SavedModel version: adds model features for images",
    )
    drift.add_argument(
        "--since", metavar="ISO", help="start of the request-log window (UTC if no zone)"
    )
    drift.add_argument(
        "--until", metavar="ISO", help="end of the request-log window (default: now)"
    )
    drift.add_argument(
        "--drift-share",
        type=float,
        metavar="SHARE",
        help="share of drifted feature columns that counts as drift (default: the config's "
        "drift.drift_share)",
    )
    drift.add_argument(
        "--fail-on-drift", action="store_true", help="exit with status 1 when drift is detected"
    )
    drift.set_defaults(handler=_drift)

    monitor = subparsers.add_parser(
        "monitor",
        help="check recent requests for drift and start retraining when drifted",
        description="Run the monitoring pipeline: check the last drift.window_hours of --current "
        "against the served version's drift reference and, when the share of drifted columns "
        "reaches drift.drift_share, the retraining DAG with the reason as its trigger_reason "
        "(kfp.local, or --host to submit it to Kubeflow Pipelines). The one command for "
        "monitoring, by hand, from cron or on a schedule.",
    )
    add_config_arguments(monitor)
    monitor.add_argument("--current", required=True, metavar="SRC", help=_SOURCE_HELP)
    monitor.add_argument(
        "--host", metavar="URL", help="submit the monitoring pipeline to this Kubeflow endpoint"
    )
    monitor.add_argument("--no-cache", action="store_true", help="run every step again")
    monitor.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    add_no_registry_argument(monitor)
    monitor.set_defaults(handler=_monitor)

    ingest = subparsers.add_parser(
        "drift-ingest",
        help="fill the request-log store from TF Serving's request log or a folder of images",
        description="Append drift-feature rows to the request-log store (the one `tumorflow "
        "serve --request_log_dir` writes) from the PredictionLog TFRecord files of "
        "tensorflow_model_server's request logging, or from a folder of recent images.",
    )
    add_config_arguments(ingest)
    ingest.add_argument(
        "--store", required=True, metavar="URI", help="request-log root (local or gs://)"
    )
    source = ingest.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prediction-logs",
        metavar="PATH",
        help="a PredictionLog TFRecord file or a folder of them (rows timed by file modification)",
    )
    source.add_argument(
        "--images", metavar="DIR", help="a folder of recent images (image features only)"
    )
    ingest.add_argument(
        "--model-name",
        "--model_name",
        dest="model_name",
        metavar="NAME",
        help="model the rows belong to (required with --images; default: the logged model name)",
    )
    ingest.add_argument(
        "--model-base-path",
        "--model_base_path",
        dest="model_base_path",
        metavar="BASE",
        help="served models (local or gs://): adds the embedding projection of the logged "
        "version, or with --images the served version number",
    )
    ingest.set_defaults(handler=_drift_ingest)
