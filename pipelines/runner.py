"""Thin runners of the one pipeline: locally with kfp.local, compiled for Kubeflow / Vertex AI, or
submitted to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tumorflow.core.config import PipelineConfig
from tumorflow.core.errors import TumorflowError
from tumorflow.pipelines import run_folder
from tumorflow.pipelines.run_console import RunConsole
from tumorflow.pipelines.run_folder import RunFolder

log = logging.getLogger(__name__)


class PipelineRunError(TumorflowError):
    """A task of the pipeline failed; the run log says why."""


class ContainerEngineError(TumorflowError):
    """`--runner docker` found no Docker API, or the image is in no engine and cannot be pulled."""


RUNNERS = ("subprocess", "docker")


@dataclass
class RunSummary:
    """What a local run did: where it wrote, how long each task took, what the gate decided."""

    run_name: str
    run_dir: Path
    task_seconds: dict[str, float | str]
    gate: dict[str, Any] | None
    approval: dict[str, Any] | None
    deployed_version: int | None
    model_base_path: str
    tracking_uri: str
    trigger_reason: str | None = None
    dataset_version: str | None = None
    # Why nothing was deployed although approval passed (the model equals the served one).
    deploy_note: str | None = None
    log_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "run_dir": str(self.run_dir),
            "task_seconds": self.task_seconds,
            "gate": self.gate,
            "approval": self.approval,
            "deployed_version": self.deployed_version,
            "model_base_path": self.model_base_path,
            "tracking_uri": self.tracking_uri,
            "trigger_reason": self.trigger_reason,
            "dataset_version": self.dataset_version,
            "deploy_note": self.deploy_note,
            "log_path": str(self.log_path) if self.log_path else None,
        }

    def __str__(self) -> str:
        deployed = (
            f"deployed version {self.deployed_version}"
            if self.deployed_version is not None
            else "deployed nothing"
        )
        return f"run {self.run_name}: {deployed}; artifacts under {self.run_dir}"

    def report(self) -> str:
        """The summary `tumorflow run` prints: tasks, the gate's rules, approval, deployment."""
        lines = [
            "",
            f"run            {self.run_name}",
            f"artifacts      {self.run_dir}",
        ]
        if self.log_path is not None:
            lines.append(f"log            {self.log_path}")
        lines.append("task wall time (s):")
        lines += [f"  {task:<28}{seconds:>8}" for task, seconds in self.task_seconds.items()]
        if self.trigger_reason:
            lines.append(f"triggered by   {self.trigger_reason}")
        if self.gate is not None:
            verdict = "PASSED" if self.gate.get("passed") else "FAILED"
            lines.append(f"gate           {verdict}  ({self.run_dir / 'gate' / 'report'})")
            for rule in self.gate.get("rules", []):
                mark = "ok  " if rule.get("passed") else "FAIL"
                value = rule.get("value")
                shown = f"{value:.4f}" if isinstance(value, int | float) else value
                lines.append(f"  {mark} {rule.get('name', rule.get('metric'))}: {shown}")
        if self.approval is not None:
            lines.append(f"approval       {self.approval.get('status')}")
        if self.deployed_version is not None:
            lines.append(
                f"deployed       version {self.deployed_version} under {self.model_base_path}"
            )
        else:
            lines.append(f"deployed       {self.deploy_note or 'nothing'}")
        if self.dataset_version:
            lines.append(f"dataset        {self.dataset_version[:23]}")
        lines.append(f"mlflow         {self.tracking_uri}")
        lines.append(
            f"serve it       tumorflow serve --model_config_file {self.model_base_path}/"
            "models.config --model_config_file_poll_wait_seconds 10"
        )
        return "\n".join(lines)


