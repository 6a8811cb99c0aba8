"""What a worker process runs: its deployments' backends and the inference actor.

`runworkers` builds one DeploymentRuntime per deployment it serves, loads each model once,
and registers one Dramatiq actor per deployment queue. The actor is thin: it checks the
deadline, hands the request to the micro-batcher (or straight to the backend), writes the
reply events, and settles, all keyed on the request id so that running it twice is safe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import redis
from django.utils.module_loading import import_string
from dramatiq.middleware import CurrentMessage

from sluice.redisconn import get_redis

from . import protocol, settlement
from .backends.base import (
    Backend,
    BackendError,
    BackendRequest,
    BackendResult,
    InvalidInputError,
    TransientBackendError,
)
from .batcher import DroppedError, MicroBatcher

logger = logging.getLogger(__name__)

# Retry policy, stated rather than left at Dramatiq's 20 attempts from 15 s: transient
# failures only (an upstream hiccup), twice, quickly, and never past the deadline.
MAX_RETRIES = 2
MIN_BACKOFF_MS = 100
MAX_BACKOFF_MS = 1000
# How often a long generation asks Redis whether its client has gone.
CANCEL_CHECK_S = 0.25


@dataclass(frozen=True)
class DeploymentSpec:
    slug: str
    task: str
    backend: str
    config: dict[str, Any]
    max_batch_size: int
    max_wait_ms: int
    queue_name: str

    @classmethod
    def from_model(cls, deployment) -> DeploymentSpec:
        return cls(
            slug=deployment.slug,
            task=deployment.task,
            backend=deployment.backend,
            config=dict(deployment.backend_config or {}),
            max_batch_size=deployment.max_batch_size,
            max_wait_ms=deployment.max_wait_ms,
            queue_name=deployment.queue_name,
        )


class RetryLater(Exception):
    """Raised by the actor once it has decided to retry a transient failure, so that
    Dramatiq's Retries middleware (retry_when=_retry_decided) acts on that one decision
    rather than deciding again, a moment later, against the clock."""


def _retry_decided(retries: int, exception: BaseException) -> bool:
    return isinstance(exception, RetryLater)


def should_retry(retries: int, exception: BaseException) -> bool:
    if (
        not isinstance(exception, TransientBackendError)
        or not exception.retryable
        or retries >= MAX_RETRIES
    ):
        return False
    message = CurrentMessage.get_current_message()
    if message is None or not message.args:
        return True
    # A retry that could only start after the deadline is pointless.
    return protocol.now_ms() + MIN_BACKOFF_MS * 2**retries < message.args[0]["deadline_ms"]


class ReplyWriter:
    """Writes one request's events to its reply stream."""

    def __init__(self, request_id: str) -> None:
        self.stream = protocol.reply_stream(request_id)
        self.client = get_redis()
        self.started = False

    def _add(self, kind: str, data: dict[str, Any], pipe=None) -> None:
        target = pipe or self.client.pipeline(transaction=False)
        target.xadd(self.stream, protocol.encode_event(kind, data))
        target.expire(self.stream, protocol.REPLY_TTL_S)
        if pipe is None:
            target.execute()

    def chunk(self, text: str) -> bool:
        self.started = True
        self._add("chunk", {"text": text})
        return True


