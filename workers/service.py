"""One worker process's service: its deployments' models, their actors, the Dramatiq
worker threads and the heartbeat. `runworkers` runs one until it is told to stop; the
tests run one in-process against the same Redis."""

from __future__ import annotations

import logging

import dramatiq
from django.conf import settings

from .broker import get_broker
from .heartbeat import Heartbeat
from .runtime import DeploymentRuntime, DeploymentSpec

logger = logging.getLogger(__name__)

IDLE_THREAD_TIMEOUT_S = 0.25


def default_threads(specs: list[DeploymentSpec]) -> int:
    """Enough threads to fill every batch twice over: threads mostly wait on the batcher."""
    return max(8, 2 * max(spec.max_batch_size for spec in specs))


class WorkerService:
    def __init__(self, specs: list[DeploymentSpec], *, threads: int | None = None) -> None:
        if not specs:
            raise ValueError("a worker needs at least one deployment")
        self.specs = specs
        self.threads = threads or default_threads(specs)
        self.runtimes: dict[str, DeploymentRuntime] = {}
        self.heartbeat: Heartbeat | None = None
        self.worker: dramatiq.Worker | None = None

    def start(self) -> None:
        """Load every model (once), register the actors, then start consuming."""
        broker = get_broker()
        for spec in self.specs:
            runtime = DeploymentRuntime(spec)  # ImportError / TypeError for a bad backend
            runtime.start()
            runtime.register(broker)
            self.runtimes[spec.slug] = runtime
        self.heartbeat = Heartbeat(self.runtimes, threads=self.threads)
        self.heartbeat.beat()
        self.heartbeat.start()
        self.worker = dramatiq.Worker(
            broker,
            queues={spec.queue_name for spec in self.specs},
            worker_threads=self.threads,
            # Dramatiq's idle poll backs off to this many ms; its default of 1000 ms would
            # add up to a second to a request arriving at an idle worker.
            worker_timeout=settings.WORKER_POLL_MS,
        )
        self.worker.start()
        for thread in self.worker.workers:
            # Dramatiq's worker threads wait on their in-process queue with the consumer's
            # poll timeout, so each woke 100 times a second with nothing to do (29% of a
            # CPU for 128 idle threads). The timeout only bounds how soon a thread notices
            # a stop: a quarter of a second costs little CPU and stops quickly.
            thread.timeout = IDLE_THREAD_TIMEOUT_S

    @property
    def worker_id(self) -> str:
        return self.heartbeat.worker_id if self.heartbeat else ""

    def stop(self, timeout_ms: int = 10_000) -> None:
        """Finish the messages in hand (up to timeout_ms), then let go of everything."""
        if self.worker is not None:
            self.worker.stop(timeout=timeout_ms)
        # Threads still busy past the timeout die with the process: answer their clients
        # now rather than leave them waiting for their deadlines.
        abandoned = sum(runtime.abandon_in_hand() for runtime in self.runtimes.values())
        if abandoned:
            logger.warning(
                "stopped with %d request(s) unfinished; their clients were told", abandoned
            )
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for runtime in self.runtimes.values():
            runtime.stop()
