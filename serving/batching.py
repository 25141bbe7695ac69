"""Server-side dynamic batching, with TF Serving's `BatchingParameters` and semantics.

Concurrent requests for the same model version, signature and per-example input shapes are
queued; a queue's oldest batch runs when it is full, when its timeout expires, or at once when the
timeout is zero, as soon as fewer than `num_batch_threads` batches are running. A batch that can
run at once runs in the thread of the caller that made it ready (no hand-off to a batch thread
and back); the others are taken by batch threads, which sleep until the earliest deadline and are
woken early only by a batch that becomes ready, a new deadline or a freed slot: nothing polls.
The merged call's outputs are split back along dim 0. Each queue holds at most
`max_enqueued_batches` batches: beyond that a request is refused with RESOURCE_EXHAUSTED. When a
merged call fails (one client's undecodable image, say), each request is rerun alone so that only
the bad one fails."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)

from tumorflow.core.errors import ConfigError
from tumorflow.serving.status import ServingError, invalid_argument, resource_exhausted

logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
Runner = Callable[[Arrays], dict[str, np.ndarray]]


def _batching_parameters_class() -> type:
    """TF Serving's BatchingParameters message (session_bundle_config.proto).

    tensorflow-serving-api does not ship that proto, so the message is declared here with the
    same package, field names, numbers and wrapper types, so that TF Serving's
    `--batching_parameters_file` text format parses unchanged.
    """
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )
    message = file.message_type.add(name="BatchingParameters")
    fields = [
        ("max_batch_size", 1, ".google.protobuf.Int64Value", False),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value", False),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value", False),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value", False),
        ("thread_pool_name", 5, ".google.protobuf.StringValue", False),
        ("allowed_batch_sizes", 6, None, True),
        ("pad_variable_length_inputs", 7, None, False),
        ("max_execution_batch_size", 8, ".google.protobuf.Int64Value", False),
        ("enable_large_batch_splitting", 9, ".google.protobuf.BoolValue", False),
    ]
    for name, number, type_name, repeated in fields:
        entry = message.field.add(name=name, number=number, json_name=name)
        entry.label = entry.LABEL_REPEATED if repeated else entry.LABEL_OPTIONAL
        if type_name:
            entry.type = entry.TYPE_MESSAGE
            entry.type_name = type_name
        elif repeated:
            entry.type = entry.TYPE_INT64
        else:
            entry.type = entry.TYPE_BOOL
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


BatchingParametersProto = _batching_parameters_class()


@dataclass(frozen=True)
class BatchingParameters:
    """The subset of TF Serving's batching parameters that governs the scheduler."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 1_000_000
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_enqueued_batches < 1 or self.num_batch_threads < 1:
            raise ConfigError(
                "batching parameters max_batch_size, max_enqueued_batches and "
                "num_batch_threads must be positive"
            )
        if self.batch_timeout_micros < 0:
            raise ConfigError("batching parameter batch_timeout_micros must be >= 0")
        sizes = self.allowed_batch_sizes
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ConfigError(
                "allowed_batch_sizes must increase strictly and end with max_batch_size "
                f"({self.max_batch_size}), as in TF Serving"
            )

    @classmethod
    def from_text(cls, text: str) -> BatchingParameters:
        """Parse the text proto of TF Serving's `--batching_parameters_file`."""
        proto = BatchingParametersProto()
        try:
            text_format.Parse(text, proto)
        except text_format.ParseError as exc:
            raise ConfigError(f"invalid batching parameters: {exc}") from exc
        values = {
            name: getattr(proto, name).value
            for name in (
                "max_batch_size",
                "batch_timeout_micros",
                "max_enqueued_batches",
                "num_batch_threads",
            )
            if proto.HasField(name)
        }
        return cls(**values, allowed_batch_sizes=tuple(proto.allowed_batch_sizes))

    @classmethod
    def from_file(cls, path: str) -> BatchingParameters:
        try:
            text = tf.io.gfile.GFile(path, "r").read()
        except tf.errors.OpError as exc:
            raise ConfigError(
                f"cannot read --batching_parameters_file {path}: {exc.message}"
            ) from exc
        return cls.from_text(text)


