"""The production loop over five "days", as its users live it.

A real `mlflow server` and `tumorflow serve` run throughout, and a client with the official
tensorflow-serving-api stubs sends requests that name no version or label the whole time:

- day 1 trains and deploys v1;
- day 2, the same data: everything is reused from cache and nothing new is deployed;
- day 3, new images in the dataset folder: the run trains on them and gates against v1 on the new
  test split, and v2 is served;
- day 4, drifted requests make the monitor start a retraining that waits for a person (the
  model's policy is manual), who rejects it: nothing changes;
- day 5, a rollback: every request, labelled or not, gets v1 again.

Not one client request fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CONFIG, free_port, wait_until
from PIL import Image

from tumorflow.core.config import PipelineConfig, load_config
from tumorflow.pipelines.runner import RunSummary, run_local

# four runs and a server: 20 min on a busy 2-core machine
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

MODEL = "loop-model"
CLASSES = ("Cyst", "Normal", "Stone", "Tumor")


def _phantom(folder: Path, seed: int, number_offset: int = 0) -> None:
    """Phantom slices in the kidney CT layout under `folder`, numbered from `number_offset`."""
    from tumorflow.components.data.phantom import generate_phantom, images_folder

    made = generate_phantom(folder.parent / f"phantom-{seed}", per_class=16, size=48, seed=seed)
    source, target = images_folder(made), images_folder(folder)
    for label in CLASSES:
        (target / label).mkdir(parents=True, exist_ok=True)
        for image in (source / label).iterdir():
            number = int(image.stem.split("(")[1].rstrip(")"))
            shutil.copyfile(image, target / label / f"{label}- ({number + number_offset}).jpg")


def _config(run_root: Path, data: Path, tracking_uri: str, *overrides: str) -> PipelineConfig:
    return load_config(
        TINY_CONFIG,
        preset="phantom",
        overrides=[
            f"run_root={run_root}",
            f"dataset.source={data}",
            f"tracking.tracking_uri={tracking_uri}",
            f"deploy.model_name={MODEL}",
            # the synthetic model of a few epochs may be worse than the champion on a new split:
            # what this test checks is the loop, not the model
            "gate.champion_rules=[{metric: macro_f1, margin: 1.0}]",
            "gate.approval_poll_s=0.5",
            "gate.approval_timeout_s=300",
            *overrides,
        ],
    )


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Client:
    """Sends Predict requests naming only the model, and records the version that answered."""

    port: int
    drifted: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[tuple[float, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def run(self) -> None:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        rng = np.random.default_rng(0)
        deadline = time.monotonic() + 1800  # bounded: the test ends long before
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not self.stop.is_set() and time.monotonic() < deadline:
                if self.drifted.is_set():  # a new scanner: dark, flat, blurred slices
                    pixels = rng.normal(40, 3, (48, 48))
                else:
                    pixels = rng.normal(110, 40, (48, 48))
                request = predict_pb2.PredictRequest()
                request.model_spec.name = MODEL
                request.inputs["image_bytes"].CopyFrom(
                    tf.make_tensor_proto([_png(pixels.clip(0, 255).astype(np.uint8))])
                )
                try:
                    response = stub.Predict(request, timeout=30)
                    self.answers.append((time.monotonic(), response.model_spec.version.value))
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
                self.stop.wait(0.05 if self.drifted.is_set() else 0.25)

    def latest(self) -> int | None:
        return self.answers[-1][1] if self.answers else None

    def wait_for_version(self, version: int, timeout: float = 60) -> float:
        """Until a request answered after now comes from `version`; returns when it did."""
        asked = time.monotonic()
        deadline = asked + timeout
        while time.monotonic() < deadline:
            answered = [(t, v) for t, v in self.answers if t > asked]
            if answered and answered[-1][1] == version:
                return answered[-1][0]
            time.sleep(0.2)
        raise AssertionError(f"requests were still answered by {self.latest()}, not {version}")


def _start_server(
    models_config: Path, request_log: Path, log: Path
) -> tuple[subprocess.Popen, int]:
    """`tumorflow serve` as a user starts it, following models.config."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tumorflow.cli.main",
            "serve",
            "--port",
            str(port),
            "--rest_api_port",
            "0",
            "--model_config_file",
            str(models_config),
            "--model_config_file_poll_wait_seconds",
            "1",
            "--file_system_poll_wait_seconds",
            "1",
            "--request_log_dir",
            str(request_log),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    deadline = time.monotonic() + 120
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = model_service_pb2_grpc.ModelServiceStub(channel)
                if stub.GetModelStatus(request, timeout=2).model_version_status:
                    return server, port
        except grpc.RpcError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError(f"tumorflow serve did not come up: {log.read_text()[-3000:]}")


