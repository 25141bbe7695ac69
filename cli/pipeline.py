"""`tumorflow run`, `tumorflow compile`, `tumorflow submit`: the retraining pipeline's runners."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The configuration flags every command that needs a PipelineConfig shares."""
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="dataset preset: phantom (default), kidney_ct, chest_ct, brain_mri",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.stage1.epochs=3 (repeatable)",
    )


def add_no_registry_argument(parser: argparse.ArgumentParser) -> None:
    """The explicit opt-out of a cluster run without an MLflow server to find the champion in."""
    parser.add_argument(
        "--no-registry",
        action="store_true",
        help="allow an empty tracking.tracking_uri: no champion, the gate runs its absolute "
        "rules only",
    )


def config_from_args(args: argparse.Namespace, *, default_preset: str | None = "phantom"):
    from tumorflow.core.config import list_presets, load_config

    preset = getattr(args, "preset", None)
    overrides = list(getattr(args, "overrides", []) or [])
    dataset = getattr(args, "dataset", None)
    if dataset:
        if dataset in list_presets():
            preset = dataset
        else:
            overrides.append(f"dataset.source={dataset}")
    if preset is None and not getattr(args, "config", None):
        preset = default_preset
    if getattr(args, "run_root", None):
        overrides.append(f"run_root={args.run_root}")
    return load_config(getattr(args, "config", None), preset, overrides)


def print_summary(summary) -> None:
    print()
    print(f"run            {summary.run_name}")
    print(f"artifacts      {summary.run_dir}")
    print("task wall time (s):")
    for task, seconds in summary.task_seconds.items():
        print(f"  {task:<28}{seconds:>8}")
    if summary.trigger_reason:
        print(f"triggered by   {summary.trigger_reason}")
    if summary.gate is not None:
        verdict = "PASSED" if summary.gate.get("passed") else "FAILED"
        print(f"gate           {verdict}  ({summary.run_dir / 'gate' / 'report'})")
        for rule in summary.gate.get("rules", []):
            mark = "ok  " if rule.get("passed") else "FAIL"
            value = rule.get("value")
            shown = f"{value:.4f}" if isinstance(value, int | float) else value
            print(f"  {mark} {rule.get('name', rule.get('metric'))}: {shown}")
    if summary.approval is not None:
        print(f"approval       {summary.approval.get('status')}")
    if summary.deployed_version is not None:
        print(f"deployed       version {summary.deployed_version} under {summary.model_base_path}")
    else:
        print(f"deployed       {summary.deploy_note or 'nothing'}")
    if summary.dataset_version:
        print(f"dataset        {summary.dataset_version[:23]}")
    print(f"mlflow         {summary.tracking_uri}")
    print(
        f"serve it       tumorflow serve --model_config_file {summary.model_base_path}/models.config"
        " --model_config_file_poll_wait_seconds 10"
    )


def _run(args: argparse.Namespace) -> int:
    from tumorflow.pipelines.runner import run_local

    config = config_from_args(args)
    summary = run_local(config, enable_caching=not args.no_cache, monitor_source=args.monitor)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    print_summary(summary)
    return 0


def _cluster_config(args: argparse.Namespace):
    config = config_from_args(args)
    if args.image:
        config.runtime.image = args.image
    return config


def _compile(args: argparse.Namespace) -> int:
    from tumorflow.pipelines.runner import compile_pipeline

    path = compile_pipeline(
        Path(args.output),
        config=_cluster_config(args),
        pipeline=args.pipeline,
        no_registry=args.no_registry,
    )
    print(f"wrote {path}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from tumorflow.pipelines.runner import submit

    run_id = submit(_cluster_config(args), args.host, no_registry=args.no_registry)
    print(f"submitted run {run_id} to {args.host}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="run the retraining pipeline locally (kfp.local, no cluster)",
        description="Run the whole DAG on this machine with kfp.local: download, validate and "
        "split, two-stage training, evaluation, gate, approval, deploy. Caching is on: an "
        "unchanged step is reused.",
    )
    add_config_arguments(run)
    run.add_argument(
        "--dataset",
        metavar="PRESET|SOURCE",
        help="a preset name, or a source: a folder, an archive, kaggle:owner/slug, gs://...",
    )
    run.add_argument("--run-root", metavar="DIR", help="where runs, MLflow and models go")
    run.add_argument("--no-cache", action="store_true", help="run every step again")
    run.add_argument(
        "--monitor",
        metavar="CURRENT",
        help="run the monitoring pipeline instead: drift of CURRENT (request log, table or image "
        "folder) against the served model, and retraining only when it drifted",
    )
    run.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    run.set_defaults(handler=_run)

    compile_ = subparsers.add_parser(
        "compile", help="compile the pipeline to a Kubeflow / Vertex AI pipeline spec"
    )
    add_config_arguments(compile_)
    compile_.add_argument("--output", default="pipeline.yaml", metavar="FILE")
    compile_.add_argument(
        "--image", metavar="IMAGE", help="the project image every step runs in (runtime.image)"
    )
    compile_.add_argument(
        "--pipeline",
        choices=("retrain", "monitor"),
        default="retrain",
        help="retrain (default), or monitor: a drift check that runs retraining when drifted",
    )
    add_no_registry_argument(compile_)
    compile_.set_defaults(handler=_compile)

    submit = subparsers.add_parser(
        "submit", help="compile and submit one run to a Kubeflow Pipelines endpoint"
    )
    add_config_arguments(submit)
    submit.add_argument("--dataset", metavar="PRESET|SOURCE")
    submit.add_argument("--host", required=True, help="the KFP API endpoint")
    submit.add_argument("--image", metavar="IMAGE")
    add_no_registry_argument(submit)
    submit.set_defaults(handler=_submit)
