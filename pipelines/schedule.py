"""Recurring runs of the retraining or monitoring pipeline on Kubeflow Pipelines and Vertex AI.

A schedule points at an immutable template: the compiled spec, named after the tumorflow version
and a hash of its content. Both targets get at most one run at a time and no catch-up storm after
downtime: Kubeflow's `max_concurrency=1, no_catchup=True`, Vertex's `maxConcurrentRunCount: 1,
allowQueueing: false` (a run due while one is running is skipped, not queued).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tumorflow import __version__
from tumorflow.core.config import PipelineConfig
from tumorflow.core.errors import ConfigError, TumorflowError

PIPELINES = ("retrain", "monitor")
VERTEX_ENDPOINT = "https://{region}-aiplatform.googleapis.com/v1"
_HTTP_TIMEOUT_S = 30

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


def _kfp_message(body: Any) -> str:
    """The message of a KFP API error body (JSON with `error_message` or `message`)."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        payload = json.loads(text)
    except ValueError:
        return _one_line(text)
    if isinstance(payload, dict):
        return _one_line(payload.get("error_message") or payload.get("message") or text)
    return _one_line(text)


def _kfp_schedule(run: Any, template: str) -> Schedule:
    trigger = run.trigger
    return Schedule(
        id=run.recurring_run_id,
        name=run.display_name,
        cron=trigger.cron_schedule.cron if trigger and trigger.cron_schedule else "",
        status=str(run.status or run.mode or ""),
        template=template,
    )


