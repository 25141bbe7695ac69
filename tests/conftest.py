"""Fixtures shared by the whole suite: real services on loopback, started and stopped here, and
the tiny model every test that needs a trained one reads.

Tiers (markers; `make test-fast` runs the first, `make test` all three on every core):

- unit: no marker. Pure functions and in-process work on tiny data: no server, no training, no
  kfp.local run. Seconds each; the whole tier in about a minute.
- `service`: talks to a real service on loopback: `mlflow server`, the GCS emulator, Orthanc, an
  in-process gRPC/REST model server, a browser. Set here, from the fixtures a test uses
  (`SERVICE_FIXTURES`); mark a test by hand only when it starts a service itself.
- `e2e`: runs a kfp.local pipeline, trains a model, or drives the CLI through a whole run. Marked
  by hand, per module (`pytestmark = pytest.mark.e2e`) or per test. A test marked `e2e` is not
  also `service`: the tiers do not overlap.
- `image` (builds infra/Dockerfile) and `exhaustive` (every variant) are not run by make test.

Rules for a new test:

- Everything a test writes goes under its `tmp_path` (or `tmp_path_factory`); a server listens on
  a port it chose itself (`port=0`, a socket handed over) or `helpers.free_port()`; never a fixed
  port, never the cwd (`monkeypatch.chdir(tmp_path)` if a command writes there).
- A tiny pipeline run: `load_config(helpers.TINY_CONFIG, preset="phantom", overrides=[...])` or
  `tumorflow run --preset phantom --config tests/tiny.yaml`; do not copy its settings.
- A trained model: the `tiny_model` fixture (trained and exported once per session, explain
  signature included; read it, copy it before changing it). A model of known behaviour without
  training: `make_model_dir` (tests/components/conftest.py).
- Wait on the event (`helpers.wait_until`, `approval_waiter`, `approval_announcements`), never a
  fixed sleep. A test that hangs fails: 300 s for unit and service tests (pyproject), 900 s for
  e2e tests (`E2E_TIMEOUT_S`); a longer one says so with `@pytest.mark.timeout(...)`.
- Under pytest-xdist (`make test`: 2 workers, `--dist loadfile`) a module's tests run on one
  worker, so a module-scoped fixture (a server, a run) is set up once; a session fixture runs
  once per worker, and work worth sharing between workers goes through `shared_once` (a file lock
  in the session's temp folder).
"""

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
from helpers import TINY_CONFIG, free_port, wait_until

# A test that uses one of these talks to a real service: it is in the `service` tier.
SERVICE_FIXTURES = frozenset(
    {
        "mlflow_server",
        "gcs_emulator_host",
        "browser",
        "live_console",
        # tests/serving: in-process TF-Serving-compatible gRPC + REST servers
        "server",
        # tests/components/data: Orthanc with DICOMweb (tests/pacs.py)
        "orthanc",
        # a served model with an OOD detector (tests/serving, tests/console)
        "ood_model_server",
    }
)


