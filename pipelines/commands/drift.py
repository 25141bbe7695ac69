"""`tumorflow drift` (an Evidently drift report) and `tumorflow monitor` (drift check → retrain)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from tumorflow.components.errors import ConfigError
from tumorflow.pipelines.commands.pipeline import add_config_arguments, config_from_args

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
    from tumorflow.components.drift import drift_report, load_table
    from tumorflow.pipelines.config import DriftConfig

    drift_share = args.drift_share if args.drift_share is not None else DriftConfig().drift_share
    if not 0 < drift_share <= 1:
        raise ConfigError(f"--drift-share must be within (0, 1], got {drift_share}")
    model_dir = Path(args.model) if args.model else None
    window = _window(args)
    reference = load_table(args.reference, window=None, model_dir=model_dir)
    current = load_table(
        args.current, window, model_dir=model_dir, projection=reference.attrs.get("projection")
    )
    verdict = drift_report(reference, current, Path(args.output), drift_share)
    print(verdict.summary())
    return 1 if args.fail_on_drift and verdict.drift_detected else 0


def _monitor(args: argparse.Namespace) -> int:
    from tumorflow.components import storage
    from tumorflow.components.drift import served_reference
    from tumorflow.components.monitor import check_and_trigger, cluster_trigger

    config = config_from_args(args)
    model_dir = None
    reference = args.reference
    if reference is None:
        served = served_reference(config.resolved_model_base_path(), config.deploy.model_name)
        if served is None:
            raise ConfigError(
                f"no served version of {config.deploy.model_name!r} under "
                f"{config.resolved_model_base_path()}: pass --reference or deploy a model first"
            )
        if not storage.exists(served.reference_uri):
            raise ConfigError(
                f"served version {served.version} has no drift reference ({served.reference_uri}): "
                "pass --reference"
            )
        reference = served.reference_uri
        if not storage.is_remote(served.version_uri):
            model_dir = Path(served.version_uri)
    output = (
        Path(args.output)
        if args.output
        else (Path(config.run_root) / "monitor" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    )
    result = check_and_trigger(
        config,
        args.current,
        reference,
        output,
        trigger=cluster_trigger(args.host) if args.host else None,
        model_dir=model_dir,
    )
    print(result.verdict.summary())
    if result.triggered:
        print(f"retraining started: {result.run}")
        print(f"  why: {result.trigger_path}")
    else:
        print("no retraining needed")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    drift = subparsers.add_parser(
        "drift",
        help="Evidently drift report of current data against a reference",
        description="Compare drift features (intensity, contrast, entropy, sharpness, size, and "
        "with --model the embedding projection, predicted class and confidence) of two sources; "
        "write report.html, report.json and verdict.json to --output.",
    )
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
        help="share of drifted feature columns that counts as drift (default: drift.drift_share)",
    )
    drift.add_argument(
        "--fail-on-drift", action="store_true", help="exit with status 1 when drift is detected"
    )
    drift.set_defaults(handler=_drift)

    monitor = subparsers.add_parser(
        "monitor",
        help="check recent requests for drift and start retraining when drifted",
        description="Check the last drift.window_hours of --current against the champion's drift "
        "reference; when the share of drifted columns reaches drift.drift_share, start the "
        "retraining pipeline (kfp.local, or --host to submit to Kubeflow Pipelines).",
    )
    add_config_arguments(monitor)
    monitor.add_argument("--current", required=True, metavar="SRC", help=_SOURCE_HELP)
    monitor.add_argument(
        "--reference",
        metavar="SRC",
        help="default: assets.extra/drift_reference.parquet of the served stable (or newest) version",
    )
    monitor.add_argument("--output", metavar="DIR", help="default: <run_root>/monitor/<time>")
    monitor.add_argument("--host", metavar="URL", help="Kubeflow Pipelines endpoint to submit to")
    monitor.set_defaults(handler=_monitor)
