"""The model repository: version policy, hot swap under load, corrupt versions, labels."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import grpc
import pytest
import tensorflow as tf
from helpers import wait_until
from tensorflow_serving.apis import get_model_status_pb2, predict_pb2, prediction_service_pb2_grpc

from tumorflow.core.errors import ConfigError
from tumorflow.serving.repository import ModelRepository, read_model_config, single_model_config
from tumorflow.serving.server import ModelServer, ServerOptions
from tumorflow.serving.status import ServingError

pytestmark = pytest.mark.service
State = get_model_status_pb2.ModelVersionStatus.State


def install(source: Path, base: Path, version: int) -> None:
    """Write a version the way deploy does: beside it under a temporary name, then rename."""
    staging = base / f".tmp-{version}"
    shutil.copytree(source, staging)
    staging.rename(base / str(version))


def test_latest_policy_serves_the_newest_and_keeps_a_corrupt_version_out(
    tmp_path, bytes_model_v1, bytes_model_v2
) -> None:
    base = tmp_path / "tumor"
    install(bytes_model_v1, base, 1)
    repository = ModelRepository(single_model_config("tumor", str(base)), poll_wait_seconds=0)
    repository.start()
    assert repository.resolve("tumor").version == 1
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"half written garbage")
    repository.poll()
    assert repository.resolve("tumor").version == 1
    status = repository.statuses("tumor", 3)[3]
    assert status.state == State.END and "failed to load" in status.error_message
    assert status.error_code != grpc.StatusCode.OK
    shutil.rmtree(base / "3")
    install(bytes_model_v2, base, 3)
    repository.poll()
    assert repository.resolve("tumor").version == 3
    assert repository.statuses("tumor")[1].state == State.END
    with pytest.raises(ServingError) as caught:
        repository.resolve("tumor", version=1)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_labels_and_specific_policy_from_a_config_file(
    tmp_path, bytes_model_v1, bytes_model_v2
) -> None:
    base = tmp_path / "tumor"
    install(bytes_model_v1, base, 1)
    install(bytes_model_v2, base, 2)
    config_file = tmp_path / "models.config"
    config_file.write_text(
        f'model_config_list {{ config {{ name: "tumor" base_path: "{base}" '
        "model_version_policy { specific { versions: 1 versions: 5 } } "
        'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 5 } } }'
    )
    repository = ModelRepository(read_model_config(str(config_file)), poll_wait_seconds=0)
    repository.start()
    assert repository.resolve("tumor").version == 1
    assert repository.resolve("tumor", label="stable").version == 1
    with pytest.raises(ServingError) as caught:
        repository.resolve("tumor", label="canary")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ServingError) as caught:
        repository.resolve("tumor", label="gold")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_config_files_say_what_is_wrong(tmp_path) -> None:
    broken = tmp_path / "broken.config"
    broken.write_text("model_config_list { config { name: 'x' base_pth: '/m' } }")
    with pytest.raises(ConfigError, match="not a valid ModelServerConfig"):
        read_model_config(str(broken))
    with pytest.raises(ConfigError, match="cannot read"):
        read_model_config(str(tmp_path / "missing.config"))
    twice = tmp_path / "twice.config"
    twice.write_text(
        "model_config_list { config { name: 'x' base_path: '/a' } config { name: 'x' base_path: '/b' } }"
    )
    with pytest.raises(ConfigError, match="more than once"):
        read_model_config(str(twice))


def test_hot_swap_under_load_fails_no_request(
    tmp_path, bytes_model_v1, bytes_model_v2, image
) -> None:
    base = tmp_path / "tumor"
    install(bytes_model_v1, base, 1)
    server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=0,
            model_name="tumor",
            model_base_path=str(base),
            file_system_poll_wait_seconds=0.1,
            enable_batching=True,
        )
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tumor"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image(1)], dtype=tf.string))
    versions: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                versions.append(stub.Predict(request, timeout=30).model_spec.version.value)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    clients = [threading.Thread(target=hammer) for _ in range(6)]
    try:
        for client in clients:
            client.start()
        wait_until(lambda: len(versions) > 20, 30, "version 1 answering")
        install(bytes_model_v2, base, 2)
        wait_until(
            lambda: versions[-1] == 2 and server.repository.statuses("tumor")[1].state == State.END,
            30,
            "version 2 answering and version 1 unloaded",
        )
        served_after = len(versions)
        wait_until(lambda: len(versions) > served_after + 20, 30, "version 2 answering on")
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=60)
        channel.close()
        server.stop()
    assert failures == []
    assert versions[0] == 1 and versions[-1] == 2
    first_v2 = versions.index(2)
    assert 1 not in versions[first_v2 + 50 :], "version 1 kept answering long after the swap"
