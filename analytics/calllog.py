"""The call-log record and how the gateway appends it to the Redis stream.

The gateway appends one record per answered request (step 7 of "A request's way through"
in DESIGN.md); ``analytics.flusher`` drains the stream into ``CallLog`` rows. Appending
is one XADD and never raises, so a log record can neither slow nor fail a request, and
records wait in Redis for as long as PostgreSQL is away.

Encoding and decoding live together here, so the stream's format has one owner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TypedDict

import redis

from sluice.redisconn import get_async_redis, get_redis
from workers import protocol

logger = logging.getLogger(__name__)

# The stream keeps at most about this many records, trimmed as records are appended.
# It trades Redis memory for how long a PostgreSQL outage (or a stopped flusher) can last
# before the oldest unflushed records are lost: a typical record takes about 160 bytes of
# Redis memory (~160 MB at the cap), and at 1,000 requests/s the cap holds ~17 minutes.
# "Approximate" (MAXLEN ~) lets Redis trim whole nodes only, which keeps XADD O(1).
MAX_STREAM_LENGTH = 1_000_000


class CallRecord(TypedDict):
    request_id: str
    tenant_id: int | None
    api_key_id: int | None
    deployment_id: int | None
    prompt_api_version_id: int | None
    endpoint: str  # "chat.completions", "completions", "embeddings", "models", "apis"
    status_code: int
    error_code: str  # "" on success
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float | None
    inference_ms: float | None
    total_ms: float
    created_at: float  # epoch seconds


class MalformedRecord(ValueError):
    """A stream entry that cannot become a CallLog row."""


# Every entry carries the same fields in the same order: Redis then stores the field
# names once per stream node instead of once per entry, so readable names cost nothing.
FIELDS: tuple[str, ...] = tuple(CallRecord.__annotations__)

# Decimal places kept per float field; milliseconds need no more than microseconds.
_PRECISION = {"queue_ms": 3, "inference_ms": 3, "total_ms": 3, "created_at": 6}

# Limits of the CallLog columns (analytics/models.py), checked before the insert so one
# bad record is dropped on its own instead of failing the batch it travels in.
_TEXT_LIMITS = {"request_id": 64, "endpoint": 40, "error_code": 40}
_BIGINT_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1


def encode(record: CallRecord) -> dict[str, str]:
    """The stream fields of a record: plain decimal strings, None as ""."""
    fields = {}
    for name in FIELDS:
        value = record[name]
        if value is None:
            fields[name] = ""
        elif isinstance(value, float):
            fields[name] = repr(round(value, _PRECISION.get(name, 6)))
        else:
            fields[name] = str(value)
    return fields


def decode(fields: Mapping[bytes | str, bytes | str]) -> CallRecord:
    """The record in a stream entry; raises MalformedRecord if it cannot be stored.

    Fields this version does not know are ignored, so a newer gateway can add some
    before every flusher is upgraded.
    """
    try:
        raw = {_str(name): _str(value) for name, value in fields.items()}
        return CallRecord(
            request_id=_text(raw, "request_id", required=True),
            tenant_id=_id(raw, "tenant_id"),
            api_key_id=_id(raw, "api_key_id"),
            deployment_id=_id(raw, "deployment_id"),
            prompt_api_version_id=_id(raw, "prompt_api_version_id"),
            endpoint=_text(raw, "endpoint"),
            status_code=_int(raw, "status_code", 100, 599),
            error_code=_text(raw, "error_code"),
            prompt_tokens=_int(raw, "prompt_tokens", 0, _INT_MAX),
            completion_tokens=_int(raw, "completion_tokens", 0, _INT_MAX),
            queue_ms=_optional_number(raw, "queue_ms"),
            inference_ms=_optional_number(raw, "inference_ms"),
            total_ms=_number(raw, "total_ms"),
            created_at=_epoch(raw, "created_at"),
        )
    except KeyError as exc:
        raise MalformedRecord(f"missing field {exc.args[0]}") from None
    except (ValueError, OverflowError, OSError) as exc:
        raise MalformedRecord(str(exc)) from None


def _xadd(client, record: CallRecord):
    """XADD the record with a sync or an async client (the latter returns an awaitable)."""
    return client.xadd(
        protocol.calllog_stream(), encode(record), maxlen=MAX_STREAM_LENGTH, approximate=True
    )


async def append(record: CallRecord) -> None:
    """Append a record to the call-log stream (async views). Logs a Redis error, never raises."""
    try:
        await _xadd(get_async_redis(), record)
    except redis.RedisError as exc:
        _lost(record, exc)


def append_sync(record: CallRecord) -> None:
    """Append a record to the call-log stream (sync code). Logs a Redis error, never raises."""
    try:
        _xadd(get_redis(), record)
    except redis.RedisError as exc:
        _lost(record, exc)


def _lost(record: CallRecord, exc: Exception) -> None:
    # No traceback: while Redis is down this fires once per request, and the cause is
    # the same every time.
    logger.warning("call log of %s lost: Redis refused it (%s)", record["request_id"], exc)


# --- decoding helpers ------------------------------------------------------------------


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(raw: dict[str, str], name: str, *, required: bool = False) -> str:
    value = raw[name]
    if required and not value:
        raise ValueError(f"{name} is empty")
    if len(value) > _TEXT_LIMITS[name]:
        raise ValueError(f"{name} is longer than {_TEXT_LIMITS[name]} characters")
    return value


def _int(raw: dict[str, str], name: str, low: int, high: int) -> int:
    value = int(raw[name])
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is outside {low}..{high}")
    return value


def _id(raw: dict[str, str], name: str) -> int | None:
    return _int(raw, name, 1, _BIGINT_MAX) if raw[name] else None


def _number(raw: dict[str, str], name: str) -> float:
    value = float(raw[name])
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not a finite number")
    return value


def _optional_number(raw: dict[str, str], name: str) -> float | None:
    return _number(raw, name) if raw[name] else None


def _epoch(raw: dict[str, str], name: str) -> float:
    value = _number(raw, name)
    datetime.fromtimestamp(value, tz=UTC)  # raises for a time no datetime can hold
    return value
