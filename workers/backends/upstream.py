"""OpenAIUpstreamBackend: a deployment served by an OpenAI-compatible HTTP server.

vLLM, llama.cpp's server, TGI, Ollama and OpenAI itself all speak /v1/chat/completions,
/v1/completions and /v1/embeddings. Sluice still admits, queues, meters and logs every
request; the worker thread only forwards it and waits. The upstream batches on its own
side, so this backend is not micro-batched (`batched = False`): one request per thread.

Config (the deployment's backend_config):

    base_url           required, e.g. "http://gpu-1:8000/v1"
    model              the upstream's model name (default: the request's "model")
    api_key_env        NAME of the environment variable holding the upstream's key; the key
                       itself never goes into the database
    timeout_s          per attempt, default 60, never beyond the request's deadline
    connect_timeout_s  default 5
    max_attempts       HTTP attempts per call, default 3
    backoff_ms         base of the exponential backoff with full jitter, default 200
    backoff_max_ms     its cap, default 5000
    breaker            {"failure_threshold": 5, "open_s": 30}: see workers/breaker.py

Retries inside one call: connection errors, timeouts, dropped connections and HTTP 408,
409, 429, 502, 503, 504, waiting what the upstream's retry-after-ms / Retry-After says
(else the backoff), and never past the deadline. A stream that has begun is never retried:
the client already holds its first words. Other 4xx answers are the caller's fault
(InvalidInputError with the upstream's message), except 401/403/404, which mean the
deployment is misconfigured (UpstreamError, permanent).

The circuit breaker (workers/breaker.py) counts one failure per call that got no usable
answer through no fault of the caller: every attempt failed, a 500, a refused key, a
malformed answer, a stream that broke. Any usable answer, a 400 included, closes it.
When every attempt fails, TransientBackendError lets the actor retry the whole message
(workers/runtime.py) if the deadline allows.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import redis
from django.core.exceptions import ImproperlyConfigured

from sluice import outbound
from workers import breaker

from .base import (
    Backend,
    BackendError,
    BackendRequest,
    BackendResult,
    InvalidInputError,
    TransientBackendError,
)

logger = logging.getLogger(__name__)

# The statuses the openai client itself retries, bar 500: an upstream that crashed on this
# input usually crashes again, so a 500 fails the call at once (and counts as a failure).
RETRY_STATUSES = frozenset({408, 409, 429, 502, 503, 504})
# A 4xx the caller cannot fix: Sluice's key or the deployment's base_url/model is wrong.
MISCONFIGURED_STATUSES = frozenset({401, 403, 404})
PATHS = {"chat": "chat/completions", "completion": "completions", "embedding": "embeddings"}
# Fields Sluice sets itself whatever the payload says. Only one choice is returned to the
# client, so asking the upstream for more (n) would only burn its capacity; embeddings
# travel as floats (the gateway encodes base64 for clients that ask for it).
OWN_FIELDS = ("model", "stream", "stream_options", "n", "encoding_format")
# While waiting between attempts, how often to ask whether the client has gone.
PAUSE_SLICE_S = 0.25
# Longest upstream error text passed on to clients and logs.
MESSAGE_LIMIT = 500


class UpstreamError(BackendError):
    """The upstream failed in a way that retrying will not fix (a 500, a refused key)."""


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str
    model: str | None
    api_key_env: str | None
    timeout_s: float
    connect_timeout_s: float
    max_attempts: int
    backoff_ms: float
    backoff_max_ms: float
    failure_threshold: int
    open_s: float

    @classmethod
    def parse(cls, config: dict[str, Any]) -> UpstreamConfig:
        """Read backend_config, failing loudly at worker start rather than per request."""
        base_url = str(config.get("base_url") or "")
        if not base_url.startswith(("http://", "https://")):
            raise ImproperlyConfigured(
                f"backend_config.base_url must be an http(s) URL such as "
                f"http://gpu-1:8000/v1, not {base_url!r}"
            )
        circuit = config.get("breaker") or {}
        if not isinstance(circuit, dict):
            raise ImproperlyConfigured("backend_config.breaker must be an object")
        return cls(
            # A trailing slash so relative paths join under it (httpx follows RFC 3986).
            base_url=base_url.rstrip("/") + "/",
            model=config.get("model") or None,
            api_key_env=config.get("api_key_env") or None,
            timeout_s=_number(config, "timeout_s", outbound.DEFAULT_TIMEOUT_S),
            connect_timeout_s=_number(
                config, "connect_timeout_s", outbound.DEFAULT_CONNECT_TIMEOUT_S
            ),
            max_attempts=int(_number(config, "max_attempts", 3, minimum=1)),
            backoff_ms=_number(config, "backoff_ms", 200, minimum=0),
            backoff_max_ms=_number(config, "backoff_max_ms", 5000, minimum=0),
            failure_threshold=int(
                _number(circuit, "failure_threshold", breaker.DEFAULT_FAILURE_THRESHOLD, minimum=1)
            ),
            open_s=_number(circuit, "open_s", breaker.DEFAULT_OPEN_S),
        )


def _number(config: dict[str, Any], name: str, default: float, *, minimum: float = 0.001) -> float:
    raw = config.get(name, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"backend_config {name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"backend_config {name} must be at least {minimum}, not {raw}")
    return value


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not (the upstream's fault)."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, *, deadline: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        # The client's deadline, not the upstream, ended it: no fault of the upstream's.
        self.deadline = deadline


class _StreamBroken(Exception):
    """A stream failed after the client got text from it: no retry can undo that."""

    def __init__(self, message: str, *, deadline: bool = False) -> None:
        super().__init__(message)
        self.deadline = deadline


class OpenAIUpstreamBackend(Backend):
    tasks = ("chat", "completion", "embedding")
    batched = False

    def __init__(self, config: dict[str, Any], *, deployment: str = "") -> None:
        super().__init__(config)
        self.settings = UpstreamConfig.parse(self.config)
        # The breaker's keys are per deployment; the runtime says which one this serves.
        self.deployment = deployment
        self.client: httpx.Client | None = None

    def load(self) -> None:
        headers = {}
        if self.settings.api_key_env:
            secret = os.environ.get(self.settings.api_key_env)
            if not secret:
                raise ImproperlyConfigured(
                    f"backend_config.api_key_env names {self.settings.api_key_env}, "
                    "which is not set in this worker's environment"
                )
            headers["Authorization"] = f"Bearer {secret}"
        if not self.deployment:
            logger.warning(
                "upstream %s: no deployment slug given, so its circuit breaker is off",
                self.settings.base_url,
            )
        # One pool per backend, shared by every worker thread: keep-alive connections.
        self.client = outbound.pooled_client(
            base_url=self.settings.base_url,
            headers=headers,
            timeout_s=self.settings.timeout_s,
            connect_timeout_s=self.settings.connect_timeout_s,
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": type(self).__name__,
            "base_url": self.settings.base_url,
            "model": self.settings.model,
        }

    def run_batch(self, requests: list[BackendRequest]) -> list[BackendResult | BaseException]:
        results: list[BackendResult | BaseException] = []
        for request in requests:
            try:
                results.append(self.call(request))
            except Exception as exc:
                results.append(exc)
        return results

    # --- one request ------------------------------------------------------------------

    def call(self, request: BackendRequest) -> BackendResult:
        if self.client is None:
            raise RuntimeError("OpenAIUpstreamBackend.load() was not called")
        if request.task not in PATHS:
            raise InvalidInputError(f"This deployment does not serve {request.task!r}.")
        if self._circuit_open():
            # Messages queued before the circuit opened would each wait on a failing
            # upstream for up to max_attempts timeouts; fail them fast instead.
            raise TransientBackendError(
                f"The upstream server of '{self.deployment}' is failing; its circuit is open.",
                retryable=False,
            )
        streaming = request.on_text is not None and request.task != "embedding"
        body = self._body(request, streaming=streaming)
        attempts = 0
        last = "the deadline passed before the first attempt"
        upstreams_fault = False
        while not request.expired():
            attempts += 1
            try:
                result = self._attempt(request, body, streaming=streaming)
            except _Retryable as exc:
                last = str(exc)
                wait = exc.retry_after_s
                upstreams_fault = not exc.deadline
            except _StreamBroken as exc:
                if not exc.deadline:
                    self._record_failure()
                raise TransientBackendError(str(exc)) from exc
            except UpstreamError:
                self._record_failure()
                raise
            except InvalidInputError:
                self._record_success()  # the upstream is up; the input was wrong
                raise
            else:
                self._record_success()
                result.extra["attempts"] = attempts
                return result
            if attempts >= self.settings.max_attempts:
                break
            if wait is None:
                wait = self._backoff_s(attempts)
            if wait >= self._remaining_s(request):
                # Waiting as asked would end past the deadline: the client will not wait.
                last += " (and its wait would outlast the deadline)"
                break
            logger.info(
                "upstream call for %s: attempt %d failed (%s); retrying in %.2fs",
                request.request_id,
                attempts,
                last,
                wait,
            )
            self._pause(wait, request)
        if upstreams_fault:
            # A call that only ran out of the client's time says nothing of the upstream:
            # counting it would let short deadlines open the circuit for every tenant.
            self._record_failure()
        # The attempts allowed here are spent (or the deadline is near): a retry of the
        # whole message would only repeat them, and count the failures again.
        raise TransientBackendError(
            f"The upstream server failed {attempts} time(s); the last failure: {last}",
            retryable=False,
        )

    def _body(self, request: BackendRequest, *, streaming: bool) -> dict[str, Any]:
        body = {k: v for k, v in request.payload.items() if k not in OWN_FIELDS}
        model = self.settings.model or request.payload.get("model")
        if not model:
            raise InvalidInputError("No model: set backend_config.model or send 'model'.")
        body["model"] = model
        if streaming:
            body["stream"] = True
            # Without it a stream carries no token counts, and billing needs them.
            body["stream_options"] = {"include_usage": True}
        return body

    def _attempt(
        self, request: BackendRequest, body: dict[str, Any], *, streaming: bool
    ) -> BackendResult:
        assert self.client is not None
        remaining = self._remaining_s(request)
        bounded_by_deadline = remaining < self.settings.timeout_s
        limit = outbound.timeout(
            min(self.settings.timeout_s, remaining), connect_s=self.settings.connect_timeout_s
        )
        path = PATHS[request.task]
        started = False  # whether the client has received text from this attempt
        try:
            if not streaming:
                response = self.client.post(path, json=body, timeout=limit)
                _raise_for_status(response)
                return _parse(request.task, response)
            with self.client.stream("POST", path, json=body, timeout=limit) as response:
                if response.status_code >= 300:
                    response.read()
                    _raise_for_status(response)
                result = BackendResult(text="")
                for piece in self._stream(request, response, result):
                    started = True
                    assert request.on_text is not None
                    if request.on_text(piece) is False:
                        result.finish_reason = "cancelled"
                        break
                return result
        except httpx.TransportError as exc:
            # Connection refused or reset, a timeout, a connection dropped mid-answer.
            message = f"{type(exc).__name__}: {exc or 'no detail'}"
            deadline = bounded_by_deadline and isinstance(exc, httpx.TimeoutException)
            if started:
                raise _StreamBroken(
                    f"The upstream stream broke off ({message}).", deadline=deadline
                ) from exc
            raise _Retryable(message, deadline=deadline) from exc
        except _Retryable as exc:
            if started:
                raise _StreamBroken(
                    f"The upstream stream failed: {exc}", deadline=exc.deadline
                ) from exc
            raise

    def _stream(
        self, request: BackendRequest, response: httpx.Response, result: BackendResult
    ) -> Iterator[str]:
        """Yield each content delta of an SSE stream; fill in `result` as it goes."""
        pieces = 0
        usage: dict[str, Any] | None = None
        for line in response.iter_lines():
            if request.expired():
                raise _Retryable("the deadline passed in the middle of the stream", deadline=True)
            if request.cancelled():
                result.finish_reason = "cancelled"
                return
            # Comments (": keep-alive"), blank separators, "event:" and "id:" lines carry
            # nothing for us; OpenAI's format puts everything in "data:" lines.
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise _Retryable(f"the upstream sent a malformed event: {data[:80]!r}") from None
            if chunk.get("error"):
                raise _Retryable(f"the upstream failed mid-stream: {_message_of(chunk)}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if piece:
                    pieces += 1
                    result.text = (result.text or "") + piece
                    yield piece
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
        else:
            # The body ended cleanly but without [DONE]: only complete if it said why it
            # stopped (some servers omit [DONE]); otherwise the answer was cut short.
            if result.finish_reason is None:
                raise _Retryable("the upstream ended its stream without finishing")
        if isinstance(usage, dict):
            result.prompt_tokens = _token_count(usage, "prompt_tokens")
            result.completion_tokens = _token_count(usage, "completion_tokens")
        else:
            # A server that ignores stream_options sends no counts; each content event is
            # about one token, which is closer than charging nothing.
            result.completion_tokens = pieces

    # --- timing ---------------------------------------------------------------------

    @staticmethod
    def _remaining_s(request: BackendRequest) -> float:
        return max(0.0, request.deadline_ms / 1000 - time.time())

    def _backoff_s(self, attempts: int) -> float:
        """Exponential backoff with full jitter, so that workers do not retry in step."""
        ceiling = min(self.settings.backoff_max_ms, self.settings.backoff_ms * 2 ** (attempts - 1))
        return random.uniform(0, ceiling) / 1000  # noqa: S311 (jitter, not a secret)

    def _pause(self, seconds: float, request: BackendRequest) -> None:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if request.cancelled():
                raise TransientBackendError("The client has gone; the upstream call stopped.")
            time.sleep(min(left, PAUSE_SLICE_S))

    # --- breaker --------------------------------------------------------------------

    def _circuit_open(self) -> bool:
        if not self.deployment:
            return False
        try:
            return breaker.is_open(self.deployment)
        except redis.RedisError:
            logger.warning("cannot read the circuit of %s; calling upstream", self.deployment)
            return False

    def _record_success(self) -> None:
        if not self.deployment:
            return
        try:
            breaker.record_success(self.deployment)
        except redis.RedisError:
            # Bookkeeping must not turn an answered request into a failed one.
            logger.warning("could not record an upstream success for %s", self.deployment)

    def _record_failure(self) -> None:
        if not self.deployment:
            return
        try:
            opened = breaker.record_failure(
                self.deployment,
                threshold=self.settings.failure_threshold,
                open_s=self.settings.open_s,
            )
        except redis.RedisError:
            logger.warning("could not record an upstream failure for %s", self.deployment)
            return
        if opened:
            logger.warning(
                "upstream of %s is failing: circuit open for %ss",
                self.deployment,
                self.settings.open_s,
            )


# --- answers ------------------------------------------------------------------------------


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 300:
        return
    message = _message_of(_json_or_text(response))
    if status in RETRY_STATUSES:
        raise _Retryable(f"HTTP {status}: {message}", retry_after_s(response.headers))
    if status in MISCONFIGURED_STATUSES:
        raise UpstreamError(
            f"The upstream server refused this deployment's request (HTTP {status}: {message}); "
            "check its base_url, model and api_key_env."
        )
    if 400 <= status < 500:
        raise InvalidInputError(message)
    raise UpstreamError(f"The upstream server failed on this request (HTTP {status}: {message}).")


def retry_after_s(headers: httpx.Headers) -> float | None:
    """How long the upstream asks us to wait: retry-after-ms (precise) or Retry-After
    (seconds or an HTTP date), as the openai client reads them; None if it does not say."""
    precise = headers.get("retry-after-ms")
    if precise:
        try:
            return max(0.0, float(precise) / 1000)
        except ValueError:
            pass
    plain = headers.get("retry-after")
    if not plain:
        return None
    try:
        return max(0.0, float(plain))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(plain)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _message_of(body: Any) -> str:
    """The error text of the shapes upstreams use: OpenAI's {"error": {"message"}},
    {"error": "..."}, FastAPI's {"detail"}, {"message"}, or plain text."""
    message: Any = body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error
        else:
            message = error or body.get("detail") or body.get("message") or body
    if not isinstance(message, str):
        message = json.dumps(message)
    return message.strip()[:MESSAGE_LIMIT] or "no message"


