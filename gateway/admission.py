"""Admission control: one Redis round trip decides whether a request may enter the queue.

The script (workers/lua/admit.lua) checks, in order: the deny flags (revoked key,
suspended tenant), the upstream circuit, the key's requests per minute, the tenant's
tokens per minute and monthly budget (reserving prompt + max_tokens), and the deployment's
capacity as leases, with priority classes and weighted fair shares under contention.
A refusal writes nothing and costs nothing but that round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis
from django.conf import settings

from sluice import errors
from sluice.errors import SluiceError
from sluice.redisconn import get_async_redis
from workers import protocol
from workers.settlement import ADMIT, budget_prefix

from .catalog import DeploymentEntry, KeyEntry, TenantEntry

MIN_RETRY_S, MAX_RETRY_S = 1, 60


@dataclass(frozen=True)
class Admission:
    in_use: int
    rate_limit: int
    rate_remaining: int
    rate_reset_ms: int
    reserved_tokens: int

    def headers(self) -> dict[str, str]:
        return rate_headers(self.rate_limit, self.rate_remaining, self.rate_reset_ms)


def rate_headers(limit: int, remaining: int, reset_ms: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(max(0, remaining)),
        "X-RateLimit-Reset": str(max(0, math.ceil(reset_ms / 1000))),
    }


def retry_headers(wait_ms: float) -> dict[str, str]:
    """Retry-After in whole seconds (clamped to 1..60) and retry-after-ms, as the openai
    client reads them."""
    wait_ms = min(max(wait_ms, MIN_RETRY_S * 1000), MAX_RETRY_S * 1000)
    return {"Retry-After": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(int(wait_ms))}


def ms_per_token(tenant: TenantEntry) -> float:
    return 60_000 / max(1, tenant.limits.tokens_per_minute)


def admission_keys(
    key: KeyEntry, tenant: TenantEntry, deployment: DeploymentEntry, month: str
) -> list[str]:
    slug = deployment.slug
    return [
        protocol.leases(slug),
        protocol.tenant_leases(slug, tenant.id),
        protocol.demand(slug),
        protocol.weights(slug),
        protocol.rate_bucket(key.id),
        protocol.tokens_bucket(tenant.id),
        protocol.budget(tenant.id, month),
        protocol.reservations(tenant.id),
        protocol.reservation_amounts(tenant.id),
        protocol.breaker(slug),
        protocol.deny_key(key.prefix),
        protocol.deny_tenant(tenant.id),
        protocol.breaker_failures(slug),
        protocol.breaker_probe(slug),
        protocol.priority_demand(slug),
    ]


_scripts: dict[int, object] = {}


def _script(client: redis.asyncio.Redis):
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(ADMIT)
    return script


async def admit(
    *,
    request_id: str,
    key: KeyEntry,
    tenant: TenantEntry,
    deployment: DeploymentEntry,
    deadline_ms: int,
    reserve_tokens: int,
) -> Admission:
    """Admit the request or raise the SluiceError that says why not (429 / 503 / 401)."""
    limits = tenant.limits
    now = protocol.now_ms()
    month = protocol.current_month(now)
    args = [
        now,
        request_id,
        deadline_ms,
        tenant.id,
        limits.fair_share_weight,
        tenant.priority,
        deployment.capacity,
        limits.requests_per_minute,
        limits.tokens_per_minute,
        limits.monthly_token_budget,
        reserve_tokens,
        month,
        budget_prefix(tenant.id),
        protocol.drain_prefix(deployment.slug),
        1 if settings.ADMISSION_ENFORCE_CAPACITY else 0,
        deployment.breaker_threshold,
    ]
    client = get_async_redis()
    verdict, wait_ms, remaining, in_use, reset_ms = await _script(client)(
        keys=admission_keys(key, tenant, deployment, month), args=args
    )
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    rate = rate_headers(limits.requests_per_minute, int(remaining), int(reset_ms))
    if verdict == "ok":
        return Admission(
            in_use=int(in_use),
            rate_limit=limits.requests_per_minute,
            rate_remaining=int(remaining),
            rate_reset_ms=int(reset_ms),
            reserved_tokens=reserve_tokens,
        )
    raise refusal(verdict, int(wait_ms), rate, tenant=tenant, deployment=deployment)


def refusal(
    verdict: str,
    wait_ms: int,
    rate: dict[str, str],
    *,
    tenant: TenantEntry,
    deployment: DeploymentEntry,
) -> SluiceError:
    limits = tenant.limits
    if verdict == "rate_limited":
        return SluiceError(
            errors.RATE_LIMITED,
            f"This API key is over its limit of {limits.requests_per_minute} requests per "
            f"minute; retry in {math.ceil(wait_ms / 1000)} s.",
            headers={**rate, **retry_headers(wait_ms), "X-RateLimit-Remaining": "0"},
        )
    if verdict == "tokens_rate_limited":
        return SluiceError(
            errors.RATE_LIMITED,
            f"Tenant '{tenant.slug}' is over its limit of {limits.tokens_per_minute:,} tokens "
            f"per minute; retry in {math.ceil(wait_ms / 1000)} s.",
            headers={**rate, **retry_headers(wait_ms)},
        )
    if verdict == "quota_exceeded":
        return SluiceError(
            errors.QUOTA_EXCEEDED,
            f"Tenant '{tenant.slug}' has spent its monthly budget of "
            f"{limits.monthly_token_budget:,} tokens (counting requests in flight). Ask for a "
            "higher quota (POST /api/access-requests/ with kind raise_quota) or wait for the "
            "next month.",
            headers={**rate, "x-should-retry": "false"},
        )
    if verdict == "queue_full":
        return SluiceError(
            errors.QUEUE_FULL,
            f"Deployment '{deployment.slug}' is at capacity (or your tenant at its fair share "
            f"of it); retry in {math.ceil(min(max(wait_ms, 1000), 60000) / 1000)} s.",
            headers={**rate, **retry_headers(wait_ms)},
        )
    if verdict == "upstream_unavailable":
        return SluiceError(
            errors.UPSTREAM_UNAVAILABLE,
            f"The upstream server behind '{deployment.slug}' is failing; its circuit is open. "
            f"Retry in {math.ceil(min(max(wait_ms, 1000), 60000) / 1000)} s.",
            headers=retry_headers(wait_ms),
        )
    if verdict == "tenant_suspended":
        return SluiceError(
            errors.TENANT_SUSPENDED,
            f"Tenant '{tenant.slug}' is suspended, so its API keys are disabled.",
        )
    return SluiceError(errors.INVALID_API_KEY, "This API key has been revoked.")
