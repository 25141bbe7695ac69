"""Prometheus metrics of the model server, named after TF Serving's monitoring metrics.

TF Serving exports `/tensorflow/serving/request_count` and friends on
`/monitoring/prometheus/metrics` with `/` turned into `:`; the same names are used here (the
Prometheus client adds `_total` to counters). Each server owns its registry, so that several
servers in one process (tests, the benchmark) do not mix their counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tumorflow.serving.status import ServingError

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """Request counts and latency per model/API/entry point, errors per code, batch sizes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            ":tensorflow:serving:request_count",
            "Requests answered, by model, API, entry point and status code.",
            ["model_name", "API", "entrypoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            ":tensorflow:serving:request_latency",
            "End-to-end request latency in seconds.",
            ["model_name", "API", "entrypoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            ":tensorflow:serving:batching_session:batch_size",
            "Number of examples in each model call made by the batch scheduler.",
            ["model_name", "version", "signature_name"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )

    @contextmanager
    def track(self, model_name: str, api: str, entrypoint: str) -> Iterator[None]:
        """Count one request and time it; the status is the code of the error that escapes, if any."""
        start = time.perf_counter()
        status = grpc.StatusCode.OK
        try:
            yield
        except ServingError as exc:
            status = exc.code
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            raise
        finally:
            self.latency.labels(model_name, api, entrypoint).observe(time.perf_counter() - start)
            self.requests.labels(model_name, api, entrypoint, status.name).inc()

    def observe_batch(self, key: tuple, size: int) -> None:
        """Record a batch run by the scheduler; `key` starts with (model, version, signature)."""
        model_name, version, signature_name = key[:3]
        self.batch_size.labels(model_name, str(version), signature_name).observe(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
