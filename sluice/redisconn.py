"""The one Redis connection pool of a process, and the key names Sluice uses."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import weakref

import redis
import redis.asyncio
from django.conf import settings
from django.db import transaction

logger = logging.getLogger(__name__)

# How long a read may wait for Redis before the connection counts as dead. redis-py's
# default is 5 s, which would cut a blocking read (XREAD BLOCK on a reply stream) of the
# same length short: every blocking read Sluice issues blocks for well under this.
SOCKET_TIMEOUT_S = 30.0
SOCKET_CONNECT_TIMEOUT_S = 5.0


@functools.cache
def get_redis() -> redis.Redis:
    """A process-wide client; redis-py's pool makes it safe to share between threads."""
    return redis.Redis.from_url(
        settings.REDIS_URL,
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_S,
    )


_async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_async_redis() -> redis.asyncio.Redis:
    """The asyncio client of the running event loop (asyncio clients are bound to one loop).

    Sized for many concurrent requests: each one waiting on its reply stream holds a
    connection while it blocks, so the pool is large and waits instead of failing.
    """
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=settings.REDIS_MAX_CONNECTIONS,
            timeout=settings.REDIS_POOL_TIMEOUT_S,
            health_check_interval=30,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_S,
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        _async_clients[loop] = client
    return client


def key(*parts: object) -> str:
    """A Redis key under this installation's prefix: key("lease", "chat") -> sluice:lease:chat."""
    return ":".join([settings.REDIS_PREFIX, *map(str, parts)])


def invalidation_channel() -> str:
    return key("invalidate")


def publish_invalidation_on_commit(kind: str, ident: object) -> None:
    """After the transaction commits, tell every gateway process to forget `kind` `ident`.

    Gateways cache keys, subscriptions, deployments and prompt-API versions in memory; this
    message is how a revoked key stops working everywhere within seconds.
    """
    message = json.dumps({"kind": kind, "id": str(ident)})

    def send() -> None:
        try:
            get_redis().publish(invalidation_channel(), message)
        except redis.RedisError:
            # The caches also expire on their own; a lost message delays, never leaks.
            logger.exception("could not publish cache invalidation %s", message)

    transaction.on_commit(send)


def set_flag_on_commit(name: str, *, ttl_s: int | None = None) -> None:
    """After commit, set a Redis flag the admission script checks (deny lists)."""

    def send() -> None:
        try:
            get_redis().set(name, 1, ex=ttl_s)
        except redis.RedisError:
            logger.exception("could not set %s", name)

    transaction.on_commit(send)


def clear_flag_on_commit(name: str) -> None:
    def send() -> None:
        try:
            get_redis().delete(name)
        except redis.RedisError:
            logger.exception("could not clear %s", name)

    transaction.on_commit(send)
