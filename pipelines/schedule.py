"""Recurring runs of the retraining or monitoring pipeline: what both targets share (the cron
forms each reads, the versioned template, a schedule's record). The targets themselves:
pipelines/schedule_kubeflow.py (Kubeflow Pipelines) and pipelines/schedule_vertex.py (Vertex AI).

A schedule points at an immutable template: the compiled spec, named after the tumorflow version
and a hash of its content. Both targets get at most one run at a time and no catch-up storm after
downtime: Kubeflow's `max_concurrency=1, no_catchup=True`, Vertex's `maxConcurrentRunCount: 1,
allowQueueing: false` (a run due while one is running is skipped, not queued).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tumorflow import __version__
from tumorflow.core.config import PipelineConfig
from tumorflow.core.errors import ConfigError, TumorflowError

PIPELINES = ("retrain", "monitor")

# Each field of a cron expression, seconds first: (name, lowest, highest).
_CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_TIME_ZONE = re.compile(r"^((?:CRON_)?TZ=\S+)\s+(.*)$")
_NAME = re.compile(r"^[A-Za-z]{3}$")


class ScheduleError(TumorflowError):
    """A schedule cannot be created, found or deleted (unreachable API, refused request)."""


@dataclass(frozen=True)
class Cron:
    """A cron expression in the form one target reads, and what was changed to get it."""

    expression: str
    note: str | None = None


def _check_cron_fields(fields: list[str], bounds: tuple, original: str) -> None:
    for value, (name, low, high) in zip(fields, bounds, strict=True):
        for part in value.split(","):
            base, slash, step = part.partition("/")
            if slash and not step.isdigit():
                raise ConfigError(f"cron {original!r}: the {name} step {step!r} is not a number")
            if base in ("*", "?"):
                continue
            for end in base.split("-"):
                if end.isdigit():
                    if not low <= int(end) <= high:
                        raise ConfigError(
                            f"cron {original!r}: {name} {end} is outside {low}-{high}"
                        )
                elif not (name in ("month", "day of week") and _NAME.match(end)):
                    raise ConfigError(f"cron {original!r}: {name} {part!r} is not understood")


def kubeflow_cron(expression: str) -> Cron:
    """Kubeflow Pipelines reads 6 fields, seconds first, in the controller's time zone; a 5-field
    cron gets "0 " prepended (on the minute)."""
    text = " ".join(expression.split())
    if _TIME_ZONE.match(text):
        raise ConfigError(
            f"cron {expression!r}: Kubeflow Pipelines takes no time zone prefix (it runs in the "
            "controller's time zone, usually UTC): write the times in that zone"
        )
    fields = text.split(" ")
    note = None
    if len(fields) == 5:
        fields = ["0", *fields]
        note = f"5-field cron {text!r} read as {' '.join(fields)!r} (Kubeflow's seconds first)"
    if len(fields) != 6:
        raise ConfigError(
            f"cron {expression!r} has {len(fields)} fields: Kubeflow Pipelines takes 6, seconds "
            "first (e.g. '0 0 3 * * 1', Mondays at 03:00)"
        )
    _check_cron_fields(fields, _CRON_FIELDS, expression)
    return Cron(" ".join(fields), note)


def vertex_cron(expression: str) -> Cron:
    """Vertex AI reads 5 fields (unix cron, minute first), optionally after `TZ=Area/City`; a
    6-field cron whose seconds field is 0 loses it."""
    text = " ".join(expression.split())
    zone, body = "", text
    if match := _TIME_ZONE.match(text):
        zone, body = match.group(1) + " ", match.group(2)
    fields = body.split(" ")
    note = None
    if len(fields) == 6 and fields[0] == "0":
        fields = fields[1:]
        note = f"6-field cron {text!r} read as {zone + ' '.join(fields)!r} (Vertex's 5 fields)"
    elif len(fields) == 6:
        raise ConfigError(
            f"cron {expression!r}: Vertex AI schedules run on the minute, so a 6-field cron needs "
            "0 seconds; write 5 fields (e.g. 'TZ=Europe/Berlin 0 3 * * 1')"
        )
    if len(fields) != 5:
        raise ConfigError(
            f"cron {expression!r} has {len(fields)} fields: Vertex AI takes 5, minute first "
            "(e.g. '0 3 * * 1', Mondays at 03:00), optionally after TZ=Area/City"
        )
    _check_cron_fields(fields, _CRON_FIELDS[1:], expression)
    return Cron(zone + " ".join(fields), note)


@dataclass(frozen=True)
class PipelineTemplate:
    """One compiled pipeline spec, versioned by content, and the arguments a scheduled run gets."""

    pipeline: str
    name: str
    version: str
    spec_yaml: str
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> dict[str, Any]:
        return yaml.safe_load(self.spec_yaml)


def schedule_arguments(
    config: PipelineConfig,
    pipeline: str = "retrain",
    *,
    no_registry: bool = False,
    current_source: str | None = None,
) -> dict[str, Any]:
    """The pipeline parameters of every scheduled run; refuses a cluster run with no registry
    (it would gate against no champion) unless `no_registry`."""
    from tumorflow.pipelines.pipeline import pipeline_parameters

    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}: choose {' or '.join(PIPELINES)}")
    arguments = pipeline_parameters(config, local=False, no_registry=no_registry)
    if pipeline == "monitor":
        if not current_source:
            raise ConfigError(
                "the monitor pipeline checks the served requests for drift: give their store "
                "with --current (e.g. gs://BUCKET/requests)"
            )
        arguments["current_source"] = current_source
    elif current_source:
        raise ConfigError("--current is for the monitor pipeline only (--pipeline monitor)")
    return arguments


def _disable_caching(spec: dict[str, Any]) -> None:
    dags = [spec["root"]["dag"]] + [
        c["dag"] for c in spec.get("components", {}).values() if "dag" in c
    ]
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            task.setdefault("cachingOptions", {})["enableCache"] = False


def build_template(
    config: PipelineConfig,
    *,
    pipeline: str = "retrain",
    image: str | None = None,
    no_registry: bool = False,
    current_source: str | None = None,
    enable_caching: bool = True,
) -> PipelineTemplate:
    """Compile `pipeline` for a schedule. With `enable_caching` (default) the compiled per-step
    options hold: the dataset version, gate, approval, deploy and drift steps never cache, and
    the others are keyed on the dataset version (docs/caching.md), so a scheduled run over new
    data retrains and one over unchanged data reuses the last. Without it nothing is reused."""
    from tumorflow.pipelines.runner import compile_pipeline

    arguments = schedule_arguments(
        config, pipeline, no_registry=no_registry, current_source=current_source
    )
    with tempfile.TemporaryDirectory() as tmp:
        if image:
            config = config.model_copy(deep=True)
            config.runtime.image = image
        path = compile_pipeline(
            Path(tmp) / "pipeline.yaml", config=config, pipeline=pipeline, no_registry=no_registry
        )
        text = path.read_text()
    spec = yaml.safe_load(text)
    if not enable_caching:
        _disable_caching(spec)
        text = yaml.safe_dump(spec, sort_keys=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return PipelineTemplate(
        pipeline=pipeline,
        name=spec["pipelineInfo"]["name"],
        version=f"{__version__}-{digest}",
        spec_yaml=text,
        arguments=arguments,
    )


@dataclass(frozen=True)
class Schedule:
    """One schedule as a target reports it."""

    id: str
    name: str
    cron: str
    status: str
    template: str


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 128:
        raise ConfigError("a schedule name needs 1 to 128 characters (e.g. weekly-retrain)")
    return name


def _pick(schedules: list[Schedule], key: str, where: str) -> Schedule:
    """The one schedule whose id or name is `key`."""
    matches = [s for s in schedules if key in (s.id, s.name)]
    if not matches:
        raise ScheduleError(f"no schedule named or with id {key!r} in {where}")
    if len(matches) > 1:
        ids = ", ".join(s.id for s in matches)
        raise ScheduleError(f"{len(matches)} schedules are named {key!r} ({ids}): delete by id")
    return matches[0]


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())
