"""The OpenAI-compatible upstream backend and its circuit breaker.

Everything here is real: a local HTTP server that speaks OpenAI's API (with scripted
faults), Redis, and the gateway's own admission script.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from gateway import admission
from sluice.errors import SluiceError
from sluice.redisconn import get_redis
from tests import entries
from tests.entries import deployment_entry, tenant_entry
from tests.upstream_server import UpstreamServer
from workers import breaker, protocol, settlement
from workers.backends.base import (
    BackendError,
    BackendRequest,
    BackendResult,
    InvalidInputError,
    TransientBackendError,
)
from workers.backends.upstream import OpenAIUpstreamBackend, UpstreamError


@pytest.fixture
def upstream():
    with UpstreamServer() as server:
        yield server


@pytest.fixture
def slug() -> str:
    # Each test its own deployment, so breaker keys never leak between tests.
    return f"upstream-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_backend(upstream, slug):
    made: list[OpenAIUpstreamBackend] = []

    def make(**config: Any) -> OpenAIUpstreamBackend:
        backend = OpenAIUpstreamBackend(
            {"base_url": upstream.base_url, "model": "served-model", "backoff_ms": 10, **config},
            deployment=slug,
        )
        backend.load()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def request(
    text: str = "one two three",
    *,
    task: str = "chat",
    deadline_s: float = 10.0,
    on_text: Callable[[str], bool] | None = None,
    **params: Any,
) -> BackendRequest:
    if task == "chat":
        payload: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    elif task == "completion":
        payload = {"prompt": text}
    else:
        payload = {"input": text.split("|")}
    return BackendRequest(
        request_id=f"req-{uuid.uuid4().hex[:12]}",
        task=task,
        payload={"model": "sluice-deployment", **payload, **params},
        deadline_ms=protocol.now_ms() + int(deadline_s * 1000),
        on_text=on_text,
    )


def call(backend: OpenAIUpstreamBackend, req: BackendRequest) -> BackendResult:
    """Through run_batch, as the worker runtime calls it."""
    [result] = backend.run_batch([req])
    if isinstance(result, BaseException):
        raise result
    return result


def failures(slug: str) -> int:
    return int(get_redis().get(protocol.breaker_failures(slug)) or 0)


def wait_until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > until:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.02)


class UpstreamCallsTestCase:
    def test_it_retries_after_two_503s_then_succeeds(self, upstream, make_backend, slug):
        upstream.fail(2, status=503)
        result = call(make_backend(), request("hello there"))
        assert result.text == "echo: hello there"
        assert result.extra["attempts"] == 3
        assert len(upstream.requests) == 3
        assert breaker.state(slug) == "closed"
        assert failures(slug) == 0

    def test_it_waits_at_least_as_long_as_the_upstreams_retry_after(self, upstream, make_backend):
        upstream.fail(1, status=503, retry_after=1)
        result = call(make_backend(), request())
        assert result.text == "echo: one two three"
        first, second = upstream.wait_for_requests(2)
        # Loosely: the backoff alone (10 ms base) would have come back far sooner.
        assert second.at - first.at >= 0.9

    def test_it_prefers_retry_after_ms_to_retry_after(self, upstream, make_backend):
        # Retry-After alone (30 s) would outlast the 10 s deadline and end the call.
        upstream.fail(1, status=429, retry_after=30, retry_after_ms=300)
        result = call(make_backend(), request(deadline_s=10))
        assert result.text == "echo: one two three"
        first, second = upstream.wait_for_requests(2)
        assert second.at - first.at >= 0.25

    def test_it_gives_up_at_once_when_the_wait_asked_for_outlasts_the_deadline(
        self, upstream, make_backend, slug
    ):
        upstream.fail(1, status=503, retry_after=30)
        with pytest.raises(TransientBackendError, match="outlast the deadline"):
            call(make_backend(), request(deadline_s=5))
        assert len(upstream.requests) == 1
        assert failures(slug) == 1

    def test_it_turns_an_upstream_400_into_invalid_input_with_its_message(
        self, upstream, make_backend, slug
    ):
        upstream.fail(1, status=400, message="max_tokens must be at most 4096.")
        with pytest.raises(InvalidInputError, match="max_tokens must be at most 4096"):
            call(make_backend(), request(max_tokens=100_000))
        assert len(upstream.requests) == 1  # the caller's fault: never retried
        assert failures(slug) == 0

    def test_it_retries_a_dropped_connection_and_a_hung_upstream(self, upstream, make_backend):
        upstream.drop(1)
        upstream.hang(1)
        result = call(make_backend(timeout_s=0.5), request())
        assert result.text == "echo: one two three"
        assert result.extra["attempts"] == 3
        assert len(upstream.requests) == 3

    def test_it_counts_one_failure_when_every_attempt_fails(self, upstream, make_backend, slug):
        upstream.fail_always(status=502, message="bad gateway upstream")
        with pytest.raises(TransientBackendError, match="3 time"):
            call(make_backend(max_attempts=3), request())
        assert len(upstream.requests) == 3
        assert failures(slug) == 1
        assert breaker.state(slug) == "closed"

    def test_it_fails_a_500_at_once_and_counts_it_as_a_failure(self, upstream, make_backend, slug):
        upstream.fail(1, status=500, message="CUDA error: an illegal memory access")
        with pytest.raises(UpstreamError, match="HTTP 500") as caught:
            call(make_backend(), request())
        assert not isinstance(caught.value, InvalidInputError)  # not the caller's fault
        assert len(upstream.requests) == 1
        assert failures(slug) == 1

    def test_it_treats_a_refused_key_as_a_deployment_fault_not_the_callers(
        self, upstream, make_backend
    ):
        upstream.fail(1, status=401, message="Incorrect API key provided.")
        with pytest.raises(BackendError, match="api_key_env") as caught:
            call(make_backend(), request())
        assert not isinstance(caught.value, InvalidInputError)

    def test_it_sends_the_configured_model_and_the_key_from_the_environment(
        self, upstream, make_backend, monkeypatch
    ):
        monkeypatch.setenv("SLUICE_TEST_UPSTREAM_KEY", "sk-upstream-secret")
        call(make_backend(api_key_env="SLUICE_TEST_UPSTREAM_KEY"), request(temperature=0.2))
        [seen] = upstream.requests
        assert seen.path == "/v1/chat/completions"
        assert seen.headers["authorization"] == "Bearer sk-upstream-secret"
        assert seen.body["model"] == "served-model"
        assert seen.body["temperature"] == 0.2
        assert "stream" not in seen.body

    def test_it_sends_the_requests_model_when_none_is_configured(self, upstream, make_backend):
        call(make_backend(model=None), request())
        assert upstream.requests[0].body["model"] == "sluice-deployment"

    def test_it_refuses_to_load_when_the_key_variable_is_unset(self, upstream, monkeypatch):
        monkeypatch.delenv("SLUICE_TEST_MISSING_KEY", raising=False)
        backend = OpenAIUpstreamBackend(
            {"base_url": upstream.base_url, "api_key_env": "SLUICE_TEST_MISSING_KEY"}
        )
        with pytest.raises(ImproperlyConfigured, match="SLUICE_TEST_MISSING_KEY"):
            backend.load()

    def test_it_refuses_a_config_without_an_http_base_url(self):
        with pytest.raises(ImproperlyConfigured, match="base_url"):
            OpenAIUpstreamBackend({"base_url": "gpu-1:8000"})

    def test_it_passes_the_upstreams_usage_and_finish_reason_through(self, make_backend):
        backend = make_backend()
        chat = call(backend, request("a b c d e", max_tokens=3))
        assert (chat.text, chat.finish_reason) == ("echo: a b", "length")
        assert (chat.prompt_tokens, chat.completion_tokens) == (5, 3)
        completion = call(backend, request("to be or not", task="completion"))
        assert completion.text == "echo: to be or not"
        assert (completion.prompt_tokens, completion.completion_tokens) == (4, 5)
        assert completion.finish_reason == "stop"

    def test_it_returns_embeddings_in_input_order_with_their_usage(self, upstream, make_backend):
        backend = make_backend()
        pair = call(backend, request("first text|second one here", task="embedding"))
        first = call(backend, request("first text", task="embedding"))
        assert pair.embeddings is not None and len(pair.embeddings) == 2
        assert pair.embeddings[0] == first.embeddings[0]  # the server answers out of order
        assert pair.embeddings[0] != pair.embeddings[1]
        assert (pair.prompt_tokens, pair.completion_tokens) == (5, 0)
        assert upstream.requests[0].path == "/v1/embeddings"

    def test_it_reuses_pooled_connections_across_calls(self, upstream, make_backend):
        backend = make_backend()
        for _ in range(3):
            call(backend, request())
        # httpx keeps the connection alive: every request arrived over one socket.
        assert len({seen.client_port for seen in upstream.requests}) == 1


class UpstreamStreamingTestCase:
    def test_it_streams_chunks_in_order_and_they_join_to_the_text(self, upstream, make_backend):
        pieces: list[str] = []
        result = call(make_backend(), request("one two three", on_text=pieces.append))
        assert pieces == ["echo:", " one", " two", " three"]
        assert "".join(pieces) == result.text == "echo: one two three"
        assert result.finish_reason == "stop"
        assert (result.prompt_tokens, result.completion_tokens) == (3, 4)
        body = upstream.requests[0].body
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}

    def test_it_streams_completions_too(self, make_backend):
        pieces: list[str] = []
        result = call(make_backend(), request("x y", task="completion", on_text=pieces.append))
        assert pieces == ["echo:", " x", " y"]
        assert result.text == "echo: x y"
        assert (result.prompt_tokens, result.completion_tokens) == (2, 3)

    def test_it_never_retries_a_stream_that_has_started(self, upstream, make_backend, slug):
        upstream.drop_stream(after_chunks=2)
        pieces: list[str] = []
        with pytest.raises(TransientBackendError, match="broke off"):
            call(make_backend(), request("one two three", on_text=pieces.append))
        assert pieces == ["echo:", " one"]
        assert len(upstream.requests) == 1
        assert failures(slug) == 1

    def test_it_retries_a_stream_that_failed_before_its_first_word(self, upstream, make_backend):
        upstream.fail(1, status=503)
        pieces: list[str] = []
        result = call(make_backend(), request("hi", on_text=pieces.append))
        assert "".join(pieces) == result.text == "echo: hi"
        assert len(upstream.requests) == 2

    def test_it_stops_reading_when_the_client_has_gone(self, make_backend):
        pieces: list[str] = []

        def take_two(piece: str) -> bool:
            pieces.append(piece)
            return len(pieces) < 2

        result = call(make_backend(), request("one two three four", on_text=take_two))
        assert pieces == ["echo:", " one"]
        assert result.finish_reason == "cancelled"


# --- the circuit breaker, seen from the gateway -----------------------------------------


def admit(slug: str, config: dict[str, Any], request_id: str) -> admission.Admission:
    """Run the gateway's real admission script for one request to deployment `slug`."""
    tenant = tenant_entry(uuid.uuid4().int % 10**9, deployments=(slug,))
    return entries.admit(
        request_id=request_id,
        tenant=tenant,
        deployment=deployment_entry(slug, config=config),
        deadline_s=30.0,
    )


