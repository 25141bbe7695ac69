"""Recurring runs on a Kubeflow Pipelines endpoint: `create_recurring_run` with
`max_concurrency=1, no_catchup=True` (pipelines/schedule.py has what the targets share)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tumorflow import __version__
from tumorflow.pipelines.kubeflow_client import kubeflow_api
from tumorflow.pipelines.schedule import (
    PipelineTemplate,
    Schedule,
    ScheduleError,
    _check_name,
    _pick,
    kubeflow_cron,
)


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
        """The client (made once), with the API's failures as one-line ScheduleErrors."""
        with kubeflow_api(self.host, ScheduleError, self._client) as client:
            self._client = client
            yield client

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