@dataclass
class DeploymentRuntime:
    spec: DeploymentSpec
    backend: Backend = field(init=False)
    batcher: MicroBatcher | None = field(init=False, default=None)
    actor: dramatiq.Actor | None = field(init=False, default=None)
    handled: int = field(init=False, default=0)
    # Messages skipped because their deadline had passed or their client had gone.
    dropped: int = field(init=False, default=0)
    # request_id -> message, while a worker thread holds it.
    in_hand: dict[str, protocol.InferenceMessage] = field(init=False, default_factory=dict)
    # Request ids taken off the queue whose batch has not yet answered them: the ones the
    # batcher may wait for. A thread still writing its answer no longer counts.
    _coming: set[str] = field(init=False, default_factory=set)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        backend_class = import_string(self.spec.backend)
        if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
            raise TypeError(f"{self.spec.backend} is not a workers.backends.base.Backend")
        if self.spec.task not in backend_class.tasks:
            raise TypeError(
                f"{self.spec.backend} serves {', '.join(backend_class.tasks)}, "
                f"not {self.spec.task} (deployment {self.spec.slug})"
            )
        self.backend = backend_class(self.spec.config)
        # Backends that keep per-deployment state in Redis (the upstream circuit) need it.
        self.backend.deployment = self.spec.slug

    def start(self) -> None:
        started = time.monotonic()
        self.backend.load()
        if self.backend.batched:
            self.batcher = MicroBatcher(
                self.backend,
                max_batch_size=self.spec.max_batch_size,
                max_wait_ms=self.spec.max_wait_ms,
                name=self.spec.slug,
                in_hand=lambda: len(self._coming),
            )
        logger.info(
            "deployment %s ready in %.1fs: %s",
            self.spec.slug,
            time.monotonic() - started,
            self.backend.describe(),
        )

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()  # connection pools (the upstream backend)
        if self.actor is not None:
            # Free the name, so a runtime started later in this process may register it.
            self.actor.broker.actors.pop(self.actor.actor_name, None)
            self.actor = None

    def register(self, broker: dramatiq.Broker) -> dramatiq.Actor:
        self.actor = dramatiq.actor(
            self.handle,
            broker=broker,
            actor_name=protocol.actor_name(self.spec.slug),
            queue_name=self.spec.queue_name,
            max_retries=MAX_RETRIES,
            min_backoff=MIN_BACKOFF_MS,
            max_backoff=MAX_BACKOFF_MS,
            retry_when=_retry_decided,
        )
        return self.actor

    def status(self) -> dict[str, Any]:
        status = {
            "busy": self.busy,
            "handled": self.handled,
            "dropped": self.dropped,
            **self.backend.describe(),
        }
        if self.batcher is not None:
            status["recent_batch_sizes"] = list(self.batcher.recent_sizes)
        return status

    # --- the actor ------------------------------------------------------------------

    def handle(self, message: protocol.InferenceMessage) -> None:
        with self._lock:
            self.in_hand[message["request_id"]] = message
            self._coming.add(message["request_id"])
        try:
            self._handle(message)
        finally:
            with self._lock:
                self.handled += 1
                self.in_hand.pop(message["request_id"], None)
                self._coming.discard(message["request_id"])

    def abandon_in_hand(self) -> int:
        """Answer the messages still in hand when the worker stops without finishing them:
        503 worker_unavailable (the openai client retries it), refunded, and cancelled so
        that the copy Dramatiq requeues is dropped instead of run again."""
        with self._lock:
            left = list(self.in_hand.values())
            self.in_hand.clear()
        for message in left:
            self._fail(
                message,
                ReplyWriter(message["request_id"]),
                "worker_unavailable",
                "The model worker stopped before finishing this request; nothing was "
                "charged. Retry.",
                status=503,
                cancel=True,
            )
        return len(left)

    def _handle(self, message: protocol.InferenceMessage) -> None:
        request_id = message["request_id"]
        writer = ReplyWriter(request_id)
        client = get_redis()
        if protocol.now_ms() >= message["deadline_ms"]:
            gone, replied = True, 0
        else:
            pipe = client.pipeline(transaction=False)
            pipe.exists(protocol.cancel_flag(request_id))
            pipe.xlen(writer.stream)
            gone, replied = pipe.execute()
        if gone or replied:
            self._not_coming(request_id)  # it will not reach the batcher
        if gone:
            logger.info("dropping %s: its deadline passed or its client left", request_id)
            self._settle(message, tokens=0, completed=False)
            self._count_drop()
            return
        if replied:
            # Redelivered after its worker died mid-stream: running it again would send
            # the client its text a second time, after the part it already has.
            self._fail(
                message,
                writer,
                "worker_unavailable",
                "The model worker stopped in the middle of this answer; nothing was "
                "charged. Retry.",
                status=503,
            )
            return
        started = protocol.now_ms()
        request = BackendRequest(
            request_id=request_id,
            task=message["task"],
            payload=message["payload"],
            deadline_ms=message["deadline_ms"],
            on_text=writer.chunk if message["stream"] else None,
            cancelled=_cancel_check(client, request_id),
        )
        try:
            try:
                result = self._run(request)
            finally:
                self._not_coming(request_id)
        except DroppedError:
            self._settle(message, tokens=0, completed=False)
            self._count_drop()
            return
        except InvalidInputError as exc:
            self._fail(message, writer, exc.code, str(exc), status=400)
            return
        except TransientBackendError as exc:
            # A stream that has begun cannot be replayed without repeating itself.
            if not writer.started and should_retry(_retries(), exc):
                logger.warning("retrying %s after a transient failure: %s", request_id, exc)
                raise RetryLater(str(exc)) from exc
            self._fail(message, writer, "upstream_unavailable", str(exc), status=503)
            raise BackendError(str(exc)) from exc
        except BackendError as exc:
            self._fail(message, writer, exc.code, str(exc), status=500)
            raise  # a poison message: Dramatiq dead-letters it, with its traceback
        except Exception as exc:
            self._fail(
                message,
                writer,
                "worker_error",
                f"The model failed on this request ({type(exc).__name__}).",
                status=500,
            )
            raise
        finished = protocol.now_ms()
        done = _done_event(
            result, queue_ms=started - message["enqueued_ms"], inference_ms=finished - started
        )
        # Settle before the client hears "done", so its next request finds the lease free.
        pipe = client.pipeline(transaction=False)
        self._settle(message, tokens=result.total_tokens, completed=True, pipe=pipe)
        writer._add("done", done, pipe)
        pipe.execute()

    @property
    def busy(self) -> int:
        """Messages worker threads hold now."""
        return len(self.in_hand)

    def _not_coming(self, request_id: str) -> None:
        with self._lock:
            self._coming.discard(request_id)

    def _count_drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def _run(self, request: BackendRequest) -> BackendResult:
        timeout = max(0.001, (request.deadline_ms - protocol.now_ms()) / 1000) + 5
        if self.batcher is not None:
            try:
                return self.batcher.run(request, timeout=timeout)
            except TimeoutError:
                # Still unanswered 5 s past its deadline (a batch stuck behind a slow one):
                # its client has had its 504; this is a drop, not a poison message.
                raise DroppedError(f"{request.request_id} outlived its deadline") from None
        results = self.backend.run_batch([request])
        if isinstance(results[0], BaseException):
            raise results[0]
        return results[0]

    def _settle(self, message, *, tokens: int, completed: bool, pipe=None) -> None:
        keys = settlement.settle_keys(message["deployment"], message["tenant_id"])
        args = settlement.settle_args(
            message["request_id"],
            message["tenant_id"],
            message["deployment"],
            tokens=tokens,
            ms_per_token=message.get("ms_per_token", 0),
            completed=completed,
        )
        if pipe is not None:
            pipe.eval(settlement.SETTLE, len(keys), *keys, *args)
        else:
            settlement.settle(
                request_id=message["request_id"],
                tenant_id=message["tenant_id"],
                deployment=message["deployment"],
                tokens=tokens,
                ms_per_token=message.get("ms_per_token", 0),
                completed=completed,
            )

    def _fail(
        self,
        message,
        writer: ReplyWriter,
        code: str,
        text: str,
        *,
        status: int,
        cancel: bool = False,
    ) -> None:
        pipe = get_redis().pipeline(transaction=False)
        if cancel:
            protocol.queue_cancel(pipe, message["request_id"], message["deadline_ms"])
        self._settle(message, tokens=0, completed=False, pipe=pipe)
        writer._add("error", {"code": code, "message": text, "status": status}, pipe)
        try:
            pipe.execute()
        except redis.RedisError:
            logger.exception("could not report the failure of %s", message["request_id"])


def _retries() -> int:
    current = CurrentMessage.get_current_message()
    return int(current.options.get("retries", 0)) if current is not None else 0


def _cancel_check(client: redis.Redis, request_id: str):
    flag = protocol.cancel_flag(request_id)
    state = {"at": 0.0, "cancelled": False}

    def cancelled() -> bool:
        now = time.monotonic()
        if not state["cancelled"] and now - state["at"] >= CANCEL_CHECK_S:
            state["at"] = now
            with contextlib.suppress(redis.RedisError):  # unknown: keep going
                state["cancelled"] = bool(client.exists(flag))
        return state["cancelled"]

    return cancelled


def _done_event(result: BackendResult, *, queue_ms: int, inference_ms: int) -> dict[str, Any]:
    event: dict[str, Any] = {
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
        },
        "queue_ms": max(0, queue_ms),
        "inference_ms": inference_ms,
    }
    if result.text is not None:
        event["text"] = result.text
    if result.embeddings is not None:
        event["embeddings"] = result.embeddings
    return event
