"""`tumorflow bench serving`: gRPC Predict vs the in-process call and the seeds' Flask endpoint.

One process tree, one exported model, the same images: (a) the in-process signature call at
batch 1 and at batch 32 (the ceiling batching can reach, measured before and after the gRPC runs
so that both sides see the same machine), (b) gRPC Predict at batch 1 with 1, 8 and 32 concurrent
clients against `tumorflow serve` with batching on (a subprocess), (c) a Flask endpoint taking
base64 JSON that decodes with PIL and calls `model.predict` per request (the seeds' design, a
subprocess), (d) gRPC's own cost without a model: `tumorflow serve`'s grpcio setup answering
every Predict at once with a fixed answer (a subprocess; 1 client, and 32). The single-client
rows (the in-process call, gRPC, gRPC with the request log on, the empty Predict) take turns call
by call, so that the overheads they give see the same load. Every server is up before anything
is measured; every loop is bounded in requests and seconds; everything listens on loopback. The
summary compares rows of the same run with the server's three targets (throughput at 32 clients
as a share of the batch-32 ceiling, batch-1 p50 over the in-process call, p99 at 32 clients over
the batch-32 call's p99), then with the request log's and the Flask baseline's, and says PASS or
MISS for each. From the empty Predict rows it prints what gRPC alone costs, and so the most that
any server behind Python's gRPC could reach with its clients on the same cores.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorflow.components.data.synthetic import encode_image
from tumorflow.components.training.backbones import BACKBONES
from tumorflow.core.artifacts import MODEL_FILE, MODEL_INFO_FILE
from tumorflow.core.errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_NAME = "bench"
CONCURRENCY = (1, 8, 32)
INPROCESS = "in-process call, batch 1"
SINGLE = "gRPC Predict, 1 client(s)"
LOGGED = "gRPC Predict, 1 client, request log on"
FLOOR_SINGLE = "gRPC empty Predict, 1 client"
FLOOR_MANY = f"gRPC empty Predict, {CONCURRENCY[-1]} clients"
FLASK_CLIENTS = 8
CEILING = "in-process call, batch 32 (ceiling)"
# The server's targets: 32 clients get this share of the model's own batch-32 throughput; gRPC
# adds at most this p50 to a batch-1 call; p99 under 32 clients is at most this multiple of the
# batch-32 call's p99; request logging adds at most this p50; this multiple of the Flask baseline.
MIN_CEILING_SHARE = 0.85
MAX_GRPC_OVERHEAD_MS = 1.5
MAX_P99_RATIO = 2.0
MAX_LOGGING_MS = 1.0
MIN_FLASK_RATIO = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a model folder of the train step (model.keras + model_info.json), e.g. "
        "runs/pipeline_root/<run>/train/model; default: an untrained --backbone built here",
    )
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="custom_cnn",
        help="backbone of the model built here without --model-dir (default custom_cnn)",
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement")
    parser.add_argument("--images", type=int, default=16, help="distinct test images")
    parser.add_argument(
        "--image-size", type=int, default=96, help="input size of the model built here (default 96)"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time cap per measurement")


@dataclass
class Measurement:
    name: str
    latencies: list[float]
    wall: float
    images_per_call: int = 1
    # CPU seconds per wall second (cores busy) of the clients (this process) and of the server
    # process, during a gRPC measurement; for the ceiling, client_cores is this process's while
    # it calls the model; None elsewhere.
    client_cores: float | None = None
    server_cores: float | None = None

    @property
    def throughput(self) -> float:
        """Images per second."""
        return len(self.latencies) * self.images_per_call / self.wall if self.wall else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")

    def __add__(self, other: Measurement) -> Measurement:
        """Two runs of the same measurement as one (calls, latencies and time added up; cores
        busy averaged over the time)."""

        def cores(mine: float | None, theirs: float | None) -> float | None:
            if mine is None or theirs is None:
                return None
            return (mine * self.wall + theirs * other.wall) / (self.wall + other.wall)

        return Measurement(
            self.name,
            self.latencies + other.latencies,
            self.wall + other.wall,
            self.images_per_call,
            cores(self.client_cores, other.client_cores),
            cores(self.server_cores, other.server_cores),
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _default_model_folder(folder: Path, backbone: str, image_size: int) -> Path:
    """An untrained classifier (random weights: speed does not depend on them) saved as the train
    step saves its model folder."""
    import keras

    from tumorflow.components.training.backbones import build_classifier

    keras.utils.set_random_seed(0)
    model, _ = build_classifier(backbone, 4, image_size, "none", 0.0)
    folder.mkdir(parents=True)
    model.save(folder / MODEL_FILE)
    info = {
        "backbone": backbone,
        "weights": "none",
        "image_size": [image_size, image_size],
        "classes": ["cyst", "normal", "stone", "tumor"],
    }
    (folder / MODEL_INFO_FILE).write_text(json.dumps(info))
    return folder


def _images(count: int) -> list[bytes]:
    """`count` random 128-px RGB PNGs (what the model makes of them does not matter for speed)."""
    rng = np.random.default_rng(0)
    return [
        encode_image(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "PNG")
        for _ in range(count)
    ]


def _measure(
    name: str,
    call: Callable[[int, bytes], None],
    images: list[bytes],
    total: int,
    clients: int,
    cap: float,
) -> Measurement:
    """Run `total` calls split over `clients` threads (each stops at the time cap)."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + cap

    def client(index: int) -> None:
        own = []
        for n in range(index, total, clients):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            call(index, images[n % len(images)])
            own.append(time.perf_counter() - start)
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Measurement(name, latencies, time.perf_counter() - start)


