"""Thin runners of the one pipeline: locally with kfp.local, compiled for Kubeflow / Vertex AI, or
submitted to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tumorflow.core.config import PipelineConfig
from tumorflow.core.errors import TumorflowError

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PipelineRunError(TumorflowError):
    """A task of the pipeline failed; its own log (printed above) says why."""


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
        }


class _TaskTimer(logging.Filter):
    """Reads kfp.local's own task log lines to time each task (kfp.local reports no durations)."""

    _start = re.compile(r"Executing task '?([\w-]+)'?")
    _end = re.compile(r"Task '?([\w-]+)'? finished with status")
    _cached = re.compile(r"Task '?([\w-]+)'? cache hit")

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float | str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", str(record.getMessage()))
        if match := self._start.search(message):
            self.started[match.group(1)] = record.created
        elif match := self._end.search(message):
            task = match.group(1)
            if task in self.started:
                self.seconds[task] = round(record.created - self.started[task], 1)
        elif match := self._cached.search(message):
            self.seconds[match.group(1)] = "cached"
        return True


def _newest_run_dir(pipeline_root: Path, pipeline_name: str, not_before: float) -> Path:
    candidates = [
        p
        for p in pipeline_root.glob(f"{pipeline_name}-*")
        if p.is_dir() and p.stat().st_mtime >= not_before - 1
    ]
    if not candidates:
        raise PipelineRunError(f"the run left no folder under {pipeline_root}")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def artifact_path(run_dir: Path, task: str, output: str) -> Path | None:
    """Where a run's task wrote `output`; for a task the cache skipped, the newest earlier run's."""
    own = run_dir / task / output
    if own.exists():
        return own
    earlier = sorted((p for p in run_dir.parent.iterdir() if p.name < run_dir.name), reverse=True)
    return next((p / task / output for p in earlier if (p / task / output).exists()), None)


def _task_parameter(run_dir: Path, task: str, name: str) -> Any:
    """An output parameter of a finished task, from kfp.local's executor_output.json."""
    for output in run_dir.glob(f"{task}*/executor_output.json"):
        values = json.loads(output.read_text()).get("parameterValues", {})
        if name in values:
            return values[name]
    return None


def run_local(
    config: PipelineConfig,
    *,
    trigger_reason: str | None = None,
    enable_caching: bool = True,
    monitor_source: str | None = None,
) -> RunSummary:
    """Run the whole DAG on this machine with kfp.local (subprocesses, no cluster, no Docker).

    With `monitor_source` (served requests, a table or a folder of recent images) it runs the
    monitoring pipeline instead: the drift check, and the retraining DAG only when it drifted.
    """
    from kfp import local

    from tumorflow.pipelines.pipeline import (
        MONITOR_PIPELINE_NAME,
        PIPELINE_NAME,
        monitor_pipeline,
        pipeline_parameters,
        retrain_pipeline,
    )

    run_root = Path(config.run_root).resolve()
    pipeline_root = run_root / "pipeline_root"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        enable_caching=enable_caching,
    )
    arguments = pipeline_parameters(config, local=True)
    if trigger_reason:
        arguments["trigger_reason"] = trigger_reason
    timer = _TaskTimer()
    root_logger = logging.getLogger()
    root_logger.addFilter(timer)
    started = time.time()
    try:
        if monitor_source is None:
            retrain_pipeline(**arguments)
        else:
            monitor_pipeline(current_source=monitor_source, **arguments)
    except RuntimeError as exc:
        raise PipelineRunError(
            f"{_ANSI.sub('', str(exc))} The failing task's log above says why; outputs so far are "
            f"under {pipeline_root}."
        ) from None
    finally:
        root_logger.removeFilter(timer)
    name = PIPELINE_NAME if monitor_source is None else MONITOR_PIPELINE_NAME
    run_dir = _newest_run_dir(pipeline_root, name, started)
    if monitor_source is not None:
        trigger = _read_json(run_dir / "drift-check" / "verdict" / "trigger.json") or {}
        trigger_reason = trigger.get("reason")
    version = _task_parameter(run_dir, "deploy", "Output")
    note = None
    if version is not None and int(version) == 0:
        from tumorflow.core.serving_layout import serving_labels

        labels, _ = serving_labels(arguments["model_base_path"], config.deploy.model_name)
        note = f"nothing new: the model is identical to served version {labels.get('stable')}"
        version = None
    fingerprint = _task_parameter(run_dir, "dataset-version", "fingerprint")
    return RunSummary(
        run_name=run_dir.name,
        run_dir=run_dir,
        task_seconds=timer.seconds,
        gate=_read_json(run_dir / "gate" / "decision" / "decision.json"),
        approval=_read_json(run_dir / "approval" / "record" / "approval.json"),
        deployed_version=int(version) if version is not None else None,
        model_base_path=arguments["model_base_path"],
        tracking_uri=arguments["tracking_uri"],
        trigger_reason=trigger_reason,
        dataset_version=fingerprint,
        deploy_note=note,
    )


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
    pipeline UI, and its `runtime.image` every step's image. A config without a tracking URI is
    refused unless `no_registry` (the gate would have no champion to compare with).
    """
    import yaml
    from kfp import compiler

    from tumorflow.pipelines import steps
    from tumorflow.pipelines.pipeline import monitor_pipeline, pipeline_parameters, retrain_pipeline

    pipelines = {"retrain": retrain_pipeline, "monitor": monitor_pipeline}
    if pipeline not in pipelines:
        raise PipelineRunError(f"unknown pipeline {pipeline!r}: choose {' or '.join(pipelines)}")
    config = config or PipelineConfig()
    defaults = pipeline_parameters(config, local=False, no_registry=no_registry)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        pipelines[pipeline], package_path=str(output), pipeline_parameters=defaults
    )
    image = config.runtime.image
    if image != steps.PROJECT_IMAGE:
        # The steps are declared once with the config's default image; a configured one
        # replaces it in the compiled executors.
        spec = yaml.safe_load(output.read_text())
        for executor in spec["deploymentSpec"]["executors"].values():
            container = executor.get("container", {})
            if container.get("image") == steps.PROJECT_IMAGE:
                container["image"] = image
        output.write_text(yaml.safe_dump(spec, sort_keys=False))
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

    import kfp

    from tumorflow.pipelines.pipeline import pipeline_parameters

    arguments = pipeline_parameters(config, local=False, no_registry=no_registry)
    if trigger_reason:
        arguments["trigger_reason"] = trigger_reason
    if pipeline == "monitor":
        arguments["current_source"] = monitor_source
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(
            Path(tmp) / "pipeline.yaml", config=config, pipeline=pipeline, no_registry=no_registry
        )
        try:
            client = kfp.Client(host=host)
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=f"{pipeline}-{datetime.now(UTC):%Y%m%d-%H%M%S}",
                experiment_name=config.tracking.experiment,
            )
        except Exception as exc:
            raise PipelineRunError(
                f"could not submit to Kubeflow Pipelines at {host}: {str(exc).splitlines()[0]}"
            ) from None
    return run.run_id
