"""The micro-batcher: one forward pass for many requests, without making a lone one wait."""

from __future__ import annotations

import threading
import time

from workers.backends.base import Backend, BackendRequest, BackendResult
from workers.batcher import MicroBatcher

LONG_WINDOW_MS = 10_000  # a batch that waited its whole window would miss every check


class Recorder(Backend):
    tasks = ("chat",)

    def __init__(self) -> None:
        super().__init__({})
        self.sizes: list[int] = []

    def run_batch(self, requests):
        self.sizes.append(len(requests))
        return [BackendResult(text=request.request_id) for request in requests]


def request(name: str) -> BackendRequest:
    return BackendRequest(name, "chat", {}, deadline_ms=int(time.time() * 1000) + 60_000)


class MicroBatcherTestCase:
    def test_a_lone_request_does_not_wait_for_company_that_is_not_coming(self):
        backend = Recorder()
        batcher = MicroBatcher(
            backend, max_batch_size=8, max_wait_ms=LONG_WINDOW_MS, name="t", in_hand=lambda: 1
        )
        try:
            assert batcher.run(request("alone"), timeout=2).text == "alone"
        finally:
            batcher.stop()
        assert backend.sizes == [1]

    def test_it_waits_for_requests_the_worker_already_holds(self):
        backend = Recorder()
        held = {"count": 3}
        batcher = MicroBatcher(
            backend,
            max_batch_size=3,
            max_wait_ms=LONG_WINDOW_MS,
            name="t",
            in_hand=lambda: held["count"],
        )
        results = {}

        def run(name: str) -> None:
            results[name] = batcher.run(request(name), timeout=5).text

        threads = [threading.Thread(target=run, args=(f"r{i}",)) for i in range(3)]
        try:
            for thread in threads:
                thread.start()
                time.sleep(0.05)  # the other two arrive while the first one waits
            for thread in threads:
                thread.join(timeout=5)
        finally:
            batcher.stop()
        assert backend.sizes == [3]
        assert results == {"r0": "r0", "r1": "r1", "r2": "r2"}
        assert batcher.holding == 0

    def test_without_a_count_it_waits_its_window(self):
        backend = Recorder()
        batcher = MicroBatcher(backend, max_batch_size=2, max_wait_ms=LONG_WINDOW_MS, name="t")
        try:
            first = batcher.submit(request("a"))
            time.sleep(0.1)
            second = batcher.submit(request("b"))
            assert (first.result(timeout=5).text, second.result(timeout=5).text) == ("a", "b")
        finally:
            batcher.stop()
        assert backend.sizes == [2]


class Miscounting(Recorder):
    """A faulty backend: one result short for any batch of more than one."""

    def run_batch(self, requests):
        return super().run_batch(requests)[: max(1, len(requests) - 1)]


class FaultyBackendTestCase:
    def test_a_wrong_number_of_results_fails_that_batch_and_the_batcher_goes_on(self):
        backend = Miscounting()
        held = {"count": 2}
        batcher = MicroBatcher(
            backend,
            max_batch_size=2,
            max_wait_ms=LONG_WINDOW_MS,
            name="t",
            in_hand=lambda: held["count"],
        )
        errors: list[BaseException] = []

        def run(name: str) -> None:
            try:
                batcher.run(request(name), timeout=5)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(f"r{i}",)) for i in range(2)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=10)
            assert backend.sizes == [2]
            assert len(errors) == 2
            assert "returned 1 results for 2 requests" in str(errors[0])
            # The batcher thread survived: the next request is served.
            held["count"] = 1
            assert batcher.run(request("after"), timeout=5).text == "after"
        finally:
            batcher.stop()
