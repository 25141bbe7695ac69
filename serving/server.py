"""The model server: TF Serving's flags in, its gRPC and REST APIs out, in-process or via the binary.

`ServerOptions` mirrors `tensorflow_model_server`'s flags. `ModelServer` runs the repository,
the batch scheduler, the gRPC services and the REST API in this process. Where the real binary
exists (or `backend="tfserving"`), `tfserving_argv` builds its command line from the same
options. Unlike TF Serving, which binds every interface, this server binds loopback unless
`host` says otherwise. `--model_config_file` may be a `gs://` URI, as for TF Serving: it is read
(and re-read every `--model_config_file_poll_wait_seconds`) through `core.storage`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tumorflow.components.release.trust_root import TrustRoot
from tumorflow.core import storage
from tumorflow.core.config import DriftConfig
from tumorflow.core.errors import ConfigError
from tumorflow.core.serving_layout import TRUST_ROOT_FILE
from tumorflow.serving.batching import BatchingParameters, BatchScheduler
from tumorflow.serving.grpc_api import ModelServicer, PredictionServicer
from tumorflow.serving.inference import InferenceService, RequestLog
from tumorflow.serving.prometheus import PROMETHEUS_PATH, ServerMetrics
from tumorflow.serving.repository import (
    ModelRepository,
    ModelServerConfig,
    read_model_config,
    single_model_config,
)
from tumorflow.serving.rest_api import RestServer

logger = logging.getLogger(__name__)

TFSERVING_BINARY = "tensorflow_model_server"


@dataclass
class ServerOptions:
    """The flags of `tumorflow serve`, named as `tensorflow_model_server` names them."""

    port: int = 8500
    rest_api_port: int = 8501
    host: str = "127.0.0.1"
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0.0
    file_system_poll_wait_seconds: float = 1.0
    enable_batching: bool = False
    batching_parameters_file: str = ""
    grpc_max_threads: int = 64
    grpc_max_concurrent_rpcs: int = 1024
    rest_api_num_threads: int = 16
    max_receive_message_length: int = 64 * 1024 * 1024
    request_log_dir: str = ""
    request_log_sample_rate: float = DriftConfig().request_sample_rate
    # Seeds the request log's sampling (not a TF Serving flag: for reproducible runs and tests).
    request_log_seed: int | None = None
    backend: str = "auto"
    # The trust root release records are checked against (not a TF Serving flag). Empty: the
    # trust_root.yaml beside --model_config_file or up to two folders above it (a local run's);
    # "none": no check.
    trust_root: str = ""

    def trust(self) -> TrustRoot | None:
        """The trust root versions must be released under, or None (no check)."""
        if self.trust_root == "none":
            logger.warning("--trust_root none: versions load without a signed release record")
            return None
        if self.trust_root:
            return TrustRoot.load(self.trust_root)
        if self.model_config_file and not storage.is_remote(self.model_config_file):
            folder = Path(self.model_config_file).resolve().parent
            for candidate in (folder, folder.parent, folder.parent.parent):
                if (candidate / TRUST_ROOT_FILE).is_file():
                    return TrustRoot.load(candidate / TRUST_ROOT_FILE)
        logger.warning(
            "no trust root: versions load without a signed release record (--trust_root FILE)"
        )
        return None

    def model_config(self) -> ModelServerConfig:
        """The ModelServerConfig these options describe (config file, or name + base path)."""
        if self.model_config_file and self.model_base_path:
            raise ConfigError("give either --model_config_file or --model_base_path, not both")
        if self.model_config_file:
            return read_model_config(self.model_config_file)
        if not self.model_base_path:
            raise ConfigError("give --model_base_path (with --model_name) or --model_config_file")
        return single_model_config(self.model_name, self.model_base_path)

    def batching_parameters(self) -> BatchingParameters:
        if self.batching_parameters_file:
            return BatchingParameters.from_file(self.batching_parameters_file)
        return BatchingParameters()


def use_tfserving(options: ServerOptions) -> str | None:
    """Path of `tensorflow_model_server` when it should run instead of the in-process server."""
    binary = shutil.which(TFSERVING_BINARY)
    if options.backend == "inprocess":
        return None
    if options.trust_root != "none" and options.trust() is not None:
        if options.backend == "tfserving":
            raise ConfigError(
                f"{TFSERVING_BINARY} cannot check signed release records: use --backend "
                "inprocess, or --trust_root none to serve unsigned versions"
            )
        return None
    if options.backend == "tfserving" and binary is None:
        raise ConfigError(f"--backend tfserving needs {TFSERVING_BINARY} on PATH; it was not found")
    return binary


MONITORING_CONFIG = f'prometheus_config {{ enable: true, path: "{PROMETHEUS_PATH}" }}\n'


def tfserving_argv(
    options: ServerOptions, binary: str = TFSERVING_BINARY, monitoring_config_file: str = ""
) -> list[str]:
    """The `tensorflow_model_server` command line equivalent to these options.

    `monitoring_config_file` (holding `MONITORING_CONFIG`) turns on its Prometheus endpoint.
    """
    argv = [binary, f"--port={options.port}", f"--rest_api_port={options.rest_api_port}"]
    if options.model_config_file:
        argv.append(f"--model_config_file={options.model_config_file}")
        if options.model_config_file_poll_wait_seconds:
            argv.append(
                f"--model_config_file_poll_wait_seconds={int(options.model_config_file_poll_wait_seconds)}"
            )
    else:
        argv += [
            f"--model_name={options.model_name}",
            f"--model_base_path={options.model_base_path}",
        ]
    argv.append(f"--file_system_poll_wait_seconds={int(options.file_system_poll_wait_seconds)}")
    if options.enable_batching:
        argv.append("--enable_batching=true")
        if options.batching_parameters_file:
            argv.append(f"--batching_parameters_file={options.batching_parameters_file}")
    argv += [
        f"--grpc_max_threads={options.grpc_max_threads}",
        f"--rest_api_num_threads={options.rest_api_num_threads}",
        "--grpc_channel_arguments="
        f"grpc.max_receive_message_length={options.max_receive_message_length}",
    ]
    if monitoring_config_file:
        argv.append(f"--monitoring_config_file={monitoring_config_file}")
    return argv


def _request_log(options: ServerOptions, repository: ModelRepository) -> RequestLog | None:
    if not options.request_log_dir:
        return None
    if not 0.0 <= options.request_log_sample_rate <= 1.0:
        raise ConfigError("--request_log_sample_rate must be between 0 and 1")
    from tumorflow.serving.request_log import RequestLogger

    return RequestLogger(
        options.request_log_dir,
        sample_rate=options.request_log_sample_rate,
        model_dir_lookup=repository.local_version_dir,
        seed=options.request_log_seed,
    )


def grpc_server(options: ServerOptions) -> grpc.Server:
    """A grpcio server (no services, no port yet) set up as `tumorflow serve` sets up its own:
    the handler thread pool, message size limits, the cap on concurrent RPCs."""
    limit = options.max_receive_message_length
    return grpc.server(
        ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=options.grpc_max_concurrent_rpcs,
    )


class ModelServer:
    """The in-process TF-Serving-compatible server: repository, batching, gRPC and REST."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        config = options.model_config()
        self._config_text = str(config)
        self.metrics = ServerMetrics()
        self.repository = ModelRepository(
            config, poll_wait_seconds=options.file_system_poll_wait_seconds, trust=options.trust()
        )
        scheduler = None
        if options.enable_batching:
            scheduler = BatchScheduler(
                options.batching_parameters(), on_batch=self.metrics.observe_batch
            )
        self.service = InferenceService(
            self.repository, self.metrics, scheduler, _request_log(options, self.repository)
        )
        self._grpc: grpc.Server | None = None
        self._rest: RestServer | None = None
        self._stopped = threading.Event()
        self.grpc_port = 0
        self.rest_port = 0

    def start(self) -> None:
        """Load the models present now, then open the gRPC (and REST) ports."""
        self.repository.start()
        limit = self.options.max_receive_message_length
        self._grpc = grpc_server(self.options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.service), self._grpc
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.service), self._grpc
        )
        address = f"{self.options.host}:{self.options.port}"
        try:
            self.grpc_port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind the gRPC port {address}: {exc}") from exc
        self._grpc.start()
        logger.info("gRPC API (tensorflow.serving) at %s:%d", self.options.host, self.grpc_port)
        if self.options.rest_api_port:
            try:
                self._rest = RestServer(
                    (self.options.host, self.options.rest_api_port),
                    self.service,
                    num_threads=self.options.rest_api_num_threads,
                    max_body_bytes=limit,
                )
            except OSError as exc:
                self.stop()
                raise ConfigError(
                    f"cannot bind the REST port {self.options.host}:{self.options.rest_api_port}: {exc}"
                ) from exc
            self._rest.start()
            self.rest_port = self._rest.port
            logger.info(
                "REST API at http://%s:%d/v1/models, metrics at %s",
                self.options.host,
                self.rest_port,
                PROMETHEUS_PATH,
            )
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            threading.Thread(target=self._watch_config, name="config-watch", daemon=True).start()

    def _watch_config(self) -> None:
        """Re-read --model_config_file (local or gs://) every poll interval, as TF Serving does:
        new labels and version sets are applied; an unreadable or invalid file keeps the last."""
        path = self.options.model_config_file
        while not self._stopped.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                config = read_model_config(path)
                if str(config) != self._config_text:
                    self._config_text = str(config)
                    self.repository.reload_config(config)
            except ConfigError as exc:
                logger.error("keeping the previous model config: %s", exc)

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, let in-flight ones finish (up to `grace` s), release resources."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self.service.scheduler is not None:
            self.service.scheduler.stop()
        self.repository.stop()
        if self.service.request_log is not None:
            self.service.request_log.close()
        logger.info("model server stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def serve(options: ServerOptions) -> int:
    """Run until SIGTERM/SIGINT: the real binary when present (or asked for), else in-process."""
    binary = use_tfserving(options)
    if binary is not None:
        monitoring = Path(tempfile.mkdtemp(prefix="tumorflow-serve-")) / "monitoring.config"
        monitoring.write_text(MONITORING_CONFIG)
        argv = tfserving_argv(options, binary, str(monitoring))
        logger.info("running %s (flags forwarded; it binds all interfaces)", " ".join(argv))
        os.execv(binary, argv)
    server = ModelServer(options)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.start()
        while not stop.wait(0.5):
            pass
        logger.info("shutting down: finishing in-flight requests")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