# pyproject's timeout (300 s) is for unit and service tests; an e2e test gets this unless marked.
E2E_TIMEOUT_S = 900


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put each test that uses a service fixture, and is not `e2e`, in the `service` tier; give
    e2e tests their longer timeout. Then run the longest modules first (the largest timeout, then
    e2e before service before unit), so that under xdist the last minutes are not one worker
    finishing the five-day loop alone while the other idles."""
    for item in items:
        e2e = item.get_closest_marker("e2e") is not None
        if not e2e and SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.service)
        if e2e and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))

    def weight(item: pytest.Item) -> tuple[float, int]:
        timeout = item.get_closest_marker("timeout")
        seconds = float(timeout.args[0]) if timeout and timeout.args else 0.0
        tier = (
            2 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("service") else 0
        )
        return seconds, tier

    modules: dict[str, tuple[float, int]] = {}
    e2e_tests: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        modules[module] = max(modules.get(module, (0.0, 0)), weight(item))
        e2e_tests[module] = e2e_tests.get(module, 0) + (weight(item)[1] == 2)

    def order(item: pytest.Item) -> tuple[float, int, int]:
        module = item.nodeid.split("::")[0]
        seconds, tier = modules[module]
        return -seconds, -tier, -e2e_tests[module]

    # a stable sort: the tests of a module keep their order, and modules of equal weight theirs
    items.sort(key=order)


def shared_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
    """`build(folder)` once per test session, whatever the number of xdist workers: the first
    worker to ask builds under a file lock in the session's temp folder, the others wait and get
    the same folder. Treat it as read-only."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's base temp is a subfolder of the session's
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / f"shared-{name}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".done").exists():
            if folder.exists():
                import shutil

                shutil.rmtree(folder)  # a build that failed half way
            folder.mkdir()
            build(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder as the train step leaves it (model.keras, model_info.json) with its serving
    export in `saved_model/` (serving_default and explain signatures), trained with tests/tiny.yaml's
    train settings on a small phantom split. Built once per session; read it, do not change it."""

    def build(folder: Path) -> None:
        from tumorflow.bench.pointing_game import write_phantom_split
        from tumorflow.components.data.phantom import phantom_slices
        from tumorflow.components.training.export import export_model_artifact
        from tumorflow.components.training.train import train_model
        from tumorflow.core.config import load_config

        config = load_config(TINY_CONFIG, preset="phantom").train
        size = config.image_size
        split = write_phantom_split(
            folder / "split",
            {
                "train": list(phantom_slices(8, size, seed=0)),
                "val": list(phantom_slices(4, size, seed=1)),
            },
        )
        result = train_model(split, folder / "model", config, folder / "ckpt")
        export_model_artifact(result.model_dir)

    return shared_once(tmp_path_factory, "tiny-model", build) / "model"


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
    """A real `mlflow server` on a free loopback port (SQLite backend, proxied artifacts).

    The port is chosen before the server binds it: when another process (another xdist worker's
    server, say) takes it in between, the server exits and is started again on another port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    for attempt in range(3):
        port = free_port()
        log = (root / f"server-{attempt}.log").open("w")
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
            wait_for_http(f"{url}/health", timeout=180, process=process)
            break
        except (RuntimeError, AssertionError) as exc:  # it exited, or never answered
            process.kill()
            log.close()
            # an exit (the port taken) is retried on another port; a server that hangs is not
            if attempt == 2 or isinstance(exc, AssertionError):
                raise
    try:
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
def signing(tmp_path: Path):
    """Keys and a trust root for signed decisions, at `<tmp_path>/runs/trust_root.yaml` (the
    default of `--run-root <tmp_path>/runs`): alice approves and operates every model, carol
    operates, bob is a signer with no role; `console` and `pipeline` are the delegate's and the
    pipeline's keys. `.keys[name]` is a Signer, `.key_path(name)` its private key file."""
    from types import SimpleNamespace

    from tumorflow.components.release.signing import generate_key
    from tumorflow.components.release.trust_root import TrustRoot

    run_root = tmp_path / "runs"
    names = ("alice", "bob", "carol", "console", "pipeline")
    keys = {n: generate_key(run_root / "keys" / n, n) for n in names}
    trust = TrustRoot.from_dict(
        {
            "signers": {n: keys[n].public_key for n in ("alice", "bob", "carol")},
            "delegates": {"console": keys["console"].public_key},
            "pipeline": keys["pipeline"].public_key,
            "models": {
                "*": {"approval": "auto", "approvers": ["alice"], "operators": ["alice", "carol"]}
            },
        }
    )
    path = run_root / "trust_root.yaml"
    trust.save(path)
    return SimpleNamespace(
        run_root=run_root,
        path=path,
        trust=TrustRoot.load(path),
        keys=keys,
        key_path=lambda name: run_root / "keys" / name,
    )


def _candidate_digests(run: str) -> dict[str, str]:
    """The digests a test candidate is registered with (what a decision about it must name)."""
    import hashlib

    return {
        "candidate.serving_digest": hashlib.sha256(f"{run}/saved_model".encode()).hexdigest(),
        "candidate.decision_digest": hashlib.sha256(f"{run}/decision".encode()).hexdigest(),
    }


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
        register_candidate(
            mlflow_server, name, folder, {"passed": passed}, run, digests=_candidate_digests(run)
        )
        return name, run

    return register


@pytest.fixture()
def approval_announcements() -> Iterator[set[str]]:
    """The words of every "waiting up to ... for `tumorflow approve RUN`" line the approval step
    logs in this process during the test: `RUN in approval_announcements` once it waits."""
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
    try:
        yield waiting
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture()
def approval_waiter(
    mlflow_server: str, approval_announcements: set[str], signing
) -> Callable[..., tuple[threading.Thread, list]]:
    """Start `wait_for_approval` in a thread, as the pipeline's approval step waits (manual, the
    `signing` trust root); return once it waits (it logs that it does) or has already returned."""
    from tumorflow.components.release import approval

    waiting = approval_announcements

    def start(name: str, run: str, timeout_s: float) -> tuple[threading.Thread, list]:
        digests = _candidate_digests(run)
        candidate = approval.Candidate(
            name, digests["candidate.serving_digest"], digests["candidate.decision_digest"]
        )
        result: list = []
        thread = threading.Thread(
            target=lambda: result.append(
                approval.wait_for_approval(
                    mlflow_server, candidate, run, timeout_s, 0.2, trust=signing.trust
                )
            )
        )
        thread.start()
        wait_until(
            lambda: run in waiting or not thread.is_alive(), 30, f"a wait for approval of {run}"
        )
        return thread, result

    return start


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


@pytest.fixture(scope="module")
def ood_model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A model of known behaviour served in-process as `kidney-ct` (gRPC and REST), exported with
    a temperature (2.0) and an OOD detector: the embedding is the mean colour (0..255), dark
    (about 20) and bright (about 250) grey are its classes, and any image far from grey is out of
    distribution (pure red (255, 0, 0) scores 560.25 against a threshold of 30)."""
    import json

    import keras
    import numpy as np

    from tumorflow.components.training.export import export_serving_model
    from tumorflow.components.training.ood import MahalanobisDetector
    from tumorflow.components.training.serving_statistics import ServingStatistics
    from tumorflow.serving.server import ModelServer, ServerOptions

    root = tmp_path_factory.mktemp("ood-model")
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="embedding")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="scores")(pooled)
    model = keras.Model(inputs, outputs)
    model.get_layer("scores").set_weights(
        [np.array([[-0.01, 0.01]] * 3, np.float32), np.array([3.0, -3.0], np.float32)]
    )
    folder = root / "model"
    folder.mkdir()
    model.save(folder / "model.keras")
    info = {"backbone": "custom_cnn", "image_size": [32, 32], "classes": ["dark", "bright"]}
    (folder / "model_info.json").write_text(json.dumps(info))
    detector = MahalanobisDetector(np.array([[20.0] * 3, [250.0] * 3]), np.eye(3) / 100, 30.0)
    ServingStatistics(temperature=2.0, detector=detector).write(folder / "serving_statistics.npz")
    export_serving_model(folder, root / "models" / "kidney-ct" / "1", model_name="kidney-ct")
    server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=free_port(),
            model_name="kidney-ct",
            model_base_path=str(root / "models" / "kidney-ct"),
        )
    )
    server.start()
    yield server
    server.stop()
