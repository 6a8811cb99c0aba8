"""Token budgets: reserved at admission, settled to the real count, refunded on failure."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gateway.dataplane import estimate_tokens
from sluice.redisconn import get_redis
from workers import protocol

from .conftest import fixed_deployment, wait_until

PER_REQUEST = estimate_tokens("hi") + 7  # what one request below reserves


def budget(tenant) -> dict[str, int]:
    raw = get_redis().hgetall(protocol.budget(tenant.id, protocol.current_month()))
    return {name.decode(): int(value) for name, value in raw.items()}


@pytest.fixture
def chat(dataplane, alpha, subscribe):
    deployment = fixed_deployment(
        "fixed-chat", capacity=64, config={"latency_ms": 300, "fail_on": "POISON"}
    )
    subscribe(alpha, deployment)
    return deployment


@pytest.fixture
def client(dataplane, alpha, alice, issue_key):
    return openai.OpenAI(base_url=f"{dataplane}/v1", api_key=issue_key(alpha, alice), max_retries=0)


def ask(client, text: str = "hi"):
    return client.chat.completions.create(
        model="fixed-chat", messages=[{"role": "user", "content": text}], max_tokens=7
    )


class ReservationTestCase:
    def test_fifty_parallel_requests_never_overshoot_a_budget_worth_ten(
        self, chat, client, alpha, start_worker
    ):
        alpha.plan.monthly_token_budget = PER_REQUEST * 10
        alpha.plan.save(update_fields=["monthly_token_budget"])
        start_worker(chat, threads=64)

        def one(_):
            try:
                return ask(client).usage.total_tokens
            except openai.RateLimitError as refused:
                assert refused.code == "quota_exceeded"
                assert refused.response.headers["x-should-retry"] == "false"
                return None

        with ThreadPoolExecutor(max_workers=50) as pool:
            outcomes = list(pool.map(one, range(50)))
        served = [tokens for tokens in outcomes if tokens is not None]
        # Reservations admit ten at once; a straggler may find room that settlement freed.
        assert len(served) >= 10
        assert 40 >= outcomes.count(None) >= 30
        spent = budget(alpha)
        assert spent["reserved"] == 0
        assert spent["used"] == sum(served)
        assert spent["used"] <= alpha.plan.monthly_token_budget

    def test_it_settles_to_the_real_token_count(self, chat, client, alpha, start_worker):
        start_worker(chat)
        reply = ask(client, "three small words")
        assert reply.usage.total_tokens == 3 + 4  # the echo: "echo:" plus three words
        assert budget(alpha) == {"used": 7, "reserved": 0}

    def test_it_refunds_a_request_that_failed(self, chat, client, alpha, start_worker):
        start_worker(chat)
        with pytest.raises(openai.InternalServerError) as failed:
            ask(client, "POISON")
        assert failed.value.code == "worker_error"
        assert budget(alpha).get("used", 0) == 0
        assert budget(alpha)["reserved"] == 0
        assert get_redis().zcard(protocol.leases("fixed-chat")) == 0

    def test_a_request_larger_than_a_minute_of_tokens_is_refused_outright(
        self, chat, client, alpha
    ):
        # It could never pass the tokens-per-minute limit: no Retry-After would be true.
        alpha.plan.tokens_per_minute = PER_REQUEST - 1
        alpha.plan.save(update_fields=["tokens_per_minute"])
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client)
        assert refused.value.code == "invalid_request"
        assert refused.value.param == "max_tokens"
        assert "could never be admitted" in refused.value.message
        assert budget(alpha).get("reserved", 0) == 0

    def test_a_refused_request_reserves_nothing(self, chat, client, alpha):
        alpha.plan.monthly_token_budget = PER_REQUEST - 1
        alpha.plan.save(update_fields=["monthly_token_budget"])
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client)
        assert refused.value.code == "quota_exceeded"
        assert "monthly budget" in refused.value.message
        wait_until(lambda: budget(alpha).get("reserved", 0) == 0)
        assert get_redis().zcard(protocol.leases("fixed-chat")) == 0
