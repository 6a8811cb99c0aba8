"""The micro-batcher: requests for one model from many worker threads, one forward pass.

Worker threads submit requests and wait on a future. One thread per model collects what
is waiting: up to max_batch_size requests, or as many as arrive within max_wait_ms of the
first, whichever comes first, then runs them as one batch. Requests whose deadline has
passed or whose client has gone are dropped before the batch runs.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from .backends.base import Backend, BackendRequest, BackendResult

logger = logging.getLogger(__name__)


class DroppedError(Exception):
    """The request expired or was cancelled before its batch ran."""


@dataclass
class _Item:
    request: BackendRequest
    future: Future


class MicroBatcher:
    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int,
        max_wait_ms: int,
        name: str,
        in_hand: Callable[[], int] | None = None,
    ) -> None:
        self.backend = backend
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_s = max(0, max_wait_ms) / 1000
        # How many requests the worker holds in all (taken off the queue, not yet answered).
        # Those it holds that the batcher has not seen are on their way to it; with none on
        # the way, waiting for company only delays the batch (by the whole max_wait_ms when
        # a request arrives alone). Without the callable, every batch waits its window.
        self.in_hand = in_hand
        self.holding = 0  # submitted and not yet answered
        self._holding_lock = threading.Lock()
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._stop = threading.Event()
        self.recent_sizes: collections.deque[int] = collections.deque(maxlen=32)
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name=f"batcher:{name}", daemon=True)
        self._thread.start()

    def submit(self, request: BackendRequest) -> Future:
        future: Future = Future()
        with self._holding_lock:
            self.holding += 1
        future.add_done_callback(self._answered)
        self._queue.put(_Item(request, future))
        return future

    def _answered(self, future: Future) -> None:
        with self._holding_lock:
            self.holding -= 1

    def _more_on_the_way(self) -> bool:
        return self.in_hand is None or self.in_hand() > self.holding

    def run(self, request: BackendRequest, timeout: float | None = None) -> BackendResult:
        return self.submit(request).result(timeout=timeout)

    def stop(self) -> None:
        self._stop.set()

    def _collect(self) -> list[_Item] | None:
        try:
            first = self._queue.get(timeout=0.5)
        except queue.Empty:
            return None
        batch = [first]
        give_up = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = give_up - time.monotonic()
            try:
                # Past max_wait, or with nothing on its way, still take whatever is already
                # waiting, without waiting for more.
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0 and self._more_on_the_way()
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            live = []
            for item in batch:
                if item.request.expired() or item.request.cancelled():
                    item.future.set_exception(DroppedError(item.request.request_id))
                else:
                    live.append(item)
            if not live:
                continue
            self.recent_sizes.append(len(live))
            self.batches += 1
            self.items += len(live)
            try:
                results = self.backend.run_batch([item.request for item in live])
                if len(results) != len(live):
                    raise RuntimeError(
                        f"{type(self.backend).__name__}.run_batch returned {len(results)} "
                        f"results for {len(live)} requests"
                    )
            except BaseException as exc:  # one bad batch must not kill the batcher thread
                logger.exception("batch of %d failed", len(live))
                for item in live:
                    item.future.set_exception(exc)
                continue
            for item, result in zip(live, results, strict=True):  # lengths checked above
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
