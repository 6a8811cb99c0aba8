"""Each worker process announces itself every second: which models it has loaded, how
many threads are busy, its recent batch sizes. The control plane reads these; a worker
that stops beating disappears after HEARTBEAT_TTL_S."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import redis

from sluice.redisconn import get_redis

from . import protocol

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_S = 5


class Heartbeat(threading.Thread):
    def __init__(self, runtimes: dict, *, threads: int) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.runtimes = runtimes
        self.threads = threads
        self.started_at = time.time()
        self._stop = threading.Event()

    def snapshot(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "started_at": str(int(self.started_at)),
            "beat_at": str(int(time.time() * 1000)),
            "threads": str(self.threads),
            "busy": str(sum(runtime.busy for runtime in self.runtimes.values())),
            "deployments": json.dumps(
                {slug: runtime.status() for slug, runtime in self.runtimes.items()}
            ),
        }

    def beat(self) -> None:
        name = protocol.heartbeat(self.worker_id)
        pipe = get_redis().pipeline(transaction=False)
        pipe.hset(name, mapping=self.snapshot())
        pipe.expire(name, HEARTBEAT_TTL_S)
        pipe.zadd(protocol.workers_index(), {self.worker_id: time.time()})
        pipe.execute()

    def run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
            except redis.RedisError:
                logger.warning("heartbeat failed; retrying", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        try:
            client = get_redis()
            client.delete(protocol.heartbeat(self.worker_id))
            client.zrem(protocol.workers_index(), self.worker_id)
        except redis.RedisError:
            pass
