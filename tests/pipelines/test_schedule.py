"""Schedules, tested at their HTTP boundary: loopback servers answering the Kubeflow Pipelines
v2beta1 REST endpoints `kfp.Client` calls and Vertex AI's `projects.locations.schedules`, each
recording the requests it receives."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from google.auth.credentials import AnonymousCredentials

from tumorflow.cli.main import main
from tumorflow.core.config import load_config
from tumorflow.core.errors import ConfigError
from tumorflow.pipelines.schedule import ScheduleError, build_template, kubeflow_cron, vertex_cron
from tumorflow.pipelines.schedule_kubeflow import KubeflowScheduler
from tumorflow.pipelines.schedule_vertex import VertexScheduler

TRACKING = "http://mlflow.example:5000"
SETTINGS = [f"tracking.tracking_uri={TRACKING}", "deploy.model_base_path=gs://models/serving"]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any = None
    files: dict[str, bytes] = field(default_factory=dict)


class RecordingServer:
    """An HTTP server on a free loopback port that records each request and answers it with
    `answer(request) -> (status, json payload)`."""

    def __init__(self, answer: Callable[[Request], tuple[int, Any]]) -> None:
        self.requests: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Request(
                    self.command,
                    url.path,
                    {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
                )
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/form-data"):
                    message = BytesParser(policy=email_policy).parsebytes(
                        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
                    )
                    for part in message.iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        request.files[name] = part.get_payload(decode=True)
                elif raw:
                    request.body = json.loads(raw)
                server.requests.append(request)
                status, payload = answer(request)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _display_name_filter(request: Request) -> str | None:
    if "filter" not in request.query:
        return None
    predicates = json.loads(request.query["filter"])["predicates"]
    return next(p["stringValue"] for p in predicates if p["key"] == "display_name")


class FakeKubeflow:
    """The state behind the KFP v2beta1 endpoints kfp 2.17's Client calls for schedules."""

    API = "/apis/v2beta1"

    def __init__(self) -> None:
        self.ids = (f"id-{n}" for n in itertools.count(1))
        self.pipelines: list[dict] = []
        self.versions: list[dict] = []
        self.uploaded: list[bytes] = []
        self.experiments: list[dict] = []
        self.recurring_runs: list[dict] = []
        self.refuse_recurring_runs: str | None = None

    def answer(self, request: Request) -> tuple[int, Any]:
        path, api = request.path, self.API
        if path == f"{api}/healthz":
            return 200, {"multi_user": False}
        if path == f"{api}/pipelines" and request.method == "GET":
            name = _display_name_filter(request)
            return 200, {"pipelines": [p for p in self.pipelines if p["display_name"] == name]}
        if path == f"{api}/pipelines/upload":
            pipeline = {"pipeline_id": next(self.ids), "display_name": request.query["name"]}
            self.pipelines.append(pipeline)
            # Like KFP, uploading a pipeline also makes its first version.
            self._add_version(pipeline["pipeline_id"], request.query["name"], request)
            return 200, pipeline
        if path == f"{api}/pipelines/upload_version":
            return 200, self._add_version(
                request.query["pipelineid"], request.query["name"], request
            )
        if path.startswith(f"{api}/pipelines/") and "/versions" in path:
            pipeline_id, _, version_id = path.removeprefix(f"{api}/pipelines/").partition(
                "/versions"
            )
            versions = [v for v in self.versions if v["pipeline_id"] == pipeline_id]
            if version_id:
                return 200, next(v for v in versions if v["pipeline_version_id"] == version_id[1:])
            name = _display_name_filter(request)
            return 200, {"pipeline_versions": [v for v in versions if v["display_name"] == name]}
        if path == f"{api}/experiments" and request.method == "GET":
            name = _display_name_filter(request)
            return 200, {"experiments": [e for e in self.experiments if e["display_name"] == name]}
        if path == f"{api}/experiments":
            experiment = {"experiment_id": next(self.ids), **request.body}
            self.experiments.append(experiment)
            return 200, experiment
        if path == f"{api}/recurringruns" and request.method == "GET":
            runs = [
                r
                for r in self.recurring_runs
                if r["experiment_id"] == request.query.get("experiment_id")
            ]
            # The field's JSON name in KFP's API, as kfp_server_api reads it.
            return 200, {"recurringRuns": runs, "total_size": len(runs)}
        if path == f"{api}/recurringruns":
            if self.refuse_recurring_runs:
                return 400, {"error_message": self.refuse_recurring_runs, "code": 3}
            run = {**request.body, "recurring_run_id": next(self.ids), "status": "ENABLED"}
            self.recurring_runs.append(run)
            return 200, run
        if path.startswith(f"{api}/recurringruns/") and request.method == "DELETE":
            run_id = path.rsplit("/", 1)[-1]
            self.recurring_runs = [
                r for r in self.recurring_runs if r["recurring_run_id"] != run_id
            ]
            return 200, {}
        return 404, {"error_message": f"no route {request.method} {path}", "code": 5}

    def _add_version(self, pipeline_id: str, name: str, request: Request) -> dict:
        self.uploaded.append(request.files["uploadfile"])
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": next(self.ids),
            "display_name": name,
            "sha256": hashlib.sha256(request.files["uploadfile"]).hexdigest(),
        }
        self.versions.append(version)
        return version


