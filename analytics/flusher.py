"""The call-log flusher: drains the Redis stream of call logs into ``CallLog`` rows.

Delivery is at least once and the insert is idempotent, so every record is written
exactly once:

- Flushers read through one consumer group, each under its own consumer name, so several
  can run at once and each entry goes to one of them.
- A batch is one ``INSERT ... ON CONFLICT (request_id) DO NOTHING``; only after it has
  committed are its entries acknowledged and deleted from the stream.
- If PostgreSQL is down, nothing is acknowledged: the batch stays in this consumer's
  pending list and is retried first, with backoff (see :func:`run`), until it goes in.
- If a flusher dies holding a batch, another claims it once it has been idle for
  ``CLAIM_IDLE_MS``. A batch that was written but not acknowledged is written again, which
  the insert ignores.
- An entry that cannot become a row (malformed, or refused by the database) is logged and
  acknowledged, so it never blocks the stream.

``python manage.py flush_calllogs`` runs :func:`run`; the control plane can run it in a
thread of its own, or call :func:`flush_once` with ``block_ms=0`` on its own tick.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import redis
from django.db import DatabaseError, DataError, IntegrityError, connections, transaction

from sluice.redisconn import get_redis
from workers import protocol

from . import calllog
from .models import CallLog

logger = logging.getLogger(__name__)

GROUP = "flusher"
# A pending entry idle this long belongs to a flusher presumed dead, and another takes it.
# Longer than any batch insert should take, and more than twice BACKOFF_MAX_S, so that a
# live flusher retrying its own batch through an outage refreshes it before anyone steals
# it. A live flusher that is merely slow only causes a duplicate insert, which is ignored.
CLAIM_IDLE_MS = 60_000
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 25.0

Entry = tuple[bytes, dict[bytes, bytes]]


def consumer_name() -> str:
    """A name no other running flusher has: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_group() -> None:
    """Create the consumer group (and the stream) unless it exists; safe to call again."""
    try:
        # From id 0, not "$": records appended before any flusher ever ran are flushed too.
        get_redis().xgroup_create(protocol.calllog_stream(), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise


def flush_once(
    *,
    consumer: str,
    count: int = 500,
    block_ms: int = 1000,
    using: str = "default",
    claim_idle_ms: int = CLAIM_IDLE_MS,
) -> int:
    """Write one batch of up to ``count`` entries; return how many entries it handled.

    The batch is, in this order of preference: the entries this consumer took before and
    could not write; entries of a dead flusher (idle over ``claim_idle_ms``); new entries,
    waiting up to ``block_ms`` for some (0: do not wait). Handled entries (written, or
    dropped as malformed) are acknowledged and deleted from the stream.

    Raises ``django.db.DatabaseError`` when the database cannot take the batch and
    ``redis.RedisError`` when Redis fails; the entries then stay pending for a retry.
    """
    client = get_redis()
    stream = protocol.calllog_stream()
    try:
        entries = _take(client, stream, consumer, count, block_ms, claim_idle_ms)
    except redis.ResponseError as exc:
        # The stream (and so the group) is gone: never created, or Redis lost its data.
        if not str(exc).startswith("NOGROUP"):
            raise
        ensure_group()
        entries = _take(client, stream, consumer, count, block_ms, claim_idle_ms)
    if not entries:
        return 0

    rows = []
    for entry_id, fields in entries:
        if not fields:
            # Trimmed by MAXLEN (or deleted) after it was delivered: only acknowledge it.
            continue
        try:
            rows.append(_row(calllog.decode(fields)))
        except calllog.MalformedRecord as exc:
            logger.warning("dropping malformed call-log entry %s: %s", entry_id.decode(), exc)
    _write(rows, using=using)

    ids = [entry_id for entry_id, _ in entries]
    pipe = client.pipeline(transaction=True)
    pipe.xack(stream, GROUP, *ids)
    pipe.xdel(stream, *ids)
    pipe.execute()
    logger.debug("flushed %d call-log entries (%d rows)", len(ids), len(rows))
    return len(ids)


def run(
    *,
    consumer: str,
    stop_event: threading.Event,
    count: int = 500,
    block_ms: int = 1000,
    using: str = "default",
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Flush batch after batch until ``stop_event`` is set.

    A database or Redis failure is logged and the batch retried after a backoff that
    doubles from BACKOFF_MIN_S up to BACKOFF_MAX_S, and resets after a success. A stop
    takes effect within ``block_ms`` (or the current backoff). ``on_batch`` is called with
    the number of entries of each batch that handled any.
    """
    delay = 0.0
    try:
        while not stop_event.is_set():
            try:
                handled = flush_once(consumer=consumer, count=count, block_ms=block_ms, using=using)
            except (DatabaseError, redis.RedisError) as exc:
                delay = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, delay * 2))
                logger.warning("call-log flush failed, retrying in %.1f s: %s", delay, exc)
                stop_event.wait(delay)
                continue
            if delay:
                logger.info("call-log flush recovered")
                delay = 0.0
            if handled and on_batch is not None:
                on_batch(handled)
    finally:
        connection = connections[using]
        if not connection.in_atomic_block:
            connection.close()


def _take(
    client: redis.Redis,
    stream: str,
    consumer: str,
    count: int,
    block_ms: int,
    claim_idle_ms: int,
) -> list[Entry]:
    # Own pending entries first: reading them again also refreshes their idle time, which
    # tells other flushers that this one is alive and still on them.
    mine = client.xreadgroup(GROUP, consumer, {stream: "0"}, count=count)
    if mine and mine[0][1]:
        return mine[0][1]
    # XAUTOCLAIM answers [cursor, entries] (Redis 6.2) or [cursor, entries, deleted ids]
    # (7.0+). On 6.2 an entry deleted meanwhile comes back as (None, None) but is still
    # claimed: it reappears as this consumer's pending entry on the next call.
    claimed = client.xautoclaim(stream, GROUP, consumer, claim_idle_ms, "0-0", count=count)
    alive = [(entry_id, fields) for entry_id, fields in claimed[1] if entry_id is not None]
    if alive:
        return alive
    # Redis reads BLOCK 0 as "forever"; without BLOCK it answers at once.
    fresh = client.xreadgroup(
        GROUP, consumer, {stream: ">"}, count=count, block=block_ms if block_ms > 0 else None
    )
    return fresh[0][1] if fresh else []


def _row(record: calllog.CallRecord) -> CallLog:
    return CallLog(
        request_id=record["request_id"],
        tenant_id=record["tenant_id"],
        api_key_id=record["api_key_id"],
        deployment_id=record["deployment_id"],
        prompt_api_version_id=record["prompt_api_version_id"],
        endpoint=record["endpoint"],
        status_code=record["status_code"],
        error_code=record["error_code"],
        prompt_tokens=record["prompt_tokens"],
        completion_tokens=record["completion_tokens"],
        queue_ms=record["queue_ms"],
        inference_ms=record["inference_ms"],
        total_ms=record["total_ms"],
        created_at=datetime.fromtimestamp(record["created_at"], tz=UTC),
    )


def _write(rows: list[CallLog], *, using: str) -> None:
    if not rows:
        return
    connection = connections[using]
    if not connection.in_atomic_block:
        # A long-running process gets no request signals, which is where Django drops a
        # broken or over-age connection (CONN_MAX_AGE) and re-arms the health check of a
        # kept one (CONN_HEALTH_CHECKS); do the same before each batch, so a flusher finds
        # a connection that died while it was idle before it uses it. Inside an atomic
        # block (a caller's transaction, a test) the connection is not ours to close.
        connection.close_if_unusable_or_obsolete()
    try:
        with transaction.atomic(using=using):
            CallLog.objects.using(using).bulk_create(rows, ignore_conflicts=True)
    except (DataError, IntegrityError):
        # The database refused some row (a value the decoder let through, such as a NUL
        # character): write the batch row by row and drop only the rows it refuses. Any
        # other database error means it cannot take writes now, and propagates.
        for row in rows:
            try:
                with transaction.atomic(using=using):
                    CallLog.objects.using(using).bulk_create([row], ignore_conflicts=True)
            except (DataError, IntegrityError) as exc:
                logger.warning(
                    "dropping call log %r: the database refused it (%s)", row.request_id, exc
                )
