"""`tumorflow schedule create|list|delete`: recurring runs on Kubeflow Pipelines or Vertex AI."""

from __future__ import annotations

import argparse

from tumorflow.cli.pipeline import add_config_arguments, add_no_registry_argument, config_from_args
from tumorflow.core.errors import ConfigError


def _scheduler(args: argparse.Namespace, experiment: str):
    if args.target == "kubeflow":
        from tumorflow.pipelines.schedule_kubeflow import KubeflowScheduler

        if not args.host:
            raise ConfigError("--target kubeflow needs --host, the KFP API endpoint (http://...)")
        return KubeflowScheduler(args.host, experiment)
    from tumorflow.pipelines.schedule_vertex import VertexScheduler

    if not (args.project and args.region):
        raise ConfigError("--target vertex needs --project and --region (e.g. europe-west4)")
    return VertexScheduler(args.project, args.region, endpoint=args.endpoint)


def _create(args: argparse.Namespace) -> int:
    from tumorflow.pipelines.schedule import build_template

    config = config_from_args(args)
    # The template is compiled for the engine it is scheduled on (multi-worker training is a
    # TFJob on Kubeflow, a custom job on Vertex AI).
    config.runtime.target = args.target
    scheduler = _scheduler(args, config.tracking.experiment)
    cron = scheduler.read_cron(args.cron)
    if cron.note:
        print(f"note: {cron.note}")
    if args.target == "vertex" and not args.pipeline_root:
        raise ConfigError(
            "--target vertex needs --pipeline-root gs://BUCKET/PREFIX for run outputs"
        )
    template = build_template(
        config,
        pipeline=args.pipeline,
        image=args.image,
        no_registry=args.no_registry,
        current_source=args.current,
        enable_caching=not args.no_cache,
    )
    schedule = scheduler.create(
        template, args.name, cron.expression, pipeline_root=args.pipeline_root
    )
    print(
        f"created schedule {schedule.name} (id {schedule.id}): {template.name} template "
        f"{template.version} on {schedule.cron!r}, one run at a time, no catch-up"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    schedules = _scheduler(args, config_from_args(args).tracking.experiment).list()
    if not schedules:
        print("no schedules")
        return 0
    rows = [("NAME", "ID", "CRON", "STATUS", "TEMPLATE")]
    rows += [(s.name, s.id, s.cron, s.status, s.template) for s in schedules]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _delete(args: argparse.Namespace) -> int:
    schedule = _scheduler(args, config_from_args(args).tracking.experiment).delete(args.schedule)
    print(f"deleted schedule {schedule.name} (id {schedule.id})")
    return 0


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--target",
        choices=("kubeflow", "vertex"),
        default="kubeflow",
        help="kubeflow (default): recurring runs of the config's experiment; vertex: Vertex AI "
        "pipeline schedules",
    )
    parser.add_argument("--host", metavar="URL", help="the KFP API endpoint (kubeflow)")
    parser.add_argument("--project", metavar="PROJECT", help="Google Cloud project (vertex)")
    parser.add_argument("--region", metavar="REGION", help="Vertex AI region, e.g. europe-west4")
    parser.add_argument(
        "--endpoint",
        metavar="URL",
        help="Vertex AI API base URL (default https://REGION-aiplatform.googleapis.com/v1)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    schedule = subparsers.add_parser(
        "schedule",
        help="create, list and delete recurring pipeline runs on Kubeflow Pipelines / Vertex AI",
        description="Recurring runs of the retraining or monitoring pipeline from a compiled "
        "template named after the tumorflow version and a hash of its content; at most one run "
        "at a time, and no catch-up of runs missed while the scheduler was down.",
    )
    actions = schedule.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="compile, upload and schedule a pipeline")
    _add_target_arguments(create)
    create.add_argument("--name", required=True, help="the schedule's name, e.g. weekly-retrain")
    create.add_argument(
        "--cron",
        required=True,
        help="when: 6 fields seconds first for kubeflow ('0 0 3 * * 1'), 5 fields for vertex "
        "('TZ=Europe/Berlin 0 3 * * 1'); the other form is converted where it can be",
    )
    create.add_argument(
        "--pipeline",
        choices=("retrain", "monitor"),
        default="retrain",
        help="retrain (default), or monitor: a drift check that retrains only when drifted",
    )
    create.add_argument(
        "--current",
        metavar="SOURCE",
        help="monitor pipeline: the served-request store to check for drift (gs://...)",
    )
    create.add_argument(
        "--image", metavar="IMAGE", help="the project image every step runs in (runtime.image)"
    )
    create.add_argument(
        "--pipeline-root",
        metavar="URI",
        help="where runs write their outputs (required for vertex: gs://BUCKET/PREFIX)",
    )
    create.add_argument(
        "--no-cache",
        action="store_true",
        help="run every step of every scheduled run again (default: steps are keyed on the "
        "dataset version, so unchanged data is reused and new data retrains)",
    )
    add_no_registry_argument(create)
    create.set_defaults(handler=_create)

    list_ = actions.add_parser("list", help="the schedules: name, id, cron, status, template")
    _add_target_arguments(list_)
    list_.set_defaults(handler=_list)

    delete = actions.add_parser("delete", help="delete a schedule by name or id")
    _add_target_arguments(delete)
    delete.add_argument("schedule", metavar="NAME", help="the schedule's name or id")
    delete.set_defaults(handler=_delete)