class FakeVertex:
    """The state behind Vertex AI's projects.locations.schedules (one schedule per list page)."""

    def __init__(self) -> None:
        self.schedules: list[dict] = []
        self.counter = itertools.count(1)

    def answer(self, request: Request) -> tuple[int, Any]:
        parent, _, rest = request.path.removeprefix("/v1/").partition("/schedules")
        if parent.startswith("projects/denied"):
            return 403, {
                "error": {"code": 403, "message": "Permission 'aiplatform.schedules.create' denied"}
            }
        if request.method == "POST" and not rest:
            schedule = {
                **request.body,
                "name": f"{parent}/schedules/{next(self.counter)}",
                "state": "ACTIVE",
            }
            self.schedules.append(schedule)
            return 200, schedule
        if request.method == "GET" and not rest:
            start = int(request.query.get("pageToken") or 0)
            page = {"schedules": self.schedules[start : start + 1]}
            if start + 1 < len(self.schedules):
                page["nextPageToken"] = str(start + 1)
            return 200, page
        if request.method == "DELETE":
            name = f"{parent}/schedules{rest}"
            self.schedules = [s for s in self.schedules if s["name"] != name]
            return 200, {"name": f"{name}/operations/1"}
        return 404, {"error": {"code": 404, "message": "not found"}}


@pytest.fixture(scope="module")
def template():
    return build_template(
        load_config(overrides=SETTINGS), image="registry.example/tumorflow-python:1"
    )


@pytest.fixture()
def kubeflow() -> Iterator[tuple[FakeKubeflow, RecordingServer]]:
    fake = FakeKubeflow()
    with RecordingServer(fake.answer) as server:
        yield fake, server


@pytest.fixture()
def vertex() -> Iterator[tuple[FakeVertex, RecordingServer]]:
    fake = FakeVertex()
    with RecordingServer(fake.answer) as server:
        yield fake, server


# Cron forms


def test_kubeflow_takes_six_fields_and_reads_five_as_on_the_minute():
    assert kubeflow_cron("0 0 3 * * 1").expression == "0 0 3 * * 1"
    assert kubeflow_cron("0 0 3 * * 1").note is None
    converted = kubeflow_cron("0 3 * * MON")
    assert converted.expression == "0 0 3 * * MON"
    assert "seconds first" in converted.note


def test_vertex_takes_five_fields_with_a_time_zone_and_drops_zero_seconds():
    assert vertex_cron("TZ=Europe/Berlin 0 3 * * 1").expression == "TZ=Europe/Berlin 0 3 * * 1"
    converted = vertex_cron("0 0 3 * * 1")
    assert converted.expression == "0 3 * * 1"
    assert "5 fields" in converted.note


@pytest.mark.parametrize(
    ("reader", "cron", "says"),
    [
        (kubeflow_cron, "0 3 * *", "has 4 fields"),
        (kubeflow_cron, "TZ=UTC 0 0 3 * * 1", "no time zone"),
        (kubeflow_cron, "0 0 25 * * 1", "hour 25 is outside 0-23"),
        (kubeflow_cron, "0 0 3 * JUNE 1", "month 'JUNE' is not understood"),
        (vertex_cron, "30 0 3 * * 1", "0 seconds"),
        (vertex_cron, "*/x 3 * * 1", "step 'x' is not a number"),
        (vertex_cron, "0 3 * * 1 2024 x", "has 7 fields"),
    ],
)
def test_a_bad_cron_is_refused_with_what_is_wrong(reader, cron, says):
    with pytest.raises(ConfigError, match=says):
        reader(cron)