class _Task:
    """One caller's request; `finish` wakes the caller, which waits in `result`."""

    def __init__(self, inputs: Arrays, size: int) -> None:
        self.inputs = inputs
        self.size = size
        # A held lock is the cheapest one-shot wake-up: releasing it wakes exactly the caller,
        # without the condition variable and waiter list of a threading.Event.
        self._done = threading.Lock()
        self._done.acquire()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None

    def finish(
        self, outputs: dict[str, np.ndarray] | None = None, error: BaseException | None = None
    ) -> None:
        self.outputs, self.error = outputs, error
        self._done.release()

    def result(self) -> dict[str, np.ndarray]:
        self._done.acquire()
        if self.error is not None:
            raise self.error
        assert self.outputs is not None
        return self.outputs


@dataclass
class _Batch:
    key: Hashable
    runner: Runner
    deadline: float
    tasks: list[_Task] = field(default_factory=list)
    size: int = 0
    closed: bool = False


def _pad(inputs: dict[str, np.ndarray], target: int) -> dict[str, np.ndarray]:
    """Pad dim 0 up to `target` by repeating the first example (outputs are cut back)."""
    padded = {}
    for name, array in inputs.items():
        extra = np.repeat(array[:1], target - array.shape[0], axis=0)
        padded[name] = np.concatenate([array, extra], axis=0)
    return padded


