"""Every /v1 call, admitted or refused, leaves exactly one call-log record."""

from __future__ import annotations

import httpx
import openai
import pytest

from analytics import flusher
from analytics.models import CallLog
from tenants.models import ApiKey

from .conftest import fixed_deployment, wait_until

MESSAGES = [{"role": "user", "content": "two words"}]


@pytest.fixture
def chat(dataplane, alpha, subscribe):
    deployment = fixed_deployment("fixed-chat", config={"latency_ms": 300})
    subscribe(alpha, deployment)
    return deployment


@pytest.fixture
def raw_key(alpha, alice, issue_key):
    return issue_key(alpha, alice)


@pytest.fixture
def client(dataplane, raw_key):
    return openai.OpenAI(base_url=f"{dataplane}/v1", api_key=raw_key, max_retries=0)


def flushed(count: int) -> list[CallLog]:
    """Flush until `count` rows are in PostgreSQL (the gateway logs after it answers)."""

    def enough():
        flusher.flush_once(consumer="test", block_ms=0)
        return CallLog.objects.count() >= count

    wait_until(enough, what=f"{count} call logs")
    return list(CallLog.objects.order_by("created_at"))


class CallLogTestCase:
    def test_a_served_call_is_logged_with_tokens_and_timings(
        self, chat, client, alpha, start_worker
    ):
        start_worker(chat)
        raw = client.chat.completions.with_raw_response.create(
            model="fixed-chat", messages=MESSAGES
        )
        reply = raw.parse()
        [log] = flushed(1)
        assert log.request_id == raw.headers["x-request-id"]
        assert log.status_code == 200
        assert log.error_code == ""
        assert log.endpoint == "chat.completions"
        assert log.tenant_id == alpha.id
        assert log.api_key_id == ApiKey.objects.get(tenant=alpha).id
        assert log.deployment_id == chat.id
        assert log.prompt_tokens == reply.usage.prompt_tokens
        assert log.completion_tokens == reply.usage.completion_tokens
        assert log.inference_ms >= 300
        assert log.queue_ms >= 0
        assert log.total_ms >= log.inference_ms

    def test_a_streamed_call_is_logged_when_the_stream_ends(self, chat, client, start_worker):
        start_worker(chat)
        list(client.chat.completions.create(model="fixed-chat", messages=MESSAGES, stream=True))
        [log] = flushed(1)
        assert log.status_code == 200
        assert log.completion_tokens == 3

    def test_refusals_and_bad_requests_are_logged_too(self, chat, client, dataplane):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="fixed-chat", messages=MESSAGES, temperature=9)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{dataplane}/v1", api_key="sk-sluice-nope", max_retries=0
            ).models.list()
        logs = flushed(2)
        assert [(log.status_code, log.error_code) for log in logs] == [
            (400, "invalid_request"),
            (401, "invalid_api_key"),
        ]
        assert logs[1].tenant_id is None

    def test_a_client_that_leaves_is_logged_as_499(self, chat, raw_key, dataplane, start_worker):
        start_worker(chat)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{dataplane}/v1/chat/completions",
                json={"model": "fixed-chat", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {raw_key}"},
                timeout=0.1,
            )
        [log] = flushed(1)
        assert (log.status_code, log.error_code) == (499, "client_closed")
        assert log.prompt_tokens == 0
