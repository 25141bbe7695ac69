"""The server's request log: drift features of served requests, off the request path.

`RequestLogger.log` runs on the request path, so it only samples, stamps and enqueues (a few
microseconds). A background thread decodes the images, computes the drift features, projects the
model's embedding with the served version's stored projection, and appends rows to the
request-log store (`components/monitoring/store.py`: `<root>/<model_name>/date=YYYY-MM-DD/part-*.parquet`,
a local folder or a gs:// prefix). When the bounded queue is full a request is dropped and
counted, never waited for.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tumorflow.components.monitoring.store import LoggedRequest, PartWriter
from tumorflow.core.errors import ConfigError

logger = logging.getLogger(__name__)

_STOP = object()


class RequestLogger:
    """Logs drift features of served requests off the request path.

    `model_dir_lookup(model_name, version)` returns the served version folder, whose
    `assets.extra/drift_projection.npz` projects the `embedding` output to the reference's columns.
    """

    def __init__(
        self,
        root_uri: str,
        sample_rate: float = 1.0,
        model_dir_lookup: Callable[[str, int], Path | None] | None = None,
        *,
        max_queue: int = 1000,
        batch_rows: int = 1000,
        flush_interval_s: float = 5.0,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ConfigError(f"the request log sample rate must be within 0..1, got {sample_rate}")
        if not str(root_uri).strip():
            raise ConfigError("the request log needs a root folder or gs:// prefix")
        self.root_uri = str(root_uri)
        self.sample_rate = sample_rate
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._random = random.Random(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._counts = defaultdict(int)
        self._parts = PartWriter(self.root_uri, model_dir_lookup, self._count)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tumorflow-request-log", daemon=True)
        self._thread.start()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    @property
    def stats(self) -> dict[str, int]:
        """Requests enqueued, sampled out, dropped (queue full or closed); images skipped; rows
        and files written."""
        with self._lock:
            return {
                key: self._counts.get(key, 0)
                for key in ("enqueued", "sampled_out", "dropped", "skipped", "rows", "files")
            }

    def log(
        self,
        *,
        model_name: str,
        model_version: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """Enqueue one served request for logging; returns at once and never raises on overload."""
        if self.sample_rate < 1.0 and self._random.random() >= self.sample_rate:
            self._count("sampled_out")
            return
        if self._closed:
            self._count("dropped")
            return
        entry = LoggedRequest(
            timestamp=datetime.now(UTC),
            model_name=model_name,
            model_version=int(model_version),
            inputs=inputs,
            outputs=outputs,
        )
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._count("dropped")
            return
        self._count("enqueued")

    def close(self, timeout: float = 60.0) -> None:
        """Process what is queued, write the last part files and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the request log did not finish writing within %.0f s", timeout)

    def __enter__(self) -> RequestLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            wait = max(0.05, self._flush_interval_s - (time.monotonic() - last_flush))
            try:
                entry = self._queue.get(timeout=wait)
            except queue.Empty:
                entry = None
            if entry is _STOP:
                self._parts.flush()
                return
            if entry is not None:
                self._parts.add(entry)
            if (
                self._parts.buffered >= self._batch_rows
                or time.monotonic() - last_flush >= self._flush_interval_s
            ):
                self._parts.flush()
                last_flush = time.monotonic()
