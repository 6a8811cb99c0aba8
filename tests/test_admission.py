"""Admission control: capacity as leases, fair shares, priority classes, honest refusals.

The first classes drive the real admission script in Redis directly, one decision at a
time, so every step is deterministic. The last ones go through the live gateway, a real
worker and the official openai client.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest
from django.conf import settings

from gateway.catalog import TenantEntry
from sluice.errors import SluiceError
from sluice.redisconn import get_redis
from workers import protocol, settlement

from .conftest import fixed_deployment, wait_until
from .entries import admit, deployment_entry, tenant_entry


class Desk:
    """Asks the admission script for one request at a time, as a gateway would."""

    def __init__(self, capacity: int) -> None:
        self.deployment = deployment_entry(capacity=capacity)
        self.count = 0

    def ask(self, who: TenantEntry, *, deadline_s: float = 60.0, tokens: int = 10) -> str:
        """'ok' and the request id, or the refusal's error code."""
        self.count += 1
        request_id = f"r{self.count}"
        try:
            admit(
                request_id=request_id,
                tenant=who,
                deployment=self.deployment,
                deadline_s=deadline_s,
                tokens=tokens,
            )
        except SluiceError as refused:
            self.last_refusal = refused
            return refused.error.code
        return request_id

    def finish(self, request_id: str, who: TenantEntry) -> None:
        settlement.settle(
            request_id=request_id,
            tenant_id=who.id,
            deployment=self.deployment.slug,
            tokens=5,
            ms_per_token=0,
            completed=True,
        )

    def in_use(self) -> int:
        return get_redis().zcard(protocol.leases(self.deployment.slug))


@pytest.fixture
def desk(clean_redis):
    return Desk


class CapacityTestCase:
    def test_it_refuses_beyond_capacity_with_a_retry_after(self, desk):
        desk = desk(capacity=2)
        high = tenant_entry(1, priority="high")
        assert desk.ask(high).startswith("r")
        assert desk.ask(high).startswith("r")
        assert desk.ask(high) == "queue_full"
        refusal = desk.last_refusal
        assert refusal.error.status == 503
        assert 1 <= int(refusal.headers["Retry-After"]) <= 60
        assert int(refusal.headers["retry-after-ms"]) >= 1000
        assert desk.in_use() == 2

    def test_it_admits_again_once_a_request_finishes(self, desk):
        desk = desk(capacity=1)
        high = tenant_entry(1, priority="high")
        first = desk.ask(high)
        assert desk.ask(high) == "queue_full"
        desk.finish(first, high)
        assert desk.ask(high).startswith("r")

    def test_an_expired_lease_frees_its_capacity_by_itself(self, desk):
        # A gateway or worker that dies never releases; the lease's deadline does.
        desk = desk(capacity=1)
        high = tenant_entry(1, priority="high")
        desk.ask(high, deadline_s=0.2)
        assert desk.ask(high) == "queue_full"
        time.sleep(0.25)
        assert desk.ask(high).startswith("r")

    def test_a_short_lease_does_not_shorten_the_life_of_a_long_one(self, desk):
        desk = desk(capacity=4)
        high = tenant_entry(1, priority="high")
        desk.ask(high, deadline_s=3600)
        desk.ask(high, deadline_s=1)
        for name in (
            protocol.leases(desk.deployment.slug),
            protocol.tenant_leases(desk.deployment.slug, high.id),
        ):
            assert get_redis().pttl(name) > 3600 * 1000

    def test_retry_after_follows_the_measured_drain_rate(self, desk):
        desk = desk(capacity=1)
        high = tenant_entry(1, priority="high")
        # 20 completions a second ago: a drain rate of 2/s over the 10 s window.
        drain = protocol.drain_prefix("d") + str(int(time.time()) - 1)
        get_redis().set(drain, 20, ex=30)
        desk.ask(high)
        assert desk.ask(high) == "queue_full"
        # One request ahead at 2 per second: half a second, said as the 1 s minimum.
        assert desk.last_refusal.headers["retry-after-ms"] == "1000"
        get_redis().set(drain, 2, ex=30)  # 0.2/s: one request ahead is 5 s
        assert desk.ask(high) == "queue_full"
        assert desk.last_refusal.headers["Retry-After"] == "5"


class PriorityTestCase:
    def test_it_sheds_low_priority_first_and_high_priority_last(self, desk):
        desk = desk(capacity=8)
        high = tenant_entry(1, priority="high")
        # Weights so large that fair shares do not bind: only the priority classes do.
        low = tenant_entry(2, priority="low", fair_share_weight=1000)
        normal = tenant_entry(3, priority="normal")
        first = desk.ask(high)  # a high-priority tenant is asking ...
        desk.finish(first, high)
        # ... so low priority stops at 75% of the capacity (6 of 8) ...
        admitted_low = [desk.ask(low) for _ in range(8)]
        assert sum(code.startswith("r") for code in admitted_low) == 6
        assert admitted_low[-1] == "queue_full"
        # ... the high-priority tenant still gets in ...
        assert desk.ask(high).startswith("r")
        # ... and normal priority stops at 90% (7 of 8).
        assert desk.ask(normal) == "queue_full"
        assert desk.in_use() == 7

    @pytest.mark.parametrize("priority", ["normal", "low"])
    @pytest.mark.parametrize("capacity", [2, 8])
    def test_a_lower_class_alone_may_fill_the_whole_capacity(self, desk, priority, capacity):
        # The headroom is kept for a higher class only while one is asking.
        desk = desk(capacity=capacity)
        alone = tenant_entry(1, priority=priority)
        admitted = [desk.ask(alone) for _ in range(capacity)]
        assert all(code.startswith("r") for code in admitted)
        assert desk.ask(alone) == "queue_full"


