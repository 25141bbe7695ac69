"""`tumorflow run`, `tumorflow compile`, `tumorflow submit`: the retraining pipeline's runners."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The configuration flags every command that needs a PipelineConfig shares, `--run-root`
    included: a run's registry, models and logs are found from it."""
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument(
        "--run-root",
        metavar="DIR",
        help="the folder of runs, the MLflow store and served models (run_root, default: runs)",
    )
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


def check_local_source(source: str, name: str) -> None:
    """A local dataset or drift source that does not exist fails here, in one line, before a
    pipeline starts (phantom, kaggle: and gs:// sources are checked by the steps that fetch them)."""
    from tumorflow.core import storage
    from tumorflow.core.errors import SourceUnavailableError

    if source == "phantom" or source.startswith("kaggle:") or storage.is_remote(source):
        return
    if not Path(source).expanduser().exists():
        raise SourceUnavailableError(f"{name} {source}: no such file or folder")


def _run(args: argparse.Namespace) -> int:
    from tumorflow.core.errors import ConfigError
    from tumorflow.pipelines.runner import run_local

    if args.image and args.runner != "docker":
        raise ConfigError("--image names the image of --runner docker (the tasks' container)")
    config = _cluster_config(args)
    check_local_source(config.dataset.source, "--dataset" if args.dataset else "dataset.source")
    summary = run_local(config, enable_caching=not args.no_cache, runner=args.runner)
    write_summary_json(summary, args.summary_json)
    print(summary.report())
    return 0


def write_summary_json(summary, path: str | None) -> None:
    """`--summary-json FILE`: the run's summary as JSON, for scripts."""
    if path:
        Path(path).write_text(json.dumps(summary.to_dict(), indent=2, default=str))


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
    run.add_argument("--no-cache", action="store_true", help="run every step again")
    run.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    run.add_argument(
        "--runner",
        default="subprocess",
        metavar="subprocess|docker",
        help="subprocess (default): each task a process of this Python; docker: each task a "
        "container of the project image (kfp.local DockerRunner; the Docker API of DOCKER_HOST, "
        "docker's or podman's)",
    )
    run.add_argument(
        "--image",
        metavar="IMAGE",
        help="with --runner docker: the image the tasks run in (runtime.image; `make image`)",
    )
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