# More tokens than any one answer has: a count above it is the upstream's error.
MAX_TOKEN_COUNT = 10_000_000


def _token_count(usage: dict[str, Any], name: str) -> int:
    """A usage count as billing can take it: the upstream's number when it is a plausible
    token count, else 0 (logged): an upstream's bad arithmetic must not bill or refund."""
    value = usage.get(name)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_COUNT:
        logger.warning("ignoring the upstream's implausible %s: %r", name, value)
        return 0
    return value


def _parse(task: str, response: httpx.Response) -> BackendResult:
    try:
        answer = response.json()
        usage = answer.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        result = BackendResult(
            prompt_tokens=_token_count(usage, "prompt_tokens"),
            completion_tokens=_token_count(usage, "completion_tokens"),
        )
        if task == "embedding":
            rows = sorted(answer["data"], key=lambda row: row.get("index", 0))
            result.embeddings = [[float(x) for x in row["embedding"]] for row in rows]
            return result
        choice = answer["choices"][0]
        if task == "chat":
            result.text = (choice.get("message") or {}).get("content") or ""
        else:
            result.text = choice.get("text") or ""
        result.finish_reason = choice.get("finish_reason")
        return result
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamError(
            f"The upstream server's answer is not in OpenAI's format ({type(exc).__name__})."
        ) from exc