def _alternate(
    calls: dict[str, Callable[[bytes], object]], images: list[bytes], total: int, cap: float
) -> dict[str, Measurement]:
    """`total` calls of each callable from one client, taking turns call by call: on a shared
    machine the load changes within seconds, and latencies compared with each other must see the
    same load. Throughput is what that one client gets: calls over the time spent in them. Each
    callable is called once first, unmeasured (a channel connects on its first call)."""
    for call in calls.values():
        call(images[0])
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.monotonic() + cap
    for n in range(total):
        if time.monotonic() > deadline:
            break
        for name, call in calls.items():
            start = time.perf_counter()
            call(images[n % len(images)])
            latencies[name].append(time.perf_counter() - start)
    return {name: Measurement(name, own, sum(own)) for name, own in latencies.items()}


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with log.open("w") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def _wait_ready(
    check: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"benchmark server exited early; its log:\n{log.read_text()[-2000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise ConfigError(f"benchmark server did not start within {timeout:.0f}s; see {log}")


def flask_baseline_app(model_dir: str):
    """The seeds' endpoint: base64 JSON in, PIL decode and `model.predict` per request."""
    import keras
    from flask import Flask, jsonify, request
    from PIL import Image

    model = keras.saving.load_model(Path(model_dir) / MODEL_FILE)
    height, width = model.input_shape[1:3]
    app = Flask("baseline")

    @app.post("/predict")
    def predict():
        data = base64.b64decode(request.get_json()["image"])
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((width, height))
        batch = np.asarray(image, dtype="float32")[np.newaxis]
        return jsonify({"scores": model.predict(batch, verbose=0)[0].tolist()})

    app.add_url_rule("/health", "health", lambda: "ok")
    return app


def grpc_floor_server(port: int, response_file: str) -> None:
    """gRPC's own cost, with no model: `tumorflow serve`'s grpcio setup (`grpc_server`) answering
    every Predict with the real server's answer to one request, which the benchmark writes to
    `response_file` before its first call (read then, once)."""
    from functools import cache

    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tumorflow.serving.server import ServerOptions, grpc_server

    @cache
    def response() -> predict_pb2.PredictResponse:
        return predict_pb2.PredictResponse.FromString(Path(response_file).read_bytes())

    class Floor(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return response()

    server = grpc_server(ServerOptions())
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def run(args: argparse.Namespace) -> int:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tumorflow.components.training.export import export_serving_model

    if args.requests < 1 or args.images < 1:
        raise ConfigError("--requests and --images must be positive")
    work = Path(tempfile.mkdtemp(prefix="tumorflow-bench-"))
    model_dir = args.model_dir or _default_model_folder(
        work / "model", args.backbone, args.image_size
    )
    if not (Path(model_dir) / MODEL_FILE).exists():
        raise ConfigError(f"{model_dir} is not a model folder of the train step (no model.keras)")
    version_dir = work / "models" / MODEL_NAME / "1"
    export_serving_model(Path(model_dir), version_dir, model_name=MODEL_NAME)
    images = _images(args.images)
    cap = args.max_seconds
    results: list[Measurement] = []

    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    for image in images:
        signature(image_bytes=tf.constant([image]))
    # What batching can reach at best: the model's own throughput on full batches of 32.
    full_batch = tf.constant([images[n % len(images)] for n in range(32)])

    def measure_ceiling() -> Measurement:
        own = time.process_time()
        ceiling = _measure(
            CEILING,
            lambda _, b: signature(image_bytes=full_batch),
            images,
            max(args.requests // 32, 4),
            1,
            cap,
        )
        ceiling.images_per_call = 32
        ceiling.client_cores = (time.process_time() - own) / ceiling.wall
        return ceiling

    port = _free_port()
    batching = work / "batching.config"
    batching.write_text(
        "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 0 }\n"
        "max_enqueued_batches { value: 1000 }\nnum_batch_threads { value: 2 }\n"
    )

    def start_server(port: int, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        log_path = work / f"{name}.log"
        argv = [
            sys.executable,
            "-m",
            "tumorflow.cli.main",
            "serve",
            "--backend=inprocess",
            f"--port={port}",
            "--rest_api_port=0",
            f"--model_name={MODEL_NAME}",
            f"--model_base_path={version_dir.parent}",
            "--enable_batching",
            f"--batching_parameters_file={batching}",
            "--file_system_poll_wait_seconds=30",
            *extra,
        ]
        return _start(argv, log_path), log_path

    server, server_log = start_server(port, "server")
    logged_port = _free_port()
    logged, logged_log = start_server(
        logged_port, "server-logged", f"--request_log_dir={work / 'requests'}"
    )
    floor_port = _free_port()
    floor_log = work / "floor.log"
    floor_response = work / "floor-response.pb"
    floor = _start(
        [
            sys.executable,
            "-m",
            "tumorflow.bench.serving",
            "--grpc-floor",
            str(floor_port),
            str(floor_response),
        ],
        floor_log,
    )
    flask_port = _free_port()
    flask_log = work / "flask.log"
    flask = _start(
        [sys.executable, "-m", "tumorflow.bench.serving", str(model_dir), str(flask_port)],
        flask_log,
    )
    try:

        def flask_ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{flask_port}/health", timeout=2) as r:
                return r.status == 200

        # All three servers load before anything is measured: a server still importing
        # TensorFlow would take the CPU from the measurements.
        _wait_ready(lambda: _grpc_ready(port), server, server_log)
        _wait_ready(lambda: _grpc_ready(logged_port), logged, logged_log)
        _wait_ready(flask_ready, flask, flask_log)
        _wait_ready(lambda: _connects(floor_port), floor, floor_log)
        ceiling = measure_ceiling()
        # Requests are built once, as a client that reuses its protos would: the clients share
        # the two cores with the server, and what is measured is the server.
        requests = {}
        for data in images:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MODEL_NAME
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([data], dtype=tf.string))
            requests[data] = request
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                requests[images[0]], timeout=30
            )
        floor_response.write_bytes(answer.SerializeToString())

        def measure_grpc(
            target_port: int, clients: int, name: str, process: subprocess.Popen = server
        ) -> Measurement:
            channels = [grpc.insecure_channel(f"127.0.0.1:{target_port}") for _ in range(clients)]
            stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]

            def grpc_call(client: int, data: bytes) -> None:
                stubs[client].Predict(requests[data], timeout=30)

            for client in range(clients):
                grpc_call(client, images[client % len(images)])
            try:
                own, served = time.process_time(), _cpu_seconds(process.pid)
                measured = _measure(name, grpc_call, images, args.requests, clients, cap)
                measured.client_cores = (time.process_time() - own) / measured.wall
                measured.server_cores = (_cpu_seconds(process.pid) - served) / measured.wall
                return measured
            finally:
                for channel in channels:
                    channel.close()

        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            grpc.insecure_channel(f"127.0.0.1:{logged_port}") as logged_channel,
            grpc.insecure_channel(f"127.0.0.1:{floor_port}") as floor_channel,
        ):
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            logged_stub = prediction_service_pb2_grpc.PredictionServiceStub(logged_channel)
            floor_stub = prediction_service_pb2_grpc.PredictionServiceStub(floor_channel)
            single = _alternate(
                {
                    INPROCESS: lambda b: signature(image_bytes=tf.constant([b])),
                    SINGLE: lambda b: stub.Predict(requests[b], timeout=30),
                    LOGGED: lambda b: logged_stub.Predict(requests[b], timeout=30),
                    FLOOR_SINGLE: lambda b: floor_stub.Predict(requests[b], timeout=30),
                },
                images,
                args.requests,
                cap,
            )
        grpc_runs = [
            measure_grpc(port, clients, f"gRPC Predict, {clients} client(s)")
            for clients in CONCURRENCY[1:]
        ]
        results += [single[INPROCESS], ceiling + measure_ceiling(), single[SINGLE], *grpc_runs]
        results.append(single[LOGGED])
        results.append(single[FLOOR_SINGLE])
        results.append(measure_grpc(floor_port, CONCURRENCY[-1], FLOOR_MANY, floor))

        def flask_call(_: int, data: bytes) -> None:
            body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{flask_port}/predict",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()

        flask_call(0, images[0])
        results.append(
            _measure(
                f"Flask baseline, {FLASK_CLIENTS} clients",
                flask_call,
                images,
                max(args.requests // 2, 1),
                FLASK_CLIENTS,
                cap,
            )
        )
    finally:
        _stop(server)
        _stop(logged)
        _stop(flask)
        _stop(floor)
    _report(results)
    return 0


def _grpc_ready(port: int) -> bool:
    """Whether the server answers GetModelStatus for the benchmark model with a loaded version."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=2)
        except grpc.RpcError:
            return False
    return True


def _connects(port: int) -> bool:
    """Whether a gRPC channel to `port` on loopback connects within 2 s."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
        except grpc.FutureTimeoutError:
            return False
    return True


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process `pid` so far, all its threads (Linux /proc; NaN
    where there is none, and the line that uses it says nan)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # after the command: state is field 3, utime and stime fields 14 and 15 (proc(5))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report(results: list[Measurement]) -> None:
    print(f"{'measurement':40s} {'calls':>6s} {'p50 ms':>9s} {'p99 ms':>9s} {'images/s':>9s}")
    for m in results:
        print(
            f"{m.name:40s} {len(m.latencies):6d} {m.percentile(50):9.2f} {m.percentile(99):9.2f} {m.throughput:9.1f}"
        )
    rows = {m.name: m for m in results}
    inprocess, ceiling, single = rows[INPROCESS], rows[CEILING], rows[SINGLE]
    many = rows[f"gRPC Predict, {CONCURRENCY[-1]} client(s)"]
    flask = rows[f"Flask baseline, {FLASK_CLIENTS} clients"]
    print("\nthe server's targets (rows of this run):")
    share = many.throughput / ceiling.throughput
    _verdict(
        f"gRPC {CONCURRENCY[-1]} clients / batch-32 ceiling throughput:",
        share,
        "",
        f">= {MIN_CEILING_SHARE:.2f}",
        share >= MIN_CEILING_SHARE,
        detail=f"= {many.throughput:.0f} / {ceiling.throughput:.0f} images/s",
    )
    gap = single.percentile(50) - inprocess.percentile(50)
    _verdict(
        "gRPC batch-1 p50 - in-process p50:",
        gap,
        " ms",
        f"<= {MAX_GRPC_OVERHEAD_MS} ms",
        gap <= MAX_GRPC_OVERHEAD_MS,
        signed=True,
        detail=f"= {single.percentile(50) / inprocess.percentile(50):.2f}x in-process",
    )
    if FLOOR_SINGLE in rows:
        print(
            f"  of it, gRPC's own round trip (no model, taking turns with the rows above): "
            f"{rows[FLOOR_SINGLE].percentile(50):.2f} ms p50"
        )
    if many.client_cores is not None and many.server_cores is not None:
        # The ceiling is the model alone on every core; here the clients share them. What is
        # left to the server bounds what it can reach (printed, not a target).
        cores = os.cpu_count() or 1
        left = max(cores - many.client_cores, 0.0) / cores
        print(
            f"  where the CPU went ({CONCURRENCY[-1]} clients, {cores} cores): the clients "
            f"{many.client_cores:.2f} cores, the server {many.server_cores:.2f}; with the "
            f"cores the clients left, the ceiling is {ceiling.throughput * left:.0f} images/s "
            f"and the server reached {share / left if left else float('nan'):.2f} of it"
        )
    floor = rows.get(FLOOR_MANY)
    if floor is not None and floor.client_cores is not None and floor.server_cores is not None:
        # gRPC alone (clients and server, no model) costs this much CPU per request; the model
        # costs at least its ceiling row's CPU per image (all cores, or fewer where the ceiling
        # kept fewer busy). No server behind this gRPC stack, with its clients on these cores,
        # can pass cores / (both). Printed, not a target: it says whether 0.85 is within reach.
        cores = os.cpu_count() or 1
        grpc_cost = (floor.client_cores + floor.server_cores) / floor.throughput
        model_cores = min(cores, ceiling.client_cores or cores)
        model_cost = model_cores / ceiling.throughput
        bound = cores / (model_cost + grpc_cost)
        print(
            f"  gRPC's own cost ({FLOOR_MANY}, no model): {grpc_cost * 1000:.2f} core-ms per "
            f"request, clients and server; with the model's {model_cost * 1000:.2f} core-ms "
            f"per image in the ceiling row, no server behind Python's gRPC with its clients on "
            f"these {cores} cores can pass {bound:.0f} images/s = {bound / ceiling.throughput:.2f}"
            f" of the ceiling; the server reached {many.throughput / bound:.2f} of that"
        )
    tail = many.percentile(99) / ceiling.percentile(99)
    _verdict(
        f"gRPC {CONCURRENCY[-1]} clients p99 / batch-32 call p99:",
        tail,
        "x",
        f"<= {MAX_P99_RATIO:.0f}x",
        tail <= MAX_P99_RATIO,
        detail=f"= {many.percentile(99):.1f} / {ceiling.percentile(99):.1f} ms",
    )
    print("\nand the earlier targets:")
    logged = rows[LOGGED]
    cost = logged.percentile(50) - single.percentile(50)
    _verdict(
        "request logging for drift adds (p50):",
        cost,
        " ms",
        f"< {MAX_LOGGING_MS:.0f} ms",
        cost < MAX_LOGGING_MS,
        signed=True,
    )
    ratio = many.throughput / flask.throughput
    _verdict(
        f"gRPC {CONCURRENCY[-1]} clients / Flask baseline throughput:",
        ratio,
        "x",
        f">= {MIN_FLASK_RATIO:.0f}x",
        ratio >= MIN_FLASK_RATIO,
    )


def _verdict(
    label: str,
    value: float,
    unit: str,
    target: str,
    passed: bool,
    signed: bool = False,
    detail: str = "",
) -> None:
    """One summary line: the figure, how it was made, its target, PASS or MISS."""
    figure = f"{value:+.2f}" if signed else f"{value:.2f}"
    print(
        f"{label:50s} {figure:>7s}{unit:3s} {detail:28s} (target {target}): "
        f"{'PASS' if passed else 'MISS'}"
    )


if __name__ == "__main__":
    if sys.argv[1] == "--grpc-floor":
        grpc_floor_server(int(sys.argv[2]), sys.argv[3])
    else:
        flask_baseline_app(sys.argv[1]).run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
