"""Thin runners of the one pipeline: locally with kfp.local, compiled for Kubeflow / Vertex AI, or
submitted to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import contextlib
import getpass
import io
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from tumorflow.components.progress import progress_text
from tumorflow.core.config import PipelineConfig
from tumorflow.core.errors import TumorflowError
from tumorflow.pipelines import run_folder
from tumorflow.pipelines.run_folder import RunFolder

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '?([\w-]+)'?")
_TASK_END = re.compile(r"Task '?([\w-]+)'? finished with status (\w+)")
_TASK_CACHED = re.compile(r"Task '?([\w-]+)'? cache hit")
_INNER_FAILURE = re.compile(r"Inner task failed: '?([\w-]+)'?")
_APPROVAL_WAIT = re.compile(r"`tumorflow approve (\S+)`")
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
_TASK_COLUMN = 22


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


class _RunConsole(io.TextIOBase):
    """What a local run shows, and the run log that keeps everything else.

    Installed as a filter on the root logger (kfp.local logs there) and as `sys.stdout` (kfp.local
    prints its tasks' streamed output there). Everything goes to the run log; the terminal gets
    one line per task as it finishes, the training's epoch lines (`components.progress`) and the
    approval prompt. With `verbose`, kfp.local's own output also reaches the terminal as before.
    """

    def __init__(
        self, log_path: Path, terminal: TextIO, echo: TextIO, verbose: bool, decision_flags: str
    ) -> None:
        super().__init__()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("a", encoding="utf-8")
        self._terminal = terminal
        self._echo = echo
        self._verbose = verbose
        self._decision_flags = decision_flags
        self._lock = threading.Lock()
        self._local = threading.local()  # kfp.local runs independent tasks in threads
        self._tty = terminal.isatty()
        self._open_line = False
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float | str] = {}
        self._tails: dict[str, deque[str]] = {}

    # -- kfp.local's log records ------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", str(record.getMessage()))
        if match := _TASK_START.search(message):
            self.started[match.group(1)] = record.created
            self._local.task = match.group(1)
        elif match := _TASK_END.search(message):
            task, status = match.groups()
            if task in self.started:
                self.seconds[task] = round(record.created - self.started[task], 1)
            if status == "SUCCESS" and task in self.seconds:
                self._show(f"{task:<{_TASK_COLUMN}}{self.seconds[task]:>7.1f} s")
        elif match := _TASK_CACHED.search(message):
            self.seconds[match.group(1)] = "cached"
            self._show(f"{match.group(1):<{_TASK_COLUMN}}{'cached':>9}")
        if self._verbose:
            return True
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        self._write_log(f"{stamp} {record.levelname} {message}")
        return False

    def log_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """`warnings.showwarning` during a quiet run: to the run log."""
        self._write_log(f"{category.__name__}: {message} ({filename}:{lineno})")

    # -- the tasks' streamed output (sys.stdout) ---------------------------------------------
    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        pending = getattr(self._local, "pending", "") + text
        *lines, self._local.pending = pending.split("\n")
        for line in lines:
            self._task_line(_ANSI.sub("", line).rstrip())
        if self._verbose:
            self._echo.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._log.flush()
        if self._verbose:
            self._echo.flush()

    def _task_line(self, line: str) -> None:
        self._write_log(line)
        task = getattr(self._local, "task", None) or ""
        if task and line.strip():
            self._tails.setdefault(task, deque(maxlen=50)).append(line.strip())
        if (text := progress_text(line)) is not None and not self._verbose:
            self._show(f"{task:<{_TASK_COLUMN}}{text}", transient=True)
        elif match := _APPROVAL_WAIT.search(line):
            run, flags = match.group(1), self._decision_flags
            self._show(
                f"{task:<{_TASK_COLUMN}}waiting for: tumorflow approve {run}{flags}   "
                f"(or: tumorflow reject {run}{flags} --reason ...)"
            )

    def _write_log(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")

    def _show(self, text: str, transient: bool = False) -> None:
        """A line on the terminal; on a TTY an epoch line is rewritten in place by the next."""
        with self._lock:
            if self._open_line:
                self._terminal.write("\r\x1b[K")
            if transient and self._tty:
                width = shutil.get_terminal_size().columns - 1
                self._terminal.write(text[:width])
                self._open_line = True
            else:
                self._terminal.write(text + "\n")
                self._open_line = False
            self._terminal.flush()

    # -- failure and end ---------------------------------------------------------------------
    def failure(self, error: RuntimeError, pipeline_root: Path) -> PipelineRunError:
        """One line: the failing task, the exception its output ended with, where the log is."""
        message = _ANSI.sub("", str(error))
        match = _INNER_FAILURE.search(message) or _TASK_END.search(message)
        unfinished = [task for task in self.started if task not in self.seconds]
        task = match.group(1) if match else (unfinished[-1] if unfinished else None)
        if task is None:
            return PipelineRunError(f"{message} (run log: {self.log_path})")
        self._show(f"{task:<{_TASK_COLUMN}}{'FAILED':>9}")
        cause = next(
            (
                f": {found.group(1)}: {found.group(2)}"
                for line in reversed(self._tails.get(task, ()))
                if (found := _EXCEPTION_LINE.match(line))
            ),
            "",
        )
        where = "its output is above" if self._verbose else f"its output is in {self.log_path}"
        return PipelineRunError(
            f"task {task} failed{cause} ({where}; outputs so far under {pipeline_root})"
        )

    def close(self) -> None:
        if self._open_line:
            self._show("")
        super().close()  # flushes
        with self._lock:
            self._log.close()


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
    console = _RunConsole(
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
        raise console.failure(exc, pipeline_root) from None
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