def _newest_run_dir(pipeline_root: Path, pipeline_name: str, not_before: float) -> Path:
    candidates = [
        p
        for p in pipeline_root.glob(f"{pipeline_name}-*")
        if p.is_dir() and p.stat().st_mtime >= not_before - 1
    ]
    if not candidates:
        raise PipelineRunError(f"the run left no folder under {pipeline_root}")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def run_local(
    config: PipelineConfig,
    *,
    trigger_reason: str | None = None,
    enable_caching: bool = True,
    monitor_source: str | None = None,
    runner: str = "subprocess",
) -> RunSummary:
    """Run the whole DAG on this machine with kfp.local: each task a subprocess of this
    interpreter (`runner="subprocess"`), or a container of `config.runtime.image` through the
    Docker API (`runner="docker"`, kfp.local's DockerRunner; docker, or podman's Docker API).

    With `monitor_source` (served requests, a table or a folder of recent images) it runs the
    monitoring pipeline instead: the drift check, and the retraining DAG only when it drifted.
    """
    from kfp import local

    from tumorflow.components.release.trust_root import ensure_local_trust_root
    from tumorflow.core.config import RuntimeConfig
    from tumorflow.pipelines.pipeline import (
        MONITOR_PIPELINE_NAME,
        PIPELINE_NAME,
        monitor_pipeline,
        monitor_pipeline_for,
        pipeline_parameters,
        retrain_pipeline,
        retrain_pipeline_for,
    )

    if runner not in RUNNERS:
        raise PipelineRunError(f"unknown runner {runner!r}: choose {' or '.join(RUNNERS)}")
    run_root = Path(config.run_root).resolve()
    pipeline_root = run_folder.pipeline_root(run_root)
    arguments = pipeline_parameters(config, local=True)
    if runner == "docker":
        image, task_runner = _docker_runner(config.runtime.image, run_root, arguments)
        # Traced with the image as the engine names it, as `tumorflow compile` traces them.
        retrain_pipeline = retrain_pipeline_for(RuntimeConfig(image=image))
        monitor_pipeline = monitor_pipeline_for(RuntimeConfig(image=image))
    else:
        task_runner = local.SubprocessRunner(use_venv=False)
    pipeline_root.mkdir(parents=True, exist_ok=True)
    made = ensure_local_trust_root(
        config.resolved_trust_root(),
        config.resolved_pipeline_key(),
        config.resolved_console_key(),
        getpass.getuser(),
    )
    if made:
        print(made)
    _keep_mlflow_artifacts_in(config, run_root)
    local.init(
        runner=task_runner,
        pipeline_root=str(pipeline_root),
        enable_caching=enable_caching,
    )
    if trigger_reason:
        arguments["trigger_reason"] = trigger_reason
    name = PIPELINE_NAME if monitor_source is None else MONITOR_PIPELINE_NAME
    verbose = log.isEnabledFor(logging.DEBUG)
    console = RunConsole(
        run_root / "logs" / f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}.log",
        terminal=sys.stderr,
        echo=sys.stdout,
        verbose=verbose,
        decision_flags=_decision_flags(config, run_root),
    )
    root_logger = logging.getLogger()
    root_logger.addFilter(console)
    started = time.time()
    try:
        with contextlib.redirect_stdout(console), warnings.catch_warnings():
            if not verbose:
                warnings.showwarning = console.log_warning
            if monitor_source is None:
                retrain_pipeline(**arguments)
            else:
                monitor_pipeline(current_source=monitor_source, **arguments)
    except RuntimeError as exc:
        raise PipelineRunError(console.failure(exc, pipeline_root)) from None
    except Exception as exc:
        if runner == "docker" and type(exc).__module__.startswith("docker."):
            raise ContainerEngineError(
                f"--runner docker: the engine refused a task's container: {_engine_message(exc)}"
            ) from None
        raise
    finally:
        root_logger.removeFilter(console)
        console.close()
    run = RunFolder(_newest_run_dir(pipeline_root, name, started))
    if monitor_source is not None:
        trigger_reason = (run.trigger() or {}).get("reason")
    version = run.deployed_version()
    note = None
    if version == 0:
        from tumorflow.core.serving_layout import serving_labels

        labels, _ = serving_labels(arguments["model_base_path"], config.deploy.model_name)
        note = f"nothing new: the model is identical to served version {labels.get('stable')}"
        version = None
    return RunSummary(
        run_name=run.name,
        run_dir=run.path,
        task_seconds=console.seconds,
        gate=run.gate_decision(),
        approval=run.approval(),
        deployed_version=version,
        model_base_path=arguments["model_base_path"],
        tracking_uri=arguments["tracking_uri"],
        trigger_reason=trigger_reason,
        dataset_version=run.dataset_version(),
        deploy_note=note,
        log_path=console.log_path,
    )


