"""Rollback and promote move every request: `tumorflow serve`, following the models.config that
deploy, rollback and promote write (local or gs://), answers a request that names neither a
version nor a label with the restored version and stops loading the version rolled back from;
`tumorflow status` reports what the server loaded. Queried with the official stubs."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tumorflow.components.release.deploy import model_status, promote_canary, rollback
from tumorflow.core import serving_layout, storage
from tumorflow.serving.server import ModelServer, ServerOptions

pytestmark = pytest.mark.service

MODEL = "kidney-ct"
POLL_S = 0.2
# Generous for a loaded 2-core machine; the server applies a change one poll after it is written.
DEADLINE_S = 20.0
State = get_model_status_pb2.ModelVersionStatus.State


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {DEADLINE_S:.0f}s: {what}"
        time.sleep(0.05)


def publish(source: Path, base: str, version: int) -> None:
    """Put a SavedModel where deploy puts version `version` (renamed in place, or uploaded)."""
    target = serving_layout.version_uri(base, MODEL, version)
    if storage.is_remote(base):
        storage.upload_tree(source, target)
        return
    staging = Path(base) / MODEL / f".tmp-{version}"
    shutil.copytree(source, staging)
    staging.rename(target)


def point(base: str, stable: int, canary: int | None = None) -> None:
    """The labels deploy writes after publishing (`deploy.rollout` stable or canary)."""
    serving_layout.edit_serving_config(
        base,
        lambda config: serving_layout.set_served_versions(
            config, base, MODEL, stable=stable, canary=canary, keep_versions=2
        ),
    )


class Client:
    """A TF Serving client on the official `tensorflow-serving-api` stubs."""

    def __init__(self, port: int, image: Callable[..., bytes]) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._image = image(7)

    def answering_version(self, label: str = "") -> int:
        """The version that answers a Predict naming no version (and `label`, if given)."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        if label:
            request.model_spec.version_label = label
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([self._image]))
        return self._predict.Predict(request, timeout=30).model_spec.version.value

    def available(self) -> list[int]:
        """Versions GetModelStatus reports AVAILABLE."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL
        response = self._models.GetModelStatus(request, timeout=30)
        return sorted(
            s.version for s in response.model_version_status if s.state == State.AVAILABLE
        )

    def close(self) -> None:
        self._channel.close()


@pytest.fixture()
def serve(image) -> Iterator[Callable[[str], Client]]:
    """`serve(base)`: `tumorflow serve --model_config_file <base>/models.config` with polling."""
    servers: list[ModelServer] = []
    clients: list[Client] = []

    def start(base: str) -> Client:
        server = ModelServer(
            ServerOptions(
                port=0,
                rest_api_port=0,
                model_config_file=serving_layout.models_config_uri(base),
                model_config_file_poll_wait_seconds=POLL_S,
                file_system_poll_wait_seconds=POLL_S,
            )
        )
        server.start()
        servers.append(server)
        clients.append(Client(server.grpc_port, image))
        return clients[-1]

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop()


def assert_rollback_moves_every_request(base: str, client: Client, v2: Path) -> None:
    publish(v2, base, 2)
    point(base, stable=2)
    wait_until(lambda: client.answering_version() == 2, "deploy of v2 served unlabelled")
    assert client.answering_version("stable") == 2 and client.available() == [1, 2]

    result = rollback(None, MODEL, base)
    assert (result.stable, result.replaced) == (1, 2)
    wait_until(lambda: client.available() == [1], "v2 no longer loaded after the rollback")
    assert client.answering_version() == 1
    assert client.answering_version("stable") == 1
    serving = model_status(None, MODEL, base)["serving"]
    assert serving["loaded"] == client.available() and serving["labels"]["stable"] == 1


def test_rollback_moves_unlabelled_requests_and_unloads_the_newer_version(
    tmp_path: Path, serve, bytes_model_v1: Path, bytes_model_v2: Path
) -> None:
    base = str(tmp_path / "models")
    publish(bytes_model_v1, base, 1)
    point(base, stable=1)
    client = serve(base)
    assert client.answering_version() == 1
    assert_rollback_moves_every_request(base, client, bytes_model_v2)


def test_promote_and_abort_of_a_canary_move_unlabelled_requests(
    tmp_path: Path, serve, bytes_model_v1: Path, bytes_model_v2: Path
) -> None:
    base = str(tmp_path / "models")
    publish(bytes_model_v1, base, 1)
    point(base, stable=1)
    client = serve(base)
    publish(bytes_model_v2, base, 2)
    point(base, stable=1, canary=2)
    wait_until(lambda: client.available() == [1, 2], "the canary loaded beside stable")
    assert client.answering_version("canary") == 2 and client.answering_version("stable") == 1

    promote_canary(None, MODEL, base)
    wait_until(lambda: client.answering_version("stable") == 2, "stable moved to the canary")
    assert client.answering_version() == 2
    assert model_status(None, MODEL, base)["serving"]["loaded"] == client.available() == [1, 2]

    publish(bytes_model_v1, base, 3)
    point(base, stable=2, canary=3)
    wait_until(lambda: client.available() == [2, 3], "the second canary loaded")
    assert client.answering_version("canary") == 3

    result = rollback(None, MODEL, base)
    assert result.stable == 2
    wait_until(lambda: 3 not in client.available(), "the aborted canary unloaded")
    assert client.answering_version() == 2
    with pytest.raises(grpc.RpcError) as caught:
        client.answering_version("canary")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    serving = model_status(None, MODEL, base)["serving"]
    assert serving["loaded"] == client.available() == [1, 2]
    assert "canary" not in serving["labels"]


def test_serve_follows_a_gs_models_config(
    gcs_emulator: str, serve, bytes_model_v1: Path, bytes_model_v2: Path
) -> None:
    base = f"gs://tumorflow-test/{uuid.uuid4().hex}/serving"
    publish(bytes_model_v1, base, 1)
    point(base, stable=1)
    client = serve(base)
    assert client.answering_version() == 1 and client.available() == [1]
    assert_rollback_moves_every_request(base, client, bytes_model_v2)