def refusal(slug: str, config: dict[str, Any], request_id: str) -> SluiceError:
    with pytest.raises(SluiceError) as caught:
        admit(slug, config, request_id)
    return caught.value


class CircuitBreakerTestCase:
    @pytest.fixture
    def config(self, upstream) -> dict[str, Any]:
        return {
            "base_url": upstream.base_url,
            "model": "served-model",
            "max_attempts": 1,
            "breaker": {"failure_threshold": 2, "open_s": 1},
        }

    @pytest.fixture
    def backend(self, config, make_backend) -> OpenAIUpstreamBackend:
        return make_backend(**config)

    def trip(self, upstream, backend, slug) -> None:
        upstream.fail_always(status=503)
        for _ in range(2):
            with pytest.raises(TransientBackendError):
                call(backend, request())
        assert breaker.state(slug, threshold=2) == "open"

    def test_it_stays_closed_below_the_threshold_and_a_success_resets_the_count(
        self, upstream, backend, slug, config
    ):
        upstream.fail(1, status=503)
        with pytest.raises(TransientBackendError):
            call(backend, request())
        assert failures(slug) == 1
        assert breaker.state(slug, threshold=2) == "closed"
        call(backend, request())
        assert failures(slug) == 0
        admit(slug, config, "after-success")  # admitted: no exception

    def test_it_opens_after_the_threshold_and_the_gateway_refuses_with_retry_after(
        self, upstream, backend, slug, config
    ):
        self.trip(upstream, backend, slug)
        error = refusal(slug, config, "refused")
        assert error.error.code == "upstream_unavailable"
        assert error.error.status == 503
        assert int(error.headers["Retry-After"]) >= 1
        assert int(error.headers["retry-after-ms"]) > 0

    def test_it_fails_fast_in_the_worker_while_the_circuit_is_open(self, upstream, backend, slug):
        self.trip(upstream, backend, slug)
        seen = len(upstream.requests)
        with pytest.raises(TransientBackendError, match="circuit is open"):
            call(backend, request())
        assert len(upstream.requests) == seen  # the failing upstream was spared

    def test_it_admits_exactly_one_probe_when_half_open_and_its_success_closes_the_circuit(
        self, upstream, backend, slug, config
    ):
        self.trip(upstream, backend, slug)
        wait_until(lambda: breaker.state(slug, threshold=2) == "half_open")
        probe = request()
        admit(slug, config, probe.request_id)
        for other in ("second", "third"):
            error = refusal(slug, config, other)
            assert error.error.code == "upstream_unavailable"
            assert error.headers["Retry-After"] == "1"
        upstream.heal()
        assert call(backend, probe).text == "echo: one two three"
        assert breaker.state(slug, threshold=2) == "closed"
        admit(slug, config, "after-the-probe")
        admit(slug, config, "and-another")

    def test_it_opens_again_when_the_probe_fails(self, upstream, backend, slug, config):
        self.trip(upstream, backend, slug)
        wait_until(lambda: breaker.state(slug, threshold=2) == "half_open")
        probe = request()
        admit(slug, config, probe.request_id)
        with pytest.raises(TransientBackendError):
            call(backend, probe)
        assert breaker.state(slug, threshold=2) == "open"
        assert refusal(slug, config, "next").error.code == "upstream_unavailable"

    def test_a_probe_that_never_reaches_the_upstream_hands_the_circuit_on(
        self, upstream, backend, slug, config
    ):
        # Its client left, or its deadline passed in the queue: it is settled unrun.
        self.trip(upstream, backend, slug)
        wait_until(lambda: breaker.state(slug, threshold=2) == "half_open")
        admit(slug, config, "probe-gone")
        assert refusal(slug, config, "waiting").error.code == "upstream_unavailable"
        settlement.settle(
            request_id="probe-gone",
            tenant_id=0,
            deployment=slug,
            tokens=0,
            ms_per_token=0,
            completed=False,
        )
        admit(slug, config, "next-probe")  # admitted: no exception

    def test_short_client_deadlines_do_not_open_the_circuit(self, upstream, backend, slug):
        # A healthy upstream that is slower than the clients' deadlines: their timeouts are
        # the clients' own, not the upstream's failures.
        upstream.hang(5, seconds=1.0)
        for _ in range(5):
            with pytest.raises(TransientBackendError) as failed:
                call(backend, request(deadline_s=0.3))
            assert not failed.value.retryable
        assert failures(slug) == 0
        assert breaker.state(slug, threshold=2) == "closed"

    def test_an_open_circuit_is_not_retried_by_the_worker(self, upstream, backend, slug):
        self.trip(upstream, backend, slug)
        with pytest.raises(TransientBackendError) as failed:
            call(backend, request())
        assert not failed.value.retryable


@pytest.mark.parametrize(
    ("value", "counted"),
    [(12, 12), (12.0, 12), (None, 0), (-5, 0), (10**12, 0), ("12", 0), (True, 0), (1.5, 0)],
)
def test_implausible_usage_counts_are_not_billed(value, counted):
    from workers.backends.upstream import _token_count

    assert _token_count({"prompt_tokens": value}, "prompt_tokens") == counted
