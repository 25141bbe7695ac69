"""Fixtures shared by the whole suite: real services on loopback, started and stopped here."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import free_port, wait_until


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 200; fail at once when `process` (the server) has exited."""

    def answers() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(answers, timeout, f"{url} answering", interval=0.3)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port (SQLite backend, proxied artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_HOME": str(root)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", timeout=90, process=process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture()
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture()
def approval_candidate(tmp_path: Path, mlflow_server: str):
    """Register a candidate model version for a fresh pipeline run; returns (model, run)."""
    import json
    import uuid

    from tumorflow.components.release.registry import register_candidate

    def register(passed: bool) -> tuple[str, str]:
        folder = tmp_path / f"model-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        (folder / "model.keras").write_bytes(b"weights")
        (folder / "model_info.json").write_text(
            json.dumps({"classes": ["a", "b"], "image_size": [32, 32]})
        )
        name, run = f"m-{uuid.uuid4().hex[:6]}", f"run-{uuid.uuid4().hex[:6]}"
        register_candidate(mlflow_server, name, folder, {"passed": passed}, run)
        return name, run

    return register


@pytest.fixture()
def approval_waiter(mlflow_server: str) -> Iterator[Callable[..., tuple[threading.Thread, list]]]:
    """Start `wait_for_approval` in a thread, as the pipeline's approval step waits; return once
    it waits (it logs that it does) or has already returned."""
    from tumorflow.components.release import approval

    waiting: set[str] = set()

    class Announcements(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("waiting up to"):
                waiting.update(word.strip("`") for word in message.split())

    logger = logging.getLogger(approval.__name__)
    handler, level = Announcements(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def start(name: str, run: str, timeout_s: float) -> tuple[threading.Thread, list]:
        result: list = []
        thread = threading.Thread(
            target=lambda: result.append(
                approval.wait_for_approval(mlflow_server, name, run, timeout_s, 0.2)
            )
        )
        thread.start()
        wait_until(
            lambda: run in waiting or not thread.is_alive(), 30, f"a wait for approval of {run}"
        )
        return thread, result

    try:
        yield start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="session")
def gcs_emulator_host() -> Iterator[str]:
    """A gcp-storage-emulator on a free loopback port (bucket `tumorflow-test` exists)."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="tumorflow-test")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def gcs_emulator(gcs_emulator_host: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """STORAGE_EMULATOR_HOST pointing at the emulator for one test (the client reads it)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator_host)
    return gcs_emulator_host


@pytest.fixture()
def gcs_emulator_preconditions(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The GCS emulator, refusing uploads whose `ifGenerationMatch` is stale, as GCS does.

    gcp-storage-emulator accepts the parameter and ignores it. Its HTTP server answers one
    request at a time, so checking the live generation right before the upload handler runs is
    as atomic as GCS's own check: 412 when the object is not at the generation asked for (0: it
    must not exist). The real client sends the request and parses the answer as against GCS.
    """
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    upload = objects.insert

    def live_generation(storage, bucket: str, name: str) -> int:
        try:
            return int(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return 0

    def insert_if_generation_matches(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted:
            if "name" in request.query:
                name = request.query["name"][0]
            else:
                name = request.data["meta"]["name"]
            if live_generation(storage, request.params["bucket_name"], name) != int(wanted[0]):
                response.status = HTTPStatus.PRECONDITION_FAILED
                message = "At least one of the pre-conditions you specified did not hold."
                response.json(
                    {
                        "error": {
                            "code": 412,
                            "message": message,
                            "errors": [{"reason": "conditionNotMet", "message": message}],
                        }
                    }
                )
                return None
        return upload(request, response, storage, *args, **kwargs)

    monkeypatch.setattr(objects, "insert", insert_if_generation_matches)
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is upload:
                monkeypatch.setitem(handlers, method, insert_if_generation_matches)
    return gcs_emulator


# Request-log store helpers, shared by the store, ingest and server request-log tests (test
# modules cannot import conftest, so they come as fixtures).


def _level_png(level: int, size: int = 32) -> bytes:
    """A noisy PNG whose mean grey level is about `level`."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(level)
    pixels = np.clip(rng.normal(level, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _predict_outputs(n: int) -> dict:
    """The outputs of tumorflow's serving signature for `n` images, all predicted "tumor"."""
    import numpy as np

    scores = np.tile(np.array([[0.2, 0.8]], dtype=np.float32), (n, 1))
    return {
        "scores": scores,
        "classes": np.array([[b"normal", b"tumor"]] * n, dtype=object),
        "predicted_class": np.array([b"tumor"] * n, dtype=object),
        "predicted_index": np.ones(n, dtype=np.int64),
        "embedding": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
    }


def _read_store(root: Path):
    """Every row of the request-log store under `root`, or None when it holds no part file."""
    import pandas as pd

    parts = sorted(Path(root).rglob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else None


@pytest.fixture()
def level_png():
    return _level_png


@pytest.fixture()
def predict_outputs():
    return _predict_outputs


@pytest.fixture()
def read_store():
    return _read_store