def _docker_runner(image: str, run_root: Path, arguments: dict[str, Any]) -> tuple[str, Any]:
    """kfp.local's DockerRunner for a run of `image`, after checking that a Docker API answers
    (DOCKER_HOST, else the default socket) and holds the image or can pull it.

    Each task's container sees the host folders the run's parameters name at the same paths
    (the run root: pipeline root, registry, served models, checkpoints; a local dataset source),
    shares the host's network (a tracking server on loopback) and runs as the invoking user, so
    that what it writes is the user's own, as with the subprocess runner. Returns the image's name
    as the engine lists it, and the runner."""
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError:
        raise ContainerEngineError(
            "--runner docker needs the docker Python package (pip install docker)"
        ) from None
    from kfp import local

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        raise ContainerEngineError(
            f"--runner docker: no Docker API answers at {host} ({_first_line(exc)}); start "
            "docker, or podman's API (`podman system service --time=0 unix:///tmp/podman.sock`, "
            "or infra/podman-docker-api.sh) and set DOCKER_HOST=unix:///tmp/podman.sock"
        ) from None
    try:
        try:
            found = client.images.get(image)
        except ImageNotFound:
            found = client.images.pull(image)
    except DockerException as exc:
        client.close()
        raise ContainerEngineError(
            f"--runner docker: image {image} is not in the engine at {host} and cannot be "
            f"pulled ({_first_line(exc)}); build it with `make image IMAGE={image}`"
        ) from None
    # kfp.local looks the image up by one of its tags: the name as the engine spells it.
    name = next((t for t in found.tags if t == image or t.endswith(f"/{image}")), image)
    try:
        # An engine that answers may still be unable to start containers (an OCI runtime that
        # refuses the host's cgroups, say): find out now, in one line, before any task starts.
        client.containers.run(name, ["python", "-c", "pass"], remove=True, network_mode="host")
    except DockerException as exc:
        raise ContainerEngineError(
            f"--runner docker: the engine at {host} cannot start a container of {image}: "
            f"{_engine_message(exc)}"
        ) from None
    finally:
        client.close()
    mounts = [
        docker.types.Mount(target=str(folder), source=str(folder), type="bind")
        for folder in _host_folders(run_root, arguments)
    ]
    return name, local.DockerRunner(
        mounts=mounts,
        network_mode="host",
        user=f"{os.getuid()}:{os.getgid()}",
        environment={"HOME": "/tmp"},
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _engine_message(exc: BaseException) -> str:
    """The container engine's own words for a refused request (its JSON `message`), one line."""
    explanation = getattr(exc, "explanation", None)
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return _first_line(Exception(explanation)) if explanation else _first_line(exc)


def _host_folders(run_root: Path, arguments: dict[str, Any]) -> list[Path]:
    """The run root, and the folders outside it that the run's parameters name: the served models,
    the checkpoints, a SQLite registry's folder, a local dataset source. None inside another."""
    from tumorflow.core import storage

    folders = [run_root]
    for key in ("model_base_path", "checkpoint_root"):
        if not storage.is_remote(arguments[key]):
            folders.append(Path(arguments[key]).resolve())
            folders[-1].mkdir(parents=True, exist_ok=True)
    if arguments["tracking_uri"].startswith("sqlite:///"):
        folders.append(Path(arguments["tracking_uri"].removeprefix("sqlite:///")).resolve().parent)
    source = arguments["dataset"].get("source", "")
    if source and source != "phantom" and ":" not in source and Path(source).exists():
        path = Path(source).expanduser().resolve()
        folders.append(path if path.is_dir() else path.parent)
    kept: list[Path] = []
    for folder in sorted(set(folders), key=lambda p: len(p.parts)):
        if not any(folder.is_relative_to(parent) for parent in kept):
            kept.append(folder)
    return kept


def _keep_mlflow_artifacts_in(config: PipelineConfig, run_root: Path) -> None:
    """With the local tracking store, create the experiment with its artifacts under
    `<run_root>/mlartifacts`: MLflow's default is `./mlruns` of whatever the current folder is.
    A tracking server decides itself where artifacts go."""
    tracking_uri = config.resolved_tracking_uri()
    if tracking_uri.startswith(("http://", "https://")):
        return
    from tumorflow.components.release.registry import connect

    client = connect(tracking_uri)
    if client.get_experiment_by_name(config.tracking.experiment) is None:
        client.create_experiment(
            config.tracking.experiment, artifact_location=(run_root / "mlartifacts").as_uri()
        )


def _decision_flags(config: PipelineConfig, run_root: Path) -> str:
    """The flags `tumorflow approve|reject` need to find this run's registry."""
    if config.tracking.tracking_uri:
        return f" --tracking-uri {config.tracking.tracking_uri}"
    return f" --run-root {run_root}"


def compile_pipeline(
    output: Path,
    *,
    config: PipelineConfig | None = None,
    pipeline: str = "retrain",
    no_registry: bool = False,
) -> Path:
    """Write the spec YAML that Kubeflow Pipelines and Vertex AI Pipelines run: the retraining
    pipeline, or the monitoring pipeline (drift check, then retraining when drifted).

    The config's values (default: the defaults) become the parameters' defaults shown in the
    pipeline UI, its `runtime.image` every step's image and its `runtime.target` how a
    multi-worker training runs (Vertex AI custom job or Kubeflow TFJob). A config without a
    tracking URI is refused unless `no_registry` (the gate would have no champion to compare
    with).
    """
    from kfp import compiler

    from tumorflow.pipelines.pipeline import (
        monitor_pipeline_for,
        pipeline_parameters,
        retrain_pipeline_for,
    )

    config = config or PipelineConfig()
    pipelines = {"retrain": retrain_pipeline_for, "monitor": monitor_pipeline_for}
    if pipeline not in pipelines:
        raise PipelineRunError(f"unknown pipeline {pipeline!r}: choose {' or '.join(pipelines)}")
    defaults = pipeline_parameters(config, local=False, no_registry=no_registry)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The steps are traced in the config's image and training layout (pipelines/pipeline.py).
    compiler.Compiler().compile(
        pipelines[pipeline](config.runtime), package_path=str(output), pipeline_parameters=defaults
    )
    return output


def submit(
    config: PipelineConfig,
    host: str,
    *,
    trigger_reason: str | None = None,
    pipeline: str = "retrain",
    monitor_source: str | None = None,
    no_registry: bool = False,
) -> str:
    """Submit one run of the compiled pipeline to a Kubeflow Pipelines endpoint; return its id."""
    import tempfile

    from tumorflow.pipelines.kubeflow_client import kubeflow_api
    from tumorflow.pipelines.pipeline import pipeline_parameters

    # A Kubeflow Pipelines endpoint runs a multi-worker training as a TFJob.
    config = config.model_copy(
        update={"runtime": config.runtime.model_copy(update={"target": "kubeflow"})}
    )
    arguments = pipeline_parameters(config, local=False, no_registry=no_registry)
    if trigger_reason:
        arguments["trigger_reason"] = trigger_reason
    if pipeline == "monitor":
        arguments["current_source"] = monitor_source
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(
            Path(tmp) / "pipeline.yaml", config=config, pipeline=pipeline, no_registry=no_registry
        )
        with kubeflow_api(host, PipelineRunError) as client:
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=f"{pipeline}-{datetime.now(UTC):%Y%m%d-%H%M%S}",
                experiment_name=config.tracking.experiment,
            )
    return run.run_id