def _labelled_version(port: int, label: str) -> int:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.model_spec.version_label = label
        request.inputs["image_bytes"].CopyFrom(
            tf.make_tensor_proto([_png(np.full((48, 48), 100, np.uint8))])
        )
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return stub.Predict(request, timeout=30).model_spec.version.value


def _logged_requests(folder: Path) -> int:
    """Rows in the request log's part files so far (a part being written counts once done)."""
    import pyarrow.parquet as pq

    rows = 0
    for part in folder.rglob("part-*.parquet"):
        with contextlib.suppress(OSError, ValueError):
            rows += pq.ParquetFile(part).metadata.num_rows
    return rows


def _logged_requests_between(folder: Path, start: str, end: str) -> int:
    """Rows of the request log's finished part files whose timestamp is in [start, end)."""
    import pandas as pd

    begin, stop = pd.Timestamp(start), pd.Timestamp(end)
    rows = 0
    for part in folder.rglob("part-*.parquet"):
        with contextlib.suppress(OSError, ValueError):
            stamps = pd.to_datetime(
                pd.read_parquet(part, columns=["timestamp"])["timestamp"], utc=True
            )
            rows += int(((stamps >= begin) & (stamps < stop)).sum())
    return rows


def _cached(summary: RunSummary) -> set[str]:
    """The steps this run reused: kfp.local leaves no folder in the run for a cache hit."""
    steps = {"dataset-version", "download", "validate-and-split", "train", "evaluate"}
    return {step for step in steps if not (summary.run_dir / step).exists()}


def _split_images(summary: RunSummary, split: str | None = None) -> int:
    """Images in the run's splits (in `split` alone when given)."""
    from tumorflow.pipelines.run_folder import RunFolder

    manifest = RunFolder(Path(summary.run_dir)).artifact("validate-and-split", "split")
    splits = json.loads((manifest / "split_manifest.json").read_text())["splits"]
    return sum(
        sum(info["class_counts"].values()) for name, info in splits.items() if split in (None, name)
    )


def _drift_verdict(summary: RunSummary) -> dict:
    """The verdict of the run's drift report (new training data vs the model served then)."""
    from tumorflow.pipelines.run_folder import RunFolder

    verdict = RunFolder(Path(summary.run_dir)).artifact("drift-report", "verdict")
    return json.loads((verdict / "verdict.json").read_text())


def _reject_when_waiting(
    tracking_uri: str, run_root: Path, timeout: float = 600
) -> threading.Thread:
    """A reviewer who rejects the candidate that waits for approval, as soon as it waits (signed
    with the key the first run made under the run root)."""
    import mlflow

    from tumorflow.cli.main import main

    def reviewer() -> None:
        client = mlflow.MlflowClient(tracking_uri)

        def waiting() -> str | None:
            for version in client.search_model_versions(f"name = '{MODEL}'"):
                if version.tags.get("approval.status") == "pending":
                    return version.tags["tumorflow.pipeline_run"]
            return None

        run = wait_until(waiting, timeout, "a run waiting for approval", interval=0.5)
        main(
            [
                "reject",
                run,
                "--reason",
                "new scanner, not validated",
                "--tracking-uri",
                tracking_uri,
                "--run-root",
                str(run_root),
            ]
        )

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    return thread