# Refusals


def test_a_schedule_without_a_tracking_server_is_refused_unless_told():
    config = load_config(overrides=["deploy.model_base_path=gs://models/serving"])
    with pytest.raises(ConfigError, match="--no-registry"):
        build_template(config)
    assert build_template(config, no_registry=True).arguments["tracking_uri"] == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["compile", "--output", "unused.yaml"],
        ["submit", "--host", "http://127.0.0.1:9"],
        [
            "schedule",
            "create",
            "--host",
            "http://127.0.0.1:9",
            "--name",
            "w",
            "--cron",
            "0 3 * * 1",
        ],
    ],
)
def test_cluster_commands_refuse_an_empty_tracking_uri_before_any_request(
    argv, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--no-registry" in error and "tracking.tracking_uri" in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "unused.yaml").exists()


def test_compile_with_no_registry_writes_the_spec(tmp_path):
    output = tmp_path / "pipeline.yaml"
    assert main(["compile", "--output", str(output), "--no-registry"]) == 0
    assert yaml.safe_load(output.read_text())["pipelineInfo"]["name"] == "tumorflow-retrain"


def test_the_monitor_pipeline_needs_the_request_store():
    config = load_config(overrides=SETTINGS)
    with pytest.raises(ConfigError, match="--current"):
        build_template(config, pipeline="monitor")
    monitor = build_template(config, pipeline="monitor", current_source="gs://logs/requests")
    assert monitor.name == "tumorflow-monitor"
    assert monitor.arguments["current_source"] == "gs://logs/requests"
    assert monitor.arguments["window_hours"] == config.drift.window_hours


# Templates


def test_the_template_is_named_after_the_version_and_its_content(template):
    from tumorflow import __version__

    digest = hashlib.sha256(template.spec_yaml.encode()).hexdigest()[:12]
    assert template.version == f"{__version__}-{digest}"
    again = build_template(
        load_config(overrides=SETTINGS), image="registry.example/tumorflow-python:1"
    )
    assert again.version == template.version
    other = build_template(
        load_config(overrides=[*SETTINGS, "train.stage1.epochs=9"]),
        image="registry.example/tumorflow-python:1",
    )
    assert other.version != template.version


def test_scheduled_steps_cache_on_the_dataset_version_unless_told_not_to(template):
    tasks = template.spec["root"]["dag"]["tasks"]
    assert tasks["train"]["cachingOptions"]["enableCache"]
    assert tasks["download"]["cachingOptions"]["enableCache"]
    for name in ("dataset-version", "gate", "approval", "drift-report"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    uncached = build_template(load_config(overrides=SETTINGS), enable_caching=False)
    tasks = uncached.spec["root"]["dag"]["tasks"]
    assert not any(t["cachingOptions"].get("enableCache") for t in tasks.values())


# Kubeflow Pipelines


def test_kubeflow_schedule_runs_one_at_a_time_without_catch_up_from_a_pinned_version(
    kubeflow, template
):
    fake, server = kubeflow
    scheduler = KubeflowScheduler(server.url, "tumorflow")
    schedule = scheduler.create(template, "weekly-retrain", "0 0 3 * * 1")

    uploads = server.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert len(uploads) == 1
    assert uploads[0].query["name"] == template.version
    assert uploads[0].files["uploadfile"].decode() == template.spec_yaml
    (created,) = server.calls("POST", "/apis/v2beta1/recurringruns")
    body = created.body
    assert body["display_name"] == "weekly-retrain"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    version = next(v for v in fake.versions if v["display_name"] == template.version)
    assert body["pipeline_version_reference"] == {
        "pipeline_id": version["pipeline_id"],
        "pipeline_version_id": version["pipeline_version_id"],
    }
    parameters = body["runtime_config"]["parameters"]
    assert parameters["tracking_uri"] == TRACKING
    assert parameters["model_base_path"] == "gs://models/serving"
    assert parameters["train_config"] == template.arguments["train_config"]
    assert body["experiment_id"] == fake.experiments[0]["experiment_id"]
    assert schedule.template == template.version and schedule.status == "ENABLED"


def test_an_identical_template_reuses_its_version(kubeflow, template):
    fake, server = kubeflow
    scheduler = KubeflowScheduler(server.url, "tumorflow")
    first = scheduler.create(template, "weekly", "0 0 3 * * 1")
    second = scheduler.create(template, "daily", "0 0 4 * * *")
    assert len(server.calls("POST", "/apis/v2beta1/pipelines/upload")) == 1
    assert len(server.calls("POST", "/apis/v2beta1/pipelines/upload_version")) == 1
    references = [r["pipeline_version_reference"] for r in fake.recurring_runs]
    assert references[0] == references[1]
    assert {s.name for s in scheduler.list()} == {first.name, second.name}


def test_kubeflow_list_and_delete_by_name_or_id(kubeflow, template):
    _, server = kubeflow
    scheduler = KubeflowScheduler(server.url, "tumorflow")
    assert scheduler.list() == []
    weekly = scheduler.create(template, "weekly", "0 0 3 * * 1")
    daily = scheduler.create(template, "daily", "0 0 4 * * *")
    listed = {s.name: s for s in scheduler.list()}
    assert listed["weekly"].cron == "0 0 3 * * 1"
    assert listed["daily"].template == template.version
    assert scheduler.delete("weekly").id == weekly.id
    assert scheduler.delete(daily.id).name == "daily"
    deleted = [r.path.rsplit("/", 1)[-1] for r in server.requests if r.method == "DELETE"]
    assert deleted == [weekly.id, daily.id]
    assert scheduler.list() == []
    with pytest.raises(ScheduleError, match="no schedule named or with id 'weekly'"):
        scheduler.delete("weekly")


def test_kubeflow_refuses_a_second_schedule_of_the_same_name(kubeflow, template):
    _, server = kubeflow
    scheduler = KubeflowScheduler(server.url, "tumorflow")
    scheduler.create(template, "weekly", "0 0 3 * * 1")
    with pytest.raises(ScheduleError, match="a schedule named 'weekly' exists"):
        scheduler.create(template, "weekly", "0 0 5 * * 1")
    assert len(server.calls("POST", "/apis/v2beta1/recurringruns")) == 1


def test_a_refusal_from_kubeflow_is_one_line_with_its_reason(kubeflow, template):
    fake, server = kubeflow
    fake.refuse_recurring_runs = "Invalid input error: the cron schedule is invalid"
    with pytest.raises(ScheduleError) as error:
        KubeflowScheduler(server.url, "tumorflow").create(template, "w", "0 0 3 * * 1")
    message = str(error.value)
    assert "answered 400" in message and "cron schedule is invalid" in message
    assert "\n" not in message


def test_an_unreachable_kubeflow_host_is_one_line(capsys):
    assert main(["schedule", "list", "--host", "http://127.0.0.1:9"]) == 2
    error = capsys.readouterr().err
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in error
    assert len(error.strip().splitlines()) == 1


def test_schedule_commands_against_kubeflow(kubeflow, capsys):
    fake, server = kubeflow
    settings = [arg for setting in SETTINGS for arg in ("--set", setting)]
    target = ["--host", server.url]
    create = ["schedule", "create", *target, "--name", "weekly", "--cron", "0 3 * * 1"]
    assert main([*create, *settings]) == 0
    out = capsys.readouterr().out
    assert "'0 3 * * 1' read as '0 0 3 * * 1'" in out
    assert "created schedule weekly" in out
    assert fake.recurring_runs[0]["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"

    assert main(["schedule", "list", *target]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["NAME", "ID", "CRON", "STATUS", "TEMPLATE"]
    version = fake.versions[-1]["display_name"]
    assert listing[1].split() == [
        "weekly",
        fake.recurring_runs[0]["recurring_run_id"],
        *["0", "0", "3", "*", "*", "1"],
        "ENABLED",
        version,
    ]

    assert main(["schedule", "delete", "weekly", *target]) == 0
    assert "deleted schedule weekly" in capsys.readouterr().out
    assert main(["schedule", "list", *target]) == 0
    assert capsys.readouterr().out.strip() == "no schedules"


def test_a_multi_worker_schedule_on_kubeflow_trains_as_a_tfjob(kubeflow, capsys):
    fake, _ = kubeflow
    settings = [arg for setting in [*SETTINGS, "runtime.workers=2"] for arg in ("--set", setting)]
    create = ["schedule", "create", "--host", kubeflow[1].url, "--name", "w", "--cron", "0 3 * * 1"]
    assert main([*create, *settings]) == 0
    spec = fake.uploaded[-1].decode()
    # The Kubeflow target launches the Training Operator, not a Vertex AI custom job.
    assert "exec-train-tfjob" in spec
    assert "CustomJob" not in spec and "custom_job" not in spec


# Vertex AI


def test_vertex_schedule_body_holds_the_spec_and_allows_one_run(vertex, template):
    _, server = vertex
    scheduler = VertexScheduler(
        "proj", "europe-west4", endpoint=f"{server.url}/v1", credentials=AnonymousCredentials()
    )
    schedule = scheduler.create(
        template, "weekly", "TZ=Europe/Berlin 0 3 * * 1", pipeline_root="gs://runs/root"
    )
    (created,) = server.calls("POST", "/v1/projects/proj/locations/europe-west4/schedules")
    body = created.body
    assert body["cron"] == "TZ=Europe/Berlin 0 3 * * 1"
    assert body["maxConcurrentRunCount"] == "1"
    assert body["allowQueueing"] is False
    assert body["catchUp"] is False
    request = body["createPipelineJobRequest"]
    assert request["parent"] == "projects/proj/locations/europe-west4"
    job = request["pipelineJob"]
    assert job["pipelineSpec"] == template.spec
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://runs/root"
    assert job["runtimeConfig"]["parameterValues"]["tracking_uri"] == TRACKING
    assert (
        job["runtimeConfig"]["parameterValues"]["gate_config"] == template.arguments["gate_config"]
    )
    assert job["labels"]["tumorflow-template"] == template.version.replace(".", "-")
    assert schedule.status == "ACTIVE" and schedule.cron == body["cron"]


def test_vertex_list_pages_and_delete_by_name(vertex, template):
    _, server = vertex
    scheduler = VertexScheduler(
        "proj", "us-central1", endpoint=f"{server.url}/v1", credentials=AnonymousCredentials()
    )
    scheduler.create(template, "weekly", "0 0 3 * * 1", pipeline_root="gs://runs/root")
    scheduler.create(template, "daily", "0 4 * * *", pipeline_root="gs://runs/root")
    listed = scheduler.list()
    assert [s.name for s in listed] == ["weekly", "daily"]
    assert listed[0].cron == "0 3 * * 1"
    deleted = scheduler.delete("daily")
    (request,) = [r for r in server.requests if r.method == "DELETE"]
    assert request.path == f"/v1/projects/proj/locations/us-central1/schedules/{deleted.id}"
    assert [s.name for s in scheduler.list()] == ["weekly"]
    with pytest.raises(ScheduleError, match="a schedule named 'weekly' exists"):
        scheduler.create(template, "weekly", "0 3 * * 1", pipeline_root="gs://runs/root")


def test_vertex_refusals_are_one_line(vertex, template, monkeypatch, tmp_path):
    _, server = vertex
    denied = VertexScheduler(
        "denied", "us-central1", endpoint=f"{server.url}/v1", credentials=AnonymousCredentials()
    )
    with pytest.raises(ScheduleError, match=r"answered 403 .*schedules\.create' denied"):
        denied.create(template, "weekly", "0 3 * * 1", pipeline_root="gs://runs/root")
    with pytest.raises(ConfigError, match="gs://BUCKET/PREFIX"):
        denied.create(template, "weekly", "0 3 * * 1", pipeline_root="/local/root")

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ScheduleError, match="no Google Cloud credentials found"):
        VertexScheduler("proj", "us-central1", endpoint=f"{server.url}/v1").list()
    unreachable = VertexScheduler(
        "proj", "us-central1", endpoint="http://127.0.0.1:9/v1", credentials=AnonymousCredentials()
    )
    with pytest.raises(
        ScheduleError, match=re.escape("cannot reach Vertex AI at http://127.0.0.1:9/v1")
    ):
        unreachable.list()
