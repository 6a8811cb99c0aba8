"""The settle script, run by workers (sync) on completion and by the gateway (async) when
it refunds a request that failed, timed out or lost its client."""

from __future__ import annotations

from pathlib import Path

from sluice.redisconn import get_redis, key

from . import protocol

SETTLE = (Path(__file__).parent / "lua" / "settle.lua").read_text()
ADMIT = (Path(__file__).parent / "lua" / "admit.lua").read_text()


def budget_prefix(tenant_id: int) -> str:
    return key("budget", tenant_id) + ":"


def settle_keys(deployment: str, tenant_id: int) -> list[str]:
    return [
        protocol.leases(deployment),
        protocol.tenant_leases(deployment, tenant_id),
        protocol.reservations(tenant_id),
        protocol.reservation_amounts(tenant_id),
        protocol.tokens_bucket(tenant_id),
        protocol.breaker_probe(deployment),
    ]


def settle_args(
    request_id: str,
    tenant_id: int,
    deployment: str,
    *,
    tokens: int,
    ms_per_token: float,
    completed: bool,
) -> list[object]:
    return [
        request_id,
        int(tokens),
        protocol.now_ms(),
        ms_per_token,
        budget_prefix(tenant_id),
        protocol.drain_prefix(deployment) if completed else "",
    ]


_settle_script = None


def settle(
    *,
    request_id: str,
    tenant_id: int,
    deployment: str,
    tokens: int,
    ms_per_token: float,
    completed: bool,
) -> int:
    """Release the lease and charge `tokens`; returns the reserved amount or -1."""
    global _settle_script
    if _settle_script is None:
        _settle_script = get_redis().register_script(SETTLE)
    return int(
        _settle_script(
            keys=settle_keys(deployment, tenant_id),
            args=settle_args(
                request_id,
                tenant_id,
                deployment,
                tokens=tokens,
                ms_per_token=ms_per_token,
                completed=completed,
            ),
        )
    )
