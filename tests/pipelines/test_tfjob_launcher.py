"""The training step as a Kubeflow TFJob, at the HTTP boundary: a loopback server plays the
Kubernetes API (records the POSTed TFJob, answers GETs with the job's conditions, records the
DELETE), the GCS emulator holds the artifacts, and the test plays the chief writing its output."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from tumorflow.core import storage
from tumorflow.core.errors import ConfigError
from tumorflow.pipelines import steps
from tumorflow.pipelines.tfjob_launcher import TFJobFailed, replica_resources, train_as_tfjob

BUCKET = "tumorflow-test"
ROOT = f"gs://{BUCKET}/root/run-1/train"
JOBS = "/apis/kubeflow.org/v1/namespaces/kubeflow/tfjobs"


class FakeKubernetesApi:
    """The TFJob endpoints of a Kubernetes API server; `conditions` are answered to successive
    GETs (the last one repeats), `on_final` runs when the final one is first answered."""

    def __init__(self, conditions: list[dict], on_final: Callable[[], None] = lambda: None):
        self.conditions = conditions
        self.on_final = on_final
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.gets = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != JOBS:
                    return self._answer(404, {"kind": "Status", "code": 404})
                body["metadata"]["name"] = body["metadata"]["generateName"] + "x7k2p"
                api.created.append(body)
                return self._answer(201, body)

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                job = next(j for j in api.created if j["metadata"]["name"] == name)
                condition = api.conditions[min(api.gets, len(api.conditions) - 1)]
                api.gets += 1
                if api.gets == len(api.conditions):
                    api.on_final()
                return self._answer(200, {**job, "status": {"conditions": [condition]}})

            def do_DELETE(self):
                api.deleted.append(urlsplit(self.path).path.rsplit("/", 1)[-1])
                return self._answer(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKubernetesApi:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def _chief_writes_its_output() -> None:
    """What the chief's KFP executor leaves: the model's metadata in its executor output."""
    output = {"artifacts": {"model": {"artifacts": [{"metadata": {"val_macro_f1": 0.91}}]}}}
    storage.write_versioned(f"{ROOT}/tfjob_executor_output.json", json.dumps(output).encode(), 0)


def _launch(api: FakeKubernetesApi, **overrides) -> dict:
    container = steps.train.component_spec.implementation.container
    arguments = dict(
        split={
            "uri": f"gs://{BUCKET}/root/run-1/validate-and-split/split",
            "schema_title": "system.Dataset",
            "metadata": {"dataset_version": "sha256:abc"},
        },
        model={"uri": f"{ROOT}/model", "schema_title": "system.Model", "metadata": {}},
        parameters={
            "train_config": {"epochs": 3},
            "checkpoint_root": "/gcs/tumorflow-checkpoints/checkpoints",
            "tracking_uri": "http://mlflow.mlflow:5000",
            "experiment": "tumorflow",
        },
        workers=3,
        image="registry.example/tumorflow-python:1.2.3",
        command=list(container.command),
        args=list(container.args),
        resources=replica_resources("8", "32G", 2),
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[
            {
                "key": "nvidia.com/gpu",
                "operator": "Equal",
                "value": "present",
                "effect": "NoSchedule",
            }
        ],
        service_account="pipeline-runner",
        namespace="kubeflow",
        api_host=api.host,
        poll_seconds=0.01,
    )
    return train_as_tfjob(**(arguments | overrides))


@pytest.fixture()
def succeeding(gcs_emulator) -> Iterator[FakeKubernetesApi]:
    conditions = [_condition("Created"), _condition("Running"), _condition("Succeeded")]
    with FakeKubernetesApi(conditions, on_final=_chief_writes_its_output) as api:
        yield api


def test_the_tfjob_runs_the_training_command_on_every_replica(succeeding):
    metadata = _launch(succeeding)
    (job,) = succeeding.created
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    replicas = job["spec"]["tfReplicaSpecs"]
    assert {name: spec["replicas"] for name, spec in replicas.items()} == {"Chief": 1, "Worker": 2}
    inputs = {}
    for name, spec in replicas.items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        # the operator sets TF_CONFIG in the container named `tensorflow` only
        assert container["name"] == "tensorflow"
        assert container["image"] == "registry.example/tumorflow-python:1.2.3"
        assert "def train(" in container["command"][-1]
        assert container["args"][-2:] == ["--function_to_execute", "train"]
        assert container["resources"]["limits"] == {
            "cpu": "8",
            "memory": "32G",
            "nvidia.com/gpu": 2,
        }
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["serviceAccountName"] == "pipeline-runner"
        # both buckets (artifacts, checkpoints) mounted where the executor looks for gs://
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"/gcs/tumorflow-checkpoints", "/gcs/tumorflow-test"}
        buckets = {v["csi"]["volumeAttributes"]["bucketName"] for v in pod["volumes"]}
        assert buckets == {"tumorflow-checkpoints", "tumorflow-test"}
        inputs[name] = json.loads(
            container["args"][container["args"].index("--executor_input") + 1]
        )
    chief = inputs["Chief"]
    (split,) = chief["inputs"]["artifacts"]["split"]["artifacts"]
    assert split["uri"].endswith("/validate-and-split/split")
    assert split["metadata"] == {"dataset_version": "sha256:abc"}
    assert chief["outputs"]["artifacts"]["model"]["artifacts"][0]["uri"] == f"{ROOT}/model"
    assert chief["inputs"]["parameterValues"]["train_config"] == {"epochs": 3}
    # only the chief's executor output lands beside the model
    assert (
        chief["outputs"]["outputFile"]
        == "/gcs/tumorflow-test/root/run-1/train/tfjob_executor_output.json"
    )
    assert not inputs["Worker"]["outputs"]["outputFile"].startswith("/gcs/")
    assert inputs["Worker"]["inputs"] == chief["inputs"]
    # the chief's model metadata becomes the step's, and the job is deleted
    assert metadata == {"val_macro_f1": 0.91, "tfjob": "tumorflow-train-x7k2p"}
    assert succeeding.deleted == ["tumorflow-train-x7k2p"]


def test_a_failed_tfjob_fails_the_step_with_the_operators_reason(gcs_emulator):
    failed = _condition(
        "Failed",
        "TFJobFailed",
        "TFJob kubeflow/tumorflow-train-x7k2p has failed because 1\nChief replica(s) failed.",
    )
    with (
        FakeKubernetesApi([_condition("Running"), failed]) as api,
        pytest.raises(TFJobFailed) as raised,
    ):
        _launch(api)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("training TFJob kubeflow/tumorflow-train-x7k2p failed: TFJobFailed:")
    assert "Chief replica(s) failed" in message
    assert api.deleted == ["tumorflow-train-x7k2p"]


def test_a_job_that_never_finishes_is_deleted_at_the_timeout(gcs_emulator):
    with (
        FakeKubernetesApi([_condition("Running")]) as api,
        pytest.raises(TFJobFailed, match="did not finish within 0 s"),
    ):
        _launch(api, timeout_seconds=0)
    assert api.deleted == ["tumorflow-train-x7k2p"]


def test_without_the_training_operator_the_create_fails_in_one_line(gcs_emulator):
    with FakeKubernetesApi([]) as api:
        api.server.RequestHandlerClass.do_POST = lambda handler: handler._answer(
            404, {"kind": "Status", "code": 404, "reason": "NotFound"}
        )
        with pytest.raises(TFJobFailed, match="Training Operator installed"):
            _launch(api)
    assert api.deleted == []


def test_artifacts_outside_cloud_storage_are_refused_before_anything_is_created():
    with FakeKubernetesApi([]) as api, pytest.raises(ConfigError, match="gs:// pipeline root"):
        _launch(
            api,
            model={"uri": "minio://mlpipeline/run/model", "schema_title": "system.Model"},
        )
    assert api.created == []