class FairShareTestCase:
    def test_a_flooding_tenant_cannot_crowd_out_another(self, desk):
        desk = desk(capacity=8)
        alpha, beta = tenant_entry(1, priority="high"), tenant_entry(2, priority="high")
        held = [desk.ask(alpha) for _ in range(8)]
        assert all(code.startswith("r") for code in held)  # alone, alpha may use it all
        assert desk.ask(beta) == "queue_full"  # full: beta must wait for a slot ...
        # ... but each slot that frees now goes to beta until both hold their share.
        for request_id in held[:4]:
            desk.finish(request_id, alpha)
            assert desk.ask(alpha) == "queue_full"
            assert desk.ask(beta).startswith("r")
        assert desk.ask(alpha) == "queue_full"
        assert desk.ask(beta) == "queue_full"

    def test_equal_shares_leave_no_slot_idle(self, desk):
        # Three equal tenants on 8 slots: shares of 8/3 are rounded up, not down to 2 each.
        desk = desk(capacity=8)
        tenants = [tenant_entry(n, priority="high") for n in (1, 2, 3)]
        refusals_in_a_row = 0
        while refusals_in_a_row < len(tenants):
            for who in tenants:
                refused = desk.ask(who) == "queue_full"
                refusals_in_a_row = refusals_in_a_row + 1 if refused else 0
        assert desk.in_use() == 8

    def test_shares_follow_the_plan_weights(self, desk):
        desk = desk(capacity=12)
        heavy = tenant_entry(1, priority="high", fair_share_weight=2)
        light = tenant_entry(2, priority="high", fair_share_weight=1)
        assert desk.ask(light).startswith("r")  # light is asking too
        admitted = [desk.ask(heavy) for _ in range(12)]
        # heavy's share is 2/3 of 12 = 8; light holds 1 and may take up to 4.
        assert sum(code.startswith("r") for code in admitted) == 8
        assert all(desk.ask(light).startswith("r") for _ in range(3))
        assert desk.ask(light) == "queue_full"


@pytest.fixture
def slow(dataplane, alpha, subscribe):
    deployment = fixed_deployment("slow-chat", capacity=1, config={"latency_ms": 4000})
    subscribe(alpha, deployment)
    return deployment


class SaturationTestCase:
    def test_it_answers_503_queue_full_with_retry_after_and_the_client_gives_up(
        self, slow, alpha, alice, issue_key, start_worker, dataplane
    ):
        start_worker(slow)
        raw = issue_key(alpha, alice)
        first = threading.Thread(
            target=lambda: openai.OpenAI(
                base_url=f"{dataplane}/v1", api_key=raw, max_retries=0
            ).chat.completions.create(
                model="slow-chat", messages=[{"role": "user", "content": "x"}]
            ),
            daemon=True,
        )
        first.start()
        wait_until(lambda: get_redis().zcard(protocol.leases("slow-chat")) == 1)

        retrying = openai.OpenAI(base_url=f"{dataplane}/v1", api_key=raw, max_retries=1)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as refused:
            retrying.chat.completions.create(
                model="slow-chat", messages=[{"role": "user", "content": "y"}]
            )
        waited = time.monotonic() - started
        response = refused.value.response
        assert response.status_code == 503
        assert refused.value.code == "queue_full"
        assert int(response.headers["retry-after"]) >= 1
        assert int(response.headers["retry-after-ms"]) >= 1000
        # The client waited for the Retry-After the gateway sent before its one retry.
        assert waited >= 1.0
        first.join(timeout=10)

    def test_refusals_never_reach_the_queue(
        self, slow, alpha, alice, issue_key, start_worker, dataplane
    ):
        start_worker(slow)
        client = openai.OpenAI(
            base_url=f"{dataplane}/v1", api_key=issue_key(alpha, alice), max_retries=0
        )
        threading.Thread(
            target=lambda: client.chat.completions.create(
                model="slow-chat", messages=[{"role": "user", "content": "x"}]
            ),
            daemon=True,
        ).start()
        queue = f"{settings.DRAMATIQ_NAMESPACE}:deploy.slow-chat"
        # The first request is admitted, then enqueued: wait for its message.
        wait_until(lambda: get_redis().hlen(queue + ".msgs") == 1)
        before = get_redis().hlen(queue + ".msgs")
        for _ in range(5):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model="slow-chat", messages=[{"role": "user", "content": "y"}]
                )
        assert get_redis().hlen(queue + ".msgs") == before
