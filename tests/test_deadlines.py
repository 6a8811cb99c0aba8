"""Deadlines and clients that leave: 504 on time, skipped work, capacity given back."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from sluice.redisconn import get_redis
from workers import protocol

from .conftest import fixed_deployment, wait_until


@pytest.fixture
def slow(dataplane, alpha, subscribe):
    deployment = fixed_deployment("slow-chat", capacity=4, config={"latency_ms": 1500})
    subscribe(alpha, deployment)
    return deployment


@pytest.fixture
def raw_key(alpha, alice, issue_key):
    return issue_key(alpha, alice)


def post(base: str, raw_key: str, *, timeout_header: str | None = None, client_timeout=30.0):
    headers = {"Authorization": f"Bearer {raw_key}"}
    if timeout_header is not None:
        headers["X-Request-Timeout"] = timeout_header
    return httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "slow-chat", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=client_timeout,
    )


def leases() -> int:
    return get_redis().zcard(protocol.leases("slow-chat"))


class DeadlineTestCase:
    def test_it_answers_504_at_the_deadline_and_the_worker_skips_the_message(
        self, slow, raw_key, dataplane, start_worker
    ):
        # One worker thread: the first request holds it for 1.5 s, so the second waits in
        # the queue past its 0.5 s deadline.
        worker = start_worker(slow, threads=1)
        first = threading.Thread(target=post, args=(dataplane, raw_key), daemon=True)
        first.start()
        wait_until(lambda: leases() == 1)
        reply = post(dataplane, raw_key, timeout_header="0.5")
        assert reply.status_code == 504
        error = reply.json()["error"]
        assert error["code"] == "deadline_exceeded"
        assert "X-Request-Timeout" in error["message"]
        runtime = worker.runtimes["slow-chat"]
        wait_until(lambda: runtime.dropped == 1, timeout=10, what="the worker to skip it")
        first.join(timeout=10)
        assert runtime.handled == 2
        assert leases() == 0

    def test_the_openai_client_sees_a_timeout_error(self, slow, raw_key, dataplane, start_worker):
        start_worker(slow, threads=1)
        client = openai.OpenAI(
            base_url=f"{dataplane}/v1",
            api_key=raw_key,
            max_retries=0,
            default_headers={"X-Request-Timeout": "0.3"},
        )
        with pytest.raises(openai.APIStatusError) as late:
            client.chat.completions.create(
                model="slow-chat", messages=[{"role": "user", "content": "hi"}]
            )
        assert late.value.status_code == 504
        assert late.value.code == "deadline_exceeded"

    @pytest.mark.parametrize(
        "value", ["0", "-1", "soon", "nan", "inf", "99999", "0.0001", "1_0", "1e3"]
    )
    def test_it_refuses_a_nonsense_timeout_header(self, slow, raw_key, dataplane, value):
        reply = post(dataplane, raw_key, timeout_header=value)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "X-Request-Timeout"


class LongAnswerTestCase:
    def test_an_answer_slower_than_redis_socket_defaults_still_arrives(
        self, dataplane, alpha, subscribe, raw_key, start_worker
    ):
        # redis-py times a read out after 5 s by default; a 6 s answer must still arrive.
        deployment = fixed_deployment("slow-chat", config={"latency_ms": 6000})
        subscribe(alpha, deployment)
        start_worker(deployment)
        reply = post(dataplane, raw_key)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "echo: hi"


class DisconnectTestCase:
    def test_a_client_that_leaves_releases_its_lease_and_reservation(
        self, slow, raw_key, dataplane, start_worker, alpha
    ):
        start_worker(slow, threads=1)
        with pytest.raises(httpx.ReadTimeout):
            post(dataplane, raw_key, client_timeout=0.3)
        # Released long before the worker's 1.5 s batch ends.
        wait_until(lambda: leases() == 0, timeout=1.0, what="the lease to be released")
        month = protocol.current_month()
        assert int(get_redis().hget(protocol.budget(alpha.id, month), "reserved")) == 0
        cancelled = get_redis().keys(protocol.cancel_flag("*"))
        assert len(cancelled) == 1

    def test_a_streaming_client_that_leaves_stops_its_generation(
        self, dataplane, alpha, subscribe, raw_key, start_worker
    ):
        # A slow token stream: 100 words at 50 ms each would take five seconds.
        deployment = fixed_deployment(
            "slow-chat", config={"latency_ms": 1, "token_ms": 50}, capacity=4
        )
        subscribe(alpha, deployment)
        worker = start_worker(deployment)
        words = " ".join(["word"] * 100)
        with httpx.stream(
            "POST",
            f"{dataplane}/v1/chat/completions",
            json={
                "model": "slow-chat",
                "messages": [{"role": "user", "content": words}],
                "stream": True,
                "max_tokens": 200,
            },
            headers={"Authorization": f"Bearer {raw_key}"},
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        wait_until(lambda: leases() == 0, timeout=2.0, what="the lease to be released")
        runtime = worker.runtimes["slow-chat"]
        wait_until(lambda: runtime.handled == 1, timeout=2.0, what="the generation to stop")
