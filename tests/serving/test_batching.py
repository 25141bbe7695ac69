"""The batch scheduler: merging, splitting, bounded queues, isolation of a bad request."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from helpers import wait_until

from tumorflow.core.errors import ConfigError
from tumorflow.serving.batching import BatchingParameters, BatchScheduler
from tumorflow.serving.status import ServingError, invalid_argument


def test_parameters_parse_tf_serving_text_proto() -> None:
    parameters = BatchingParameters.from_text(
        "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 5000 }\n"
        "max_enqueued_batches { value: 3 }\nnum_batch_threads { value: 2 }\n"
        "allowed_batch_sizes: 8\nallowed_batch_sizes: 32\npad_variable_length_inputs: true\n"
    )
    assert parameters == BatchingParameters(32, 5000, 3, 2, (8, 32))
    with pytest.raises(ConfigError, match="max_batch_size"):
        BatchingParameters.from_text("max_batch_size { value: 0 }")
    with pytest.raises(ConfigError, match="invalid batching parameters"):
        BatchingParameters.from_text("max_batch { value: 3 }")
    with pytest.raises(ConfigError, match="allowed_batch_sizes"):
        BatchingParameters.from_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 4")


def run_concurrently(scheduler: BatchScheduler, runner, payloads: list[np.ndarray]) -> list[object]:
    results: list[object] = [None] * len(payloads)
    barrier = threading.Barrier(len(payloads))

    def call(index: int) -> None:
        barrier.wait()
        try:
            results[index] = scheduler.run("key", runner, {"x": payloads[index]})
        except ServingError as exc:
            results[index] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_concurrent_calls_are_merged_and_split_back() -> None:
    sizes: list[int] = []

    def runner(inputs):
        sizes.append(len(inputs["x"]))
        return {"double": inputs["x"] * 2}

    scheduler = BatchScheduler(
        BatchingParameters(8, 50_000, 10, 1, (4, 8)), on_batch=lambda k, n: None
    )
    try:
        payloads = [np.array([i, i + 100]) for i in range(6)]
        results = run_concurrently(scheduler, runner, payloads)
    finally:
        scheduler.stop()
    for payload, result in zip(payloads, results, strict=True):
        np.testing.assert_array_equal(result["double"], payload * 2)
    assert max(sizes) == 8, "12 examples in batches of at most 8, padded to an allowed size"
    assert all(size in (4, 8) for size in sizes)


def test_a_failing_merged_batch_reruns_members_alone() -> None:
    def runner(inputs):
        if (inputs["x"] < 0).any():
            raise invalid_argument("negative input")
        return {"y": inputs["x"] + 1}

    scheduler = BatchScheduler(BatchingParameters(16, 50_000, 10, 1))
    try:
        results = run_concurrently(
            scheduler, runner, [np.array([1]), np.array([-1]), np.array([3])]
        )
    finally:
        scheduler.stop()
    assert (
        isinstance(results[1], ServingError) and results[1].code == grpc.StatusCode.INVALID_ARGUMENT
    )
    np.testing.assert_array_equal(results[0]["y"], [2])
    np.testing.assert_array_equal(results[2]["y"], [4])


def test_full_queue_answers_resource_exhausted_and_recovers() -> None:
    release, running = threading.Event(), threading.Event()

    def slow(inputs):
        running.set()
        release.wait(10)
        return {"y": inputs["x"]}

    scheduler = BatchScheduler(BatchingParameters(1, 0, 2, 1))
    try:
        threads = [
            threading.Thread(target=scheduler.run, args=("key", slow, {"x": np.array([i])}))
            for i in range(3)
        ]
        threads[0].start()
        assert running.wait(10), "the first call never ran"
        for thread in threads[1:]:
            thread.start()
        # The one batch thread is busy, so the other two calls fill the queue of two batches.
        wait_until(lambda: scheduler._queued.get("key") == 2, 10, "two batches queued")
        with pytest.raises(ServingError) as caught:
            scheduler.run("key", slow, {"x": np.array([9])})
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        for thread in threads:
            thread.join(timeout=10)
        np.testing.assert_array_equal(scheduler.run("key", slow, {"x": np.array([5])})["y"], [5])
    finally:
        release.set()
        scheduler.stop()


def test_a_request_larger_than_the_max_batch_is_invalid() -> None:
    scheduler = BatchScheduler(BatchingParameters(2, 0, 2, 1))
    try:
        with pytest.raises(ServingError, match="larger than maximum input batch size 2"):
            scheduler.run("key", lambda inputs: inputs, {"x": np.zeros(3)})
    finally:
        scheduler.stop()


def test_a_batch_that_fills_runs_without_waiting_for_its_timeout() -> None:
    sizes: list[int] = []

    def runner(inputs):
        sizes.append(len(inputs["x"]))
        return {"y": inputs["x"] + 1}

    # A timeout no test would wait for: only filling the batch can start it.
    scheduler = BatchScheduler(BatchingParameters(4, 600_000_000, 10, 1))
    try:
        results = run_concurrently(scheduler, runner, [np.array([i]) for i in range(4)])
    finally:
        scheduler.stop()
    assert sizes == [4]
    assert [int(result["y"][0]) for result in results] == [1, 2, 3, 4]


def test_a_lone_request_runs_when_its_timeout_expires() -> None:
    scheduler = BatchScheduler(BatchingParameters(8, 20_000, 10, 1))
    try:
        answer = scheduler.run("key", lambda inputs: {"y": inputs["x"] * 3}, {"x": np.array([2])})
    finally:
        scheduler.stop()
    np.testing.assert_array_equal(answer["y"], [6])


def test_a_waiting_batch_runs_at_its_deadline_while_another_batch_is_running() -> None:
    release = threading.Event()

    def runner(inputs):
        if inputs["x"][0] == 0:
            release.wait(30)
        return {"y": inputs["x"]}

    scheduler = BatchScheduler(BatchingParameters(8, 20_000, 10, 2))
    blocked = threading.Thread(target=scheduler.run, args=("a", runner, {"x": np.array([0])}))
    try:
        blocked.start()
        wait_until(lambda: not scheduler._batches, 10, "the first batch taken by a thread")
        # The second thread must wake for this batch's deadline although the first is busy.
        answer = scheduler.run("b", runner, {"x": np.array([7])})
        np.testing.assert_array_equal(answer["y"], [7])
        assert blocked.is_alive(), "the first batch was still running"
    finally:
        release.set()
        blocked.join(timeout=10)
        scheduler.stop()


def test_a_failing_batch_metric_does_not_stop_the_batch_thread() -> None:
    def broken_metric(key, size):
        raise KeyError(key)

    scheduler = BatchScheduler(BatchingParameters(4, 0, 10, 1), on_batch=broken_metric)
    try:
        for value in (1, 2):
            answer = scheduler.run(
                "key", lambda inputs: {"y": inputs["x"]}, {"x": np.array([value])}
            )
            np.testing.assert_array_equal(answer["y"], [value])
    finally:
        scheduler.stop()


def test_a_request_that_can_run_at_once_runs_in_the_callers_thread() -> None:
    threads: list[int] = []

    def runner(inputs):
        threads.append(threading.get_ident())
        return {"y": inputs["x"]}

    scheduler = BatchScheduler(BatchingParameters(4, 0, 10, 2))
    try:
        for value in (1, 2, 3):
            np.testing.assert_array_equal(
                scheduler.run("key", runner, {"x": np.array([value])})["y"], [value]
            )
    finally:
        scheduler.stop()
    # No hand-off to a batch thread and back when nothing else is queued.
    assert threads == [threading.get_ident()] * 3
