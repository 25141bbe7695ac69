"""`tumorflow serve` with a trust root loads only versions whose signed release record verifies
and names their own SavedModel digest; the others report "not loaded: unsigned"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from helpers import wait_until
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from tumorflow.components.release.deploy import model_status
from tumorflow.components.release.trust_root import sign_decision
from tumorflow.components.training.export import saved_model_digest
from tumorflow.core import serving_layout
from tumorflow.serving.server import ModelServer, ServerOptions

pytestmark = pytest.mark.service

MODEL = "kidney-ct"
State = get_model_status_pb2.ModelVersionStatus.State


def _publish(source: Path, base: Path, version: int, signer=None) -> Path:
    target = base / MODEL / str(version)
    shutil.copytree(source, target)
    if signer is not None:
        _sign(target, signer)
    return target


def _sign(folder: Path, signer) -> None:
    signed = sign_decision(
        signer, "approve", model_name=MODEL, serving_digest=saved_model_digest(folder)
    )
    assets = folder / serving_layout.ASSETS_EXTRA
    assets.mkdir(exist_ok=True)
    (assets / serving_layout.RELEASE_RECORD).write_text(
        json.dumps({"records": [{"record": signed.record, "signature": signed.signature}]})
    )


def _statuses(port: int) -> dict[int, tuple[int, str]]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=30
        )
    return {s.version: (s.state, s.status.error_message) for s in response.model_version_status}


def test_only_signed_versions_load(tmp_path, signing, bytes_model_v1, bytes_model_v2):
    base = tmp_path / "runs" / "serving" / "models"
    _publish(bytes_model_v1, base, 1, signing.keys["alice"])
    unsigned = _publish(bytes_model_v2, base, 2)
    serving_layout.edit_serving_config(
        str(base),
        lambda c: serving_layout.set_served_versions(
            c, str(base), MODEL, stable=2, keep_versions=2
        ),
    )
    # No --trust_root: the local run's trust root two folders above models.config is found.
    server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=0,
            model_config_file=serving_layout.models_config_uri(str(base)),
            file_system_poll_wait_seconds=0.2,
        )
    )
    server.start()
    try:
        wait_until(lambda: len(_statuses(server.grpc_port)) == 2, 30, "both versions tried")
        statuses = _statuses(server.grpc_port)
        assert statuses[1][0] == State.AVAILABLE
        assert statuses[2][0] == State.END
        assert "not loaded: unsigned: no release record" in statuses[2][1]
        status = model_status(None, MODEL, str(base), trust=signing.trust)
        assert status["serving"]["unsigned"] == {2: "unsigned: no release record"}

        _sign(unsigned, signing.keys["bob"])  # a signer, but not an approver
        wait_until(
            lambda: "bob may not approve" in _statuses(server.grpc_port)[2][1], 30, "re-checked"
        )
        _sign(unsigned, signing.keys["alice"])
        wait_until(lambda: _statuses(server.grpc_port)[2][0] == State.AVAILABLE, 30, "v2 loaded")
    finally:
        server.stop()
