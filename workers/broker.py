"""The Dramatiq broker, set up once per process from settings.

Redis by default (the same Redis as everything else, under our key prefix). The middleware
is chosen, not defaulted: no TimeLimit (it cannot interrupt a torch or ONNX forward pass;
our deadlines do that job), no AgeLimit (the actor checks the deadline itself so it can
release the lease and say why), Retries with the actor's explicit policy, and
ShutdownNotifications so a stopping worker finishes cleanly.
"""

from __future__ import annotations

import functools
import time
import uuid

import dramatiq
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from dramatiq.middleware import CurrentMessage, Retries, ShutdownNotifications

from sluice.redisconn import get_async_redis

# An idle consumer waits this long on its queue's bell before looking again by itself
# (and noticing a stop).
IDLE_WAIT_S = 0.25
# Rings waiting for nobody (no worker runs) are capped and forgotten.
BELL_CAP = 64
BELL_TTL_MS = 60_000


def bell(namespace: str, queue_name: str) -> str:
    """A Redis list the sender pushes to after each message: idle consumers BLPOP it."""
    return f"{namespace}:{queue_name}.bell"


class _BellConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, waking at once when a message arrives on an idle queue.

    Dramatiq's consumer polls: after a miss it sleeps with exponential backoff up to the
    worker timeout, so a message arriving at an idle worker waits a few milliseconds on
    average for nothing, and every idle consumer keeps polling Redis. Redis cannot time a
    blocking read out in less than ~100 ms (its timer runs at `hz` 10), so short blocking
    reads cannot replace the sleeps; but an idle consumer (nothing prefetched, nothing in
    hand) has nothing to do until a message comes, so it blocks on the queue's bell, which
    every sender rings after enqueueing. A busy consumer polls as Dramatiq's does.
    """

    def __next__(self):  # the body of _RedisConsumer.__next__, but for the idle wait
        try:
            while True:
                try:
                    data = self.message_cache.pop(0)
                    if data is None:
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return dramatiq.MessageProxy(message)
                except IndexError:
                    messages = []
                    if self.outstanding_message_count < self.prefetch:
                        self.message_cache = messages = self.broker.do_fetch(
                            self.queue_name, self.prefetch - self.outstanding_message_count
                        )
                    if not messages:
                        if self.outstanding_message_count == 0:
                            self.misses = 0
                            self.broker.client.blpop(
                                [bell(self.broker.namespace, self.queue_name)],
                                timeout=IDLE_WAIT_S,
                            )
                        else:
                            self.misses, backoff_ms = compute_backoff(
                                self.misses, max_backoff=self.timeout
                            )
                            time.sleep(backoff_ms / 1000)
                        return None
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None


class SluiceRedisBroker(RedisBroker):
    """RedisBroker whose consumers wake on a bell instead of polling an idle queue."""

    @property
    def consumer_class(self):
        return _BellConsumer

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        sent = super().enqueue(message, delay=delay)  # its queue_name is the delay queue's
        pipe = self.client.pipeline(transaction=False)
        _ring(pipe, bell(self.namespace, sent.queue_name))
        pipe.execute()
        return sent


def _ring(pipe, name: str) -> None:
    pipe.rpush(name, 1)
    pipe.ltrim(name, -BELL_CAP, -1)
    pipe.pexpire(name, BELL_TTL_MS)


DEAD_LETTER_TTL_MS = 24 * 3600 * 1000


@functools.cache
def get_broker() -> SluiceRedisBroker:
    broker = SluiceRedisBroker(
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
        # Dead letters hold a request's whole payload (the prompt): kept a day for
        # debugging, not Dramatiq's week.
        dead_message_ttl=DEAD_LETTER_TTL_MS,
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


async def send_async(queue_name: str, actor_name: str, payload: dict) -> None:
    """Enqueue one message and ring its queue's bell in one Redis round trip, from the
    event loop, holding no thread.

    Dramatiq's RedisBroker.enqueue is synchronous; this runs the broker's own dispatch
    script with the very arguments RedisBroker.enqueue passes, on the asyncio client, so
    the message on Redis is byte for byte what Dramatiq would have written.
    """
    global _unpack_size
    broker = get_broker()
    if _unpack_size is None:
        # One synchronous round trip per process (Dramatiq caches it the same way).
        _unpack_size = await sync_to_async(broker._max_unpack_size, thread_sensitive=False)()
    dispatch = broker.scripts["dispatch"]
    redis_message_id = str(uuid.uuid4())
    message = build_message(queue_name, actor_name, payload).copy(
        options={"redis_message_id": redis_message_id}
    )
    args = [
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
    ]
    client = get_async_redis()
    for attempt in (1, 2):
        # EVALSHA, not a registered Script: redis-py checks a pipeline's scripts with an
        # extra SCRIPT EXISTS round trip on every execute.
        async with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(dispatch.sha, 1, broker.namespace, *args)
            _ring(pipe, bell(broker.namespace, queue_name))
            try:
                await pipe.execute()
                return
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
        # Redis restarted or its scripts were flushed: load it once, then send again.
        await client.script_load(dispatch.script)
