"""Where the gateway and the workers meet: the message format and the Redis key names.

Nothing else is shared. The gateway admits a request (a lease on the deployment's
capacity and a token reservation), sends an :class:`InferenceMessage` to the deployment's
Dramatiq queue, and reads events from the reply stream. The worker runs the model, writes
chunk/done/error events to that stream, and settles (releases the lease, charges the real
token count, counts one completion towards the drain rate) in one Lua call.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, NotRequired, TypedDict

from sluice.redisconn import key

ACTOR_NAME = "sluice_infer"
# How long a finished reply stream stays readable (a client reconnecting, debugging).
REPLY_TTL_S = 60


class InferenceMessage(TypedDict):
    request_id: str
    deployment: str  # slug
    task: Literal["chat", "completion", "embedding", "classification"]
    tenant_id: int
    deadline_ms: int  # epoch milliseconds; after it the client has been answered 504
    enqueued_ms: int
    stream: bool
    payload: dict[str, Any]  # task specific: messages / prompt / input, and parameters
    # To refund unused tokens to the tenant's tokens-per-minute bucket on settlement.
    ms_per_token: NotRequired[float]


class ReplyEvent(TypedDict):
    type: Literal["chunk", "done", "error"]
    data: dict[str, Any]


def actor_name(deployment: str) -> str:
    """The Dramatiq actor that serves a deployment's queue."""
    return f"{ACTOR_NAME}.{deployment}"


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_event(kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"type": kind, "data": json.dumps(data, separators=(",", ":"))}


def decode_event(fields: dict[bytes, bytes]) -> ReplyEvent:
    return {"type": fields[b"type"].decode(), "data": json.loads(fields[b"data"])}


# --- key names -----------------------------------------------------------------------------


def reply_stream(request_id: str) -> str:
    return key("reply", request_id)


def cancel_flag(request_id: str) -> str:
    """Set when the client has gone (disconnect, deadline): workers skip or stop the work."""
    return key("cancel", request_id)


def queue_cancel(pipe, request_id: str, deadline_ms: int) -> None:
    """Queue, on a sync or async pipeline, the cancel flag of a request: kept a minute past
    its deadline, as long as any copy of its message could still be picked up."""
    pipe.set(cancel_flag(request_id), 1, px=max(1000, deadline_ms - now_ms()) + 60_000)


def leases(deployment: str) -> str:
    """ZSET request_id -> lease deadline (ms): the deployment's admitted requests."""
    return key("leases", deployment)


def tenant_leases_prefix(deployment: str) -> str:
    return key("leases", deployment, "tenant") + ":"


def tenant_leases(deployment: str, tenant_id: int) -> str:
    return tenant_leases_prefix(deployment) + str(tenant_id)


def demand(deployment: str) -> str:
    """ZSET tenant_id -> last time it asked for this deployment (ms), for fair shares."""
    return key("demand", deployment)


def weights(deployment: str) -> str:
    """HASH tenant_id -> fair-share weight of the tenants that asked recently."""
    return key("weights", deployment)


def priority_demand(deployment: str) -> str:
    """HASH priority class (0 high, 1 normal, 2 low) -> last time it asked (ms): lower
    classes leave headroom only while a higher one is asking."""
    return key("demand", deployment, "priority")


def drain_prefix(deployment: str) -> str:
    """Per-second completion counters: <prefix><epoch second> -> completions."""
    return key("drain", deployment) + ":"


def breaker(deployment: str) -> str:
    """Exists while the deployment's upstream circuit is open; its TTL is the time left."""
    return key("breaker", deployment)


def breaker_failures(deployment: str) -> str:
    """Consecutive upstream failures; at the threshold the circuit opens."""
    return key("breaker", deployment, "failures")


def breaker_probe(deployment: str) -> str:
    """Held by the one request allowed through while the circuit is half-open."""
    return key("breaker", deployment, "probe")


def rate_bucket(api_key_id: int) -> str:
    return key("rate", "key", api_key_id)


def tokens_bucket(tenant_id: int) -> str:
    return key("rate", "tokens", tenant_id)


def budget(tenant_id: int, month: str) -> str:
    """HASH {used, reserved}: the tenant's tokens this calendar month (UTC)."""
    return key("budget", tenant_id, month)


def reservations(tenant_id: int) -> str:
    """ZSET request_id -> deadline: token reservations still open."""
    return key("reservations", tenant_id)


def reservation_amounts(tenant_id: int) -> str:
    return key("reservations", tenant_id, "amount")


def deny_key(prefix: str) -> str:
    return key("deny", "key", prefix)


def deny_tenant(tenant_id: int) -> str:
    return key("deny", "tenant", tenant_id)


def calllog_stream() -> str:
    """STREAM of call-log records (analytics.calllog), drained into Postgres by the flusher."""
    return key("calllog")


def heartbeat(worker_id: str) -> str:
    return key("worker", worker_id)


def workers_index() -> str:
    return key("workers")


def current_month(at_ms: int | None = None) -> str:
    """The budget month (UTC) of `at_ms`, or of now."""
    return time.strftime("%Y%m", time.gmtime(None if at_ms is None else at_ms / 1000))
