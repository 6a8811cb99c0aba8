"""The Dramatiq broker, set up once per process from settings.

Redis by default (the same Redis as everything else, under our key prefix). The middleware
is chosen, not defaulted: no TimeLimit (it cannot interrupt a torch or ONNX forward pass;
our deadlines do that job), no AgeLimit (the actor checks the deadline itself so it can
release the lease and say why), Retries with the actor's explicit policy, and
ShutdownNotifications so a stopping worker finishes cleanly.
"""

from __future__ import annotations

import functools
import uuid

import dramatiq
from asgiref.sync import sync_to_async
from django.conf import settings
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.middleware import CurrentMessage, Retries, ShutdownNotifications

from sluice.redisconn import get_async_redis


@functools.cache
def get_broker() -> RedisBroker:
    broker = RedisBroker(
        url=settings.REDIS_URL,
        namespace=settings.DRAMATIQ_NAMESPACE,
        middleware=[
            ShutdownNotifications(),
            CurrentMessage(),
            # Conservative defaults; the inference actor states its own (workers/runtime.py).
            Retries(max_retries=0, min_backoff=100, max_backoff=1000),
        ],
        # A dead worker's unacked messages are requeued after this long without heartbeat.
        heartbeat_timeout=settings.WORKER_HEARTBEAT_TIMEOUT_MS,
    )
    dramatiq.set_broker(broker)
    return broker


def build_message(queue_name: str, actor_name: str, payload: dict) -> dramatiq.Message:
    return dramatiq.Message(
        queue_name=queue_name, actor_name=actor_name, args=(payload,), kwargs={}, options={}
    )


def send(queue_name: str, actor_name: str, payload: dict) -> None:
    """Enqueue one message from synchronous code (tests, scripts)."""
    get_broker().enqueue(build_message(queue_name, actor_name, payload))


_unpack_size: int | None = None
_dispatch = {}


async def send_async(queue_name: str, actor_name: str, payload: dict) -> None:
    """Enqueue one message from the event loop in one Redis round trip, holding no thread.

    Dramatiq's RedisBroker.enqueue is synchronous; this runs the broker's own dispatch
    script with the very arguments RedisBroker.enqueue passes, on the asyncio client, so
    the message on Redis is byte for byte what Dramatiq would have written.
    """
    global _unpack_size
    broker = get_broker()
    if _unpack_size is None:
        # One synchronous round trip per process (Dramatiq caches it the same way).
        _unpack_size = await sync_to_async(broker._max_unpack_size, thread_sensitive=False)()
    client = get_async_redis()
    script = _dispatch.get(id(client))
    if script is None:
        script = _dispatch[id(client)] = client.register_script(broker.scripts["dispatch"].script)
    message = build_message(queue_name, actor_name, payload)
    redis_message_id = str(uuid.uuid4())
    message = message.copy(options={"redis_message_id": redis_message_id})
    await script(
        keys=[broker.namespace],
        args=[
            "enqueue",
            current_millis(),
            queue_name,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            0,  # maintenance is the workers' job, not the hot path's
            _unpack_size,
            redis_message_id,
            message.encode(),
        ],
    )
