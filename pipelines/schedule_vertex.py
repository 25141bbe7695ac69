"""Vertex AI pipeline schedules over the REST API (`projects.locations.schedules`), with
`maxConcurrentRunCount: 1, allowQueueing: false` (pipelines/schedule.py has what the targets
share)."""

from __future__ import annotations

import re
from typing import Any

from tumorflow.core.errors import ConfigError
from tumorflow.pipelines.schedule import (
    PipelineTemplate,
    Schedule,
    ScheduleError,
    _check_name,
    _one_line,
    _pick,
    vertex_cron,
)

VERTEX_ENDPOINT = "https://{region}-aiplatform.googleapis.com/v1"
_HTTP_TIMEOUT_S = 30


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