def test_five_days_of_the_production_loop(tmp_path: Path, mlflow_server: str):
    import mlflow

    from tumorflow.cli.main import main

    data, run_root = tmp_path / "data", tmp_path / "runs"
    _phantom(data, seed=1)
    config = _config(run_root, data, mlflow_server)
    base = Path(config.resolved_model_base_path())
    requests = tmp_path / "requests"
    registry = mlflow.MlflowClient(mlflow_server)
    timeline: list[str] = []

    # day 1: the first model
    day1 = run_local(config)
    assert day1.deployed_version == 1
    # signing is on: the first run made a throwaway trust root, and v1 carries its signed release
    release = json.loads((base / MODEL / "1" / "assets.extra" / "release.json").read_text())
    assert release["records"][0]["record"]["action"] == "auto_approve"
    assert day1.dataset_version and day1.dataset_version.startswith("sha256:")
    # nothing was served when its drift report ran (kfp.local may not run it after deploy)
    assert _drift_verdict(day1)["reference_rows"] == 0
    timeline.append(f"day 1: trained on {_split_images(day1)} images, deployed v1")

    server, port = _start_server(base / "models.config", requests, tmp_path / "serve.log")
    client = Client(port)
    calls = threading.Thread(target=client.run, daemon=True)
    calls.start()
    try:
        client.wait_for_version(1)

        # day 2: the same data; everything up to the model is reused, nothing new is served
        day2 = run_local(config)
        assert day2.dataset_version == day1.dataset_version
        assert {"download", "validate-and-split", "train", "evaluate"} <= _cached(day2)
        assert "dataset-version" not in _cached(day2)
        assert day2.deployed_version is None
        assert "identical" in (day2.deploy_note or "")
        assert sorted(p.name for p in (base / MODEL).iterdir() if p.name.isdigit()) == ["1"]
        timeline.append(f"day 2: same data, all cached; {day2.deploy_note}")

        # day 3: new images arrive in the same folder
        _phantom(data, seed=2, number_offset=1000)
        day3 = run_local(config)
        assert day3.dataset_version != day1.dataset_version
        assert not {"download", "validate-and-split", "train"} & _cached(day3)
        assert _split_images(day3) > _split_images(day1)
        assert day3.gate["champion_version"] == "1"  # gated against v1 on the new test split
        assert day3.deployed_version == 2
        # the new training split against v1's reference (v1's training split), not against v2
        drift3 = _drift_verdict(day3)
        assert drift3["reference_rows"] == _split_images(day1, "train")
        assert drift3["current_rows"] == _split_images(day3, "train") > drift3["reference_rows"]
        client.wait_for_version(2)
        timeline.append(
            f"day 3: {_split_images(day3)} images (new data), gated against v1, deployed v2"
        )

        # day 4: the model's policy is manual; drifted requests start a retraining that waits
        # for a person, who rejects it
        assert (
            main(["policy", "set", MODEL, "--approval", "manual", "--run-root", str(run_root)]) == 0
        )
        drift_started, logged = time.time(), _logged_requests(requests)
        client.drifted.set()
        # enough drifted requests in the request log for the recent window: a sample, not a time
        wait_until(
            lambda: _logged_requests(requests) >= logged + 150,
            180,
            "150 drifted requests in the request log",
            interval=0.5,
        )
        window_hours = (time.time() - drift_started - 1) / 3600
        reviewer = _reject_when_waiting(mlflow_server, run_root)
        auto_run = config.model_copy(deep=True)
        auto_run.gate.approval = "auto"  # a run's own config cannot lower the model's policy
        auto_run.drift.window_hours = window_hours
        day4 = run_local(auto_run, monitor_source=str(requests))
        reviewer.join(timeout=60)
        assert day4.trigger_reason and day4.trigger_reason.startswith("drift detected")
        assert day4.run_name.startswith("tumorflow-monitor-")
        trigger = json.loads(
            (day4.run_dir / "drift-check" / "verdict" / "trigger.json").read_text()
        )
        assert trigger["reason"] == day4.trigger_reason
        # the window slides with the check's own clock: its rows are the log's rows in that
        # window (a part still open at the check may have added some since), never a made-up count
        in_window = _logged_requests_between(requests, *trigger["window"])
        assert 2 <= trigger["current_rows"] <= in_window, (trigger["current_rows"], in_window)
        assert day4.gate is not None, "the retraining DAG did not run"
        assert day4.approval["status"] == "rejected"
        rejected = [
            v
            for v in registry.search_model_versions(f"name = '{MODEL}'")
            if v.tags.get("approval.status") == "rejected"
        ]
        assert len(rejected) == 1
        assert rejected[0].tags["tumorflow.trigger_reason"] == day4.trigger_reason
        assert rejected[0].tags["approval.policy"] == "manual"
        assert "decision.1.reject" in rejected[0].tags
        assert day4.deployed_version is None
        labels = registry.get_registered_model(MODEL).aliases
        assert (
            labels["champion"]
            == registry.search_model_versions(f"name = '{MODEL}' and tags.`serving_version` = '2'")[
                0
            ].version
        )
        assert client.latest() == 2
        client.drifted.clear()
        timeline.append(
            f"day 4: {day4.trigger_reason.split(':')[0]}; retraining rejected, v2 stays"
        )

        # day 5: a rollback; every request moves, labelled or not
        assert (
            main(
                [
                    "rollback",
                    "--model-name",
                    MODEL,
                    "--model-base-path",
                    str(base),
                    "--tracking-uri",
                    mlflow_server,
                    "--run-root",
                    str(run_root),
                ]
            )
            == 0
        )
        moved = client.wait_for_version(1)
        assert _labelled_version(port, "stable") == 1
        wait_until(lambda: sum(t > moved for t, _ in client.answers) >= 10, 60, "10 more answers")
        assert {v for t, v in client.answers if t > moved} == {1}
        timeline.append("day 5: rollback; unlabelled and `stable` requests answered by v1")
    finally:
        client.stop.set()
        calls.join(timeout=60)
        server.terminate()
        server.wait(timeout=30)

    assert client.failures == []
    assert len(client.answers) > 100
    by_version = {v: sum(1 for _, seen in client.answers if seen == v) for v in (1, 2)}
    timeline.append(
        f"client: {len(client.answers)} requests naming no version, 0 failed; answered by "
        f"v1 {by_version[1]}, v2 {by_version[2]}"
    )
    (tmp_path / "timeline.txt").write_text("\n".join(timeline) + "\n")
    print("\n".join(timeline))