class BatchScheduler:
    """Merges concurrent calls of one runner along dim 0; bounded queues; at most
    `num_batch_threads` batches run at once.

    A request whose batch is ready at once while a slot is free (a quiet server, timeout 0, or
    the request that fills a batch) runs in the caller's own thread: no hand-off to a batch
    thread and back. Otherwise batch threads take ready batches as slots free, oldest first, and
    a batch thread that finishes one goes straight on to the next (under load, the model is never
    left waiting for a woken thread).
    """

    def __init__(
        self,
        parameters: BatchingParameters,
        on_batch: Callable[[Hashable, int], None] | None = None,
    ) -> None:
        self.parameters = parameters
        self._on_batch = on_batch
        self._condition = threading.Condition()
        self._batches: deque[_Batch] = deque()
        self._open: dict[Hashable, _Batch] = {}
        self._queued: dict[Hashable, int] = {}
        self._idle_slots = parameters.num_batch_threads
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(parameters.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, key: Hashable, runner: Runner, inputs: Arrays) -> dict[str, np.ndarray]:
        """Run `runner(inputs)` as part of a merged batch of calls sharing `key`; blocks."""
        sizes = {array.shape[0] for array in inputs.values()}
        size = sizes.pop() if len(sizes) == 1 else 0
        if size > self.parameters.max_batch_size:
            raise invalid_argument(
                f"Task size {size} is larger than maximum input batch size "
                f"{self.parameters.max_batch_size}"
            )
        task = _Task(inputs, size)
        batch = self._enqueue(key, runner, task)
        if batch is not None:
            try:
                self._execute(batch)
            finally:
                self._release_slot()
        return task.result()

    def _enqueue(self, key: Hashable, runner: Runner, task: _Task) -> _Batch | None:
        """Queue `task`; returns its batch when the caller is to run it now (ready, oldest, and
        a slot free)."""
        timeout = self.parameters.batch_timeout_micros / 1e6
        with self._condition:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            batch = self._open.get(key)
            opened = False
            if (
                batch is None
                or batch.closed
                or batch.size + task.size > self.parameters.max_batch_size
            ):
                if batch is not None:
                    batch.closed = True
                if self._queued.get(key, 0) >= self.parameters.max_enqueued_batches:
                    if batch is not None and self._idle_slots:
                        self._condition.notify()
                    raise resource_exhausted(
                        "The batch scheduling queue to which this task was submitted is full"
                    )
                batch = _Batch(key, runner, time.monotonic() + timeout)
                self._open[key] = batch
                self._batches.append(batch)
                self._queued[key] = self._queued.get(key, 0) + 1
                opened = True
            batch.tasks.append(task)
            batch.size += task.size
            if batch.size >= self.parameters.max_batch_size:
                batch.closed = True
            ready = self._oldest_ready()
            if ready is batch and self._idle_slots:
                self._take(batch)
                return batch
            # Wake a batch thread only when there is something new to do: a batch that is ready
            # now, or a new batch whose deadline a sleeping thread does not know yet. A task that
            # joins an open batch that is not full changes nothing for the threads.
            if (ready is not None and self._idle_slots) or opened:
                self._condition.notify()
            return None

    def _oldest_ready(self) -> _Batch | None:
        now = time.monotonic()
        return next((b for b in self._batches if b.closed or b.deadline <= now), None)

    def _take(self, batch: _Batch) -> None:
        """Move `batch` from the queue to a running slot. Called with the condition held."""
        self._batches.remove(batch)
        self._queued[batch.key] -= 1
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        self._idle_slots -= 1

    def _release_slot(self) -> None:
        with self._condition:
            self._idle_slots += 1
            if self._batches:
                self._condition.notify()

    def _next_batch(self) -> _Batch | None:
        """The oldest ready batch once a slot is free, waiting as needed; None once stopped."""
        with self._condition:
            while not self._stopping or self._batches:
                ready = self._oldest_ready()
                if ready is not None and self._idle_slots:
                    self._take(ready)
                    if self._batches and self._idle_slots:
                        # This thread is busy now: another one watches the batches left.
                        self._condition.notify()
                    return ready
                if ready is None and self._batches:
                    self._condition.wait(min(b.deadline for b in self._batches) - time.monotonic())
                else:
                    self._condition.wait()
            return None

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._execute(batch)
            finally:
                self._release_slot()

    def _execute(self, batch: _Batch) -> None:
        tasks = batch.tasks
        if self._on_batch is not None:
            try:
                self._on_batch(batch.key, batch.size)
            except Exception:
                # Metrics must not cost the batch thread (its death would hang every caller).
                logger.exception("recording a batch of %d failed", batch.size)
        if len(tasks) == 1:
            self._run_alone(batch.runner, tasks[0])
            return
        try:
            merged = {
                name: np.concatenate([task.inputs[name] for task in tasks], axis=0)
                for name in tasks[0].inputs
            }
            target = next(
                (s for s in self.parameters.allowed_batch_sizes if s >= batch.size), batch.size
            )
            if target > batch.size:
                merged = _pad(merged, target)
            outputs = batch.runner(merged)
            offsets = np.cumsum([0] + [task.size for task in tasks])
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != target:
                    raise invalid_argument(
                        f"output '{name}' has no batch dimension of size {target}; "
                        "this signature cannot be batched"
                    )
            for index, task in enumerate(tasks):
                task.finish(
                    {
                        name: array[offsets[index] : offsets[index + 1]]
                        for name, array in outputs.items()
                    }
                )
        except ServingError as exc:
            logger.debug(
                "merged batch of %d requests failed (%s); running them one by one", len(tasks), exc
            )
            for task in tasks:
                self._run_alone(batch.runner, task)
        except Exception as exc:
            for task in tasks:
                task.finish(error=exc)

    @staticmethod
    def _run_alone(runner: Runner, task: _Task) -> None:
        try:
            outputs = runner(task.inputs)
        except Exception as exc:
            task.finish(error=exc)
        else:
            task.finish(outputs)

    def stop(self) -> None:
        """Finish queued batches, then stop the batch threads."""
        with self._condition:
            self._stopping = True
            for batch in self._batches:
                batch.closed = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
