"""The one Redis connection pool of a process, and the key names Sluice uses."""

from __future__ import annotations

import functools
import json
import logging

import redis
from django.conf import settings
from django.db import transaction

logger = logging.getLogger(__name__)


@functools.cache
def get_redis() -> redis.Redis:
    """A process-wide client; redis-py's pool makes it safe to share between threads."""
    return redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)


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
