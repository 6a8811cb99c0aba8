"""The Dramatiq broker, set up once per process from settings.

Redis by default (the same Redis as everything else, under our key prefix). The middleware
is chosen, not defaulted: no TimeLimit (it cannot interrupt a torch or ONNX forward pass;
our deadlines do that job), no AgeLimit (the actor checks the deadline itself so it can
release the lease and say why), Retries with the actor's explicit policy, and
ShutdownNotifications so a stopping worker finishes cleanly.
"""

from __future__ import annotations

import functools

import dramatiq
from django.conf import settings
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Retries, ShutdownNotifications


@functools.cache
def get_broker() -> dramatiq.Broker:
    broker = RedisBroker(
        url=settings.REDIS_URL,
        namespace=settings.DRAMATIQ_NAMESPACE,
        middleware=[
            ShutdownNotifications(),
            CurrentMessage(),
            # Conservative defaults; the inference actor states its own (workers/actors.py).
            Retries(max_retries=0, min_backoff=100, max_backoff=1000),
        ],
        # A dead worker's unacked messages are requeued after this long without heartbeat.
        heartbeat_timeout=settings.WORKER_HEARTBEAT_TIMEOUT_MS,
    )
    dramatiq.set_broker(broker)
    return broker


def send(queue_name: str, actor_name: str, message: dict) -> None:
    """Enqueue one message; the gateway calls this (in a thread) without importing actors."""
    broker = get_broker()
    broker.enqueue(
        dramatiq.Message(
            queue_name=queue_name, actor_name=actor_name, args=(message,), kwargs={}, options={}
        )
    )
