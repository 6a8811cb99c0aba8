"""Catalog entries built by hand, and the real admission script run on them: for tests of
admission and the circuit breaker that need no database."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from gateway import admission
from gateway.catalog import DeploymentEntry, KeyEntry, TenantEntry
from sluice.redisconn import get_async_redis
from tenants.models import Limits
from workers import protocol

# Limits out of reach, so that only what a test sets can refuse.
LIMITS = Limits(
    requests_per_minute=100_000,
    tokens_per_minute=10_000_000,
    monthly_token_budget=10**12,
    max_tokens_cap=1024,
    priority="normal",
    fair_share_weight=1,
)


def tenant_entry(tenant_id: int, *, deployments=("d",), **limits: Any) -> TenantEntry:
    return TenantEntry(
        id=tenant_id,
        slug=f"t{tenant_id}",
        active=True,
        limits=replace(LIMITS, **limits),
        deployments=frozenset(deployments),
        prompt_apis=frozenset(),
    )


def key_entry(key_id: int) -> KeyEntry:
    return KeyEntry(
        id=key_id,
        prefix=f"k{key_id:07d}"[-8:],
        secret_hash="",
        tenant_id=key_id,
        scopes=frozenset({"inference"}),
        expires_at=None,
        revoked_at=None,
    )


def deployment_entry(
    slug: str = "d", *, capacity: int = 16, config: dict[str, Any] | None = None
) -> DeploymentEntry:
    return DeploymentEntry(
        id=1,
        slug=slug,
        task="chat",
        enabled=True,
        capacity=capacity,
        max_batch_size=1,
        default_deadline_s=60.0,
        queue_name=f"deploy.{slug}",
        config=config or {},
        created=0,
    )


def admit(
    *,
    request_id: str,
    tenant: TenantEntry,
    deployment: DeploymentEntry,
    deadline_s: float = 60.0,
    tokens: int = 10,
) -> admission.Admission:
    """Ask the real admission script, as a gateway would; raises the refusal."""

    async def run() -> admission.Admission:
        try:
            return await admission.admit(
                request_id=request_id,
                key=key_entry(tenant.id),
                tenant=tenant,
                deployment=deployment,
                deadline_ms=protocol.now_ms() + int(deadline_s * 1000),
                reserve_tokens=tokens,
            )
        finally:
            # Each asyncio.run has its own loop, hence its own client: close it with it.
            client = get_async_redis()
            await client.aclose()
            await client.connection_pool.disconnect()

    return asyncio.run(run())