class KubeflowScheduler:
    """Recurring runs of one experiment on a Kubeflow Pipelines endpoint, through `kfp.Client`."""

    read_cron = staticmethod(kubeflow_cron)

    def __init__(self, host: str, experiment: str) -> None:
        self.host = host
        self.experiment = experiment
        self._client = None

    @contextlib.contextmanager
    def _api(self) -> Iterator[Any]:
        """The client, with the API's failures as one-line ScheduleErrors."""
        import kfp
        import kfp_server_api
        import urllib3

        try:
            if self._client is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    self._client = kfp.Client(host=self.host)
            yield self._client
        except kfp_server_api.ApiException as exc:
            raise ScheduleError(
                f"Kubeflow Pipelines at {self.host} answered {exc.status} {exc.reason}: "
                f"{_kfp_message(exc.body)}"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ScheduleError(
                f"cannot reach Kubeflow Pipelines at {self.host}: {_one_line(reason)}"
            ) from None
        except ValueError as exc:  # kfp's own refusals, e.g. two pipelines of one name
            raise ScheduleError(f"Kubeflow Pipelines at {self.host}: {exc}") from None

    def _experiment_id(self, *, create: bool) -> str | None:
        with self._api() as client:
            if create:
                return client.create_experiment(self.experiment).experiment_id
            try:
                return client.get_experiment(experiment_name=self.experiment).experiment_id
            except ValueError:
                return None

    def upload(self, template: PipelineTemplate) -> tuple[str, str]:
        """The (pipeline id, version id) of `template`, uploading what the server lacks."""
        version_filter = json.dumps(
            {
                "predicates": [
                    {"operation": "EQUALS", "key": "display_name", "stringValue": template.version}
                ]
            }
        )
        with tempfile.TemporaryDirectory() as tmp, self._api() as client:
            package = Path(tmp) / f"{template.name}.yaml"
            package.write_text(template.spec_yaml)
            pipeline_id = client.get_pipeline_id(template.name)
            if pipeline_id is None:
                pipeline_id = client.upload_pipeline(
                    str(package), pipeline_name=template.name
                ).pipeline_id
            existing = client.list_pipeline_versions(pipeline_id, filter=version_filter)
            for version in existing.pipeline_versions or []:
                if version.display_name == template.version:
                    return pipeline_id, version.pipeline_version_id
            version = client.upload_pipeline_version(
                str(package),
                template.version,
                pipeline_id=pipeline_id,
                description=f"tumorflow {__version__}, {template.pipeline} pipeline",
            )
            return pipeline_id, version.pipeline_version_id

    def create(
        self,
        template: PipelineTemplate,
        name: str,
        cron: str,
        *,
        pipeline_root: str | None = None,
    ) -> Schedule:
        """A recurring run of `template` on `cron` (6 fields): one run at a time, no catch-up."""
        name = _check_name(name)
        cron_expression = kubeflow_cron(cron).expression
        if any(s.name == name for s in self.list()):
            raise ScheduleError(
                f"a schedule named {name!r} exists in experiment {self.experiment!r}: delete it "
                "first (tumorflow schedule delete) or choose another --name"
            )
        pipeline_id, version_id = self.upload(template)
        experiment_id = self._experiment_id(create=True)
        with self._api() as client:
            run = client.create_recurring_run(
                experiment_id,
                name,
                description=f"{template.pipeline} pipeline, template {template.version}",
                cron_expression=cron_expression,
                max_concurrency=1,
                no_catchup=True,
                params=template.arguments,
                pipeline_id=pipeline_id,
                version_id=version_id,
                pipeline_root=pipeline_root,
            )
        return _kfp_schedule(run, template.version)

    def list(self) -> list[Schedule]:
        """The recurring runs of the experiment (none when the experiment does not exist)."""
        experiment_id = self._experiment_id(create=False)
        if experiment_id is None:
            return []
        schedules, token, versions = [], "", {}
        with self._api() as client:
            while True:
                page = client.list_recurring_runs(
                    experiment_id=experiment_id, page_size=100, page_token=token
                )
                for run in page.recurring_runs or []:
                    reference = run.pipeline_version_reference
                    version_id = reference.pipeline_version_id if reference else None
                    if version_id and version_id not in versions:
                        versions[version_id] = client.get_pipeline_version(
                            reference.pipeline_id, version_id
                        ).display_name
                    schedules.append(
                        _kfp_schedule(run, versions.get(version_id, version_id or "inline spec"))
                    )
                token = page.next_page_token
                if not token:
                    return schedules

    def delete(self, key: str) -> Schedule:
        """Delete the recurring run named or with id `key`."""
        schedule = _pick(self.list(), key, f"experiment {self.experiment!r} at {self.host}")
        with self._api() as client:
            client.delete_recurring_run(schedule.id)
        return schedule


def _vertex_credentials():
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
    except DefaultCredentialsError:
        raise ScheduleError(
            "no Google Cloud credentials found: run `gcloud auth application-default login` or "
            "set GOOGLE_APPLICATION_CREDENTIALS to a service account key"
        ) from None
    return credentials


def _label(value: str) -> str:
    """A Vertex label value: lower-case letters, digits, - and _, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


class VertexScheduler:
    """Vertex AI pipeline schedules of one project and region, over the REST API
    (`projects.locations.schedules`)."""

    read_cron = staticmethod(vertex_cron)

    def __init__(
        self,
        project: str,
        region: str,
        *,
        endpoint: str | None = None,
        credentials: Any = None,
    ) -> None:
        self.project = project
        self.region = region
        self.endpoint = (endpoint or VERTEX_ENDPOINT.format(region=region)).rstrip("/")
        self.parent = f"projects/{project}/locations/{region}"
        self._credentials = credentials
        self._session = None

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import requests
        from google.auth.exceptions import GoogleAuthError
        from google.auth.transport.requests import AuthorizedSession

        if self._session is None:
            self._session = AuthorizedSession(self._credentials or _vertex_credentials())
        url = f"{self.endpoint}/{path}"
        try:
            response = self._session.request(method, url, timeout=_HTTP_TIMEOUT_S, **kwargs)
        except GoogleAuthError as exc:
            raise ScheduleError(
                f"Google Cloud credentials were refused: {_one_line(exc)}"
            ) from None
        except requests.RequestException as exc:
            raise ScheduleError(
                f"cannot reach Vertex AI at {self.endpoint}: {_one_line(exc)}"
            ) from None
        try:
            payload = response.json() if response.content else {}
        except ValueError:
            payload = {}
        if response.status_code >= 400:
            message = (payload.get("error") or {}).get("message") or response.reason
            raise ScheduleError(
                f"Vertex AI answered {response.status_code} to {method} {path}: "
                f"{_one_line(message)}"
            )
        return payload

    def create(
        self,
        template: PipelineTemplate,
        name: str,
        cron: str,
        *,
        pipeline_root: str,
    ) -> Schedule:
        """A schedule of `template` on `cron` (5 fields, `TZ=` allowed): at most one run at a time,
        a run due meanwhile skipped (not queued), no backfill. Vertex only backfills when a
        paused schedule is resumed with catch-up asked for."""
        name = _check_name(name)
        cron_expression = vertex_cron(cron).expression
        if not pipeline_root.startswith("gs://"):
            raise ConfigError(
                f"--pipeline-root {pipeline_root!r}: Vertex AI writes run outputs to Cloud "
                "Storage; give a gs://BUCKET/PREFIX"
            )
        if any(s.name == name for s in self.list()):
            raise ScheduleError(
                f"a schedule named {name!r} exists in {self.parent}: delete it first "
                "(tumorflow schedule delete) or choose another --name"
            )
        body = {
            "displayName": name,
            "cron": cron_expression,
            "maxConcurrentRunCount": "1",
            "allowQueueing": False,
            "catchUp": False,
            "createPipelineJobRequest": {
                "parent": self.parent,
                "pipelineJob": {
                    "displayName": f"{template.name}-{name}",
                    "pipelineSpec": template.spec,
                    "labels": {
                        "tumorflow-pipeline": template.pipeline,
                        "tumorflow-template": _label(template.version),
                    },
                    "runtimeConfig": {
                        "gcsOutputDirectory": pipeline_root,
                        "parameterValues": template.arguments,
                    },
                },
            },
        }
        created = self._call("POST", f"{self.parent}/schedules", json=body)
        return self._schedule(created)

    @staticmethod
    def _schedule(resource: dict[str, Any]) -> Schedule:
        job = (resource.get("createPipelineJobRequest") or {}).get("pipelineJob") or {}
        return Schedule(
            id=resource.get("name", "").rsplit("/", 1)[-1],
            name=resource.get("displayName", ""),
            cron=resource.get("cron", ""),
            status=resource.get("state", ""),
            template=(job.get("labels") or {}).get("tumorflow-template", "-"),
        )

    def list(self) -> list[Schedule]:
        """The schedules of the project and region."""
        schedules, token = [], ""
        while True:
            params = {"pageSize": 100, **({"pageToken": token} if token else {})}
            page = self._call("GET", f"{self.parent}/schedules", params=params)
            schedules += [self._schedule(s) for s in page.get("schedules", [])]
            token = page.get("nextPageToken")
            if not token:
                return schedules

    def delete(self, key: str) -> Schedule:
        """Delete the schedule named or with id `key`."""
        schedule = _pick(self.list(), key, self.parent)
        self._call("DELETE", f"{self.parent}/schedules/{schedule.id}")
        return schedule
