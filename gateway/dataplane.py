"""The way of one inference request through the gateway, after its body is validated.

authenticate (in-process catalog, no database once warm) -> access (the tenant's
subscriptions) -> admission (one Redis Lua call: rate, tokens, budget, capacity) ->
enqueue (one Redis call) -> await the reply stream (XREAD, no thread held) -> settle or
refund -> one call-log record on the Redis stream.

Every exit path of an admitted request settles it exactly once: the worker on success
or failure, this module when the deadline passes or the client leaves (settlement is
idempotent on the request id, so whichever comes second changes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis
from django.conf import settings
from django.http import HttpRequest

from analytics import calllog
from sluice import errors
from sluice.errors import SluiceError
from sluice.redisconn import get_async_redis
from tenants.authentication import bearer_token
from tenants.models import KEY_PREFIX, Scope, hash_secret, parse_raw_key
from workers import broker, protocol, settlement

from . import admission
from .catalog import (
    DeploymentEntry,
    KeyEntry,
    PromptApiEntry,
    TenantEntry,
    catalog,
    key_is_expired,
)

logger = logging.getLogger(__name__)

TIMEOUT_HEADER = "X-Request-Timeout"
MAX_DEADLINE_S = 3600.0
# Longest single XREAD block; the loop re-checks the deadline between reads. Well under
# the Redis socket timeout (sluice.redisconn.SOCKET_TIMEOUT_S), which would cut it short.
READ_BLOCK_MS = 2000
# A status for the call log when the client went away before the answer (nginx's 499).
CLIENT_CLOSED = 499


# --- who is calling ---------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    key: KeyEntry
    tenant: TenantEntry


async def authenticate(request: HttpRequest) -> Caller:
    """The key and tenant behind `Authorization: Bearer sk-sluice-...`, from the catalog."""
    raw = bearer_token(request)
    if raw is None:
        raise SluiceError(
            errors.NOT_AUTHENTICATED,
            "Send your API key as 'Authorization: Bearer sk-sluice-...'.",
        )
    if not raw.startswith(KEY_PREFIX):
        raise SluiceError(
            errors.INVALID_API_KEY, f"That is not a Sluice API key; keys start with '{KEY_PREFIX}'."
        )
    parsed = parse_raw_key(raw)
    if parsed is None:
        raise SluiceError(errors.INVALID_API_KEY, "The API key is malformed or mistyped.")
    prefix, secret = parsed
    entry = await catalog.key(prefix)
    if entry is None or not hmac.compare_digest(entry.secret_hash, hash_secret(secret)):
        raise SluiceError(errors.INVALID_API_KEY, "The API key is invalid.")
    if entry.revoked_at:
        raise SluiceError(
            errors.INVALID_API_KEY, f"This API key was revoked on {entry.revoked_at} UTC."
        )
    if key_is_expired(entry):
        raise SluiceError(errors.INVALID_API_KEY, "This API key has expired.")
    if Scope.INFERENCE not in entry.scopes:
        raise SluiceError(
            errors.INSUFFICIENT_SCOPE,
            "This API key lacks the 'inference' scope that the /v1 endpoints need.",
        )
    tenant = await catalog.tenant(entry.tenant_id)
    if tenant is None:
        raise SluiceError(errors.INVALID_API_KEY, "The API key is invalid.")
    if not tenant.active:
        raise SluiceError(
            errors.TENANT_SUSPENDED,
            f"Tenant '{tenant.slug}' is suspended, so its API keys are disabled.",
        )
    return Caller(key=entry, tenant=tenant)


# --- what it may call ---------------------------------------------------------------------


TASK_ENDPOINTS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
    "classification": "/v1/apis/<slug>",
}


async def access_deployment(
    caller: Caller, slug: str, *, tasks: tuple[str, ...]
) -> DeploymentEntry:
    """The deployment named by `model`, if the caller's tenant may use it for this task."""
    deployment = await catalog.deployment(slug)
    if deployment is None or not deployment.enabled:
        raise SluiceError(
            errors.MODEL_NOT_FOUND,
            f"The model '{slug}' does not exist or is disabled; GET /v1/models lists the "
            "models your key may use.",
            param="model",
        )
    if slug not in caller.tenant.deployments:
        raise SluiceError(
            errors.ACCESS_NOT_APPROVED,
            f"Tenant '{caller.tenant.slug}' has no approved subscription to '{slug}'. "
            "Request access in the console or with POST /api/access-requests/ "
            f'{{"kind": "subscribe_deployment", "deployment": "{slug}"}}.',
            param="model",
        )
    check_task(deployment, tasks)
    return deployment


def check_task(deployment: DeploymentEntry, tasks: tuple[str, ...]) -> None:
    # A chat model also answers plain completions (the backend runs both).
    if deployment.task not in tasks:
        raise SluiceError(
            errors.INVALID_REQUEST,
            f"'{deployment.slug}' is a {deployment.task} model; call it at "
            f"{TASK_ENDPOINTS.get(deployment.task, 'its own endpoint')}.",
            param="model",
        )


async def access_prompt_api(caller: Caller, slug: str) -> PromptApiEntry:
    prompt_api = await catalog.prompt_api(slug)
    # Another tenant's private prompt-API does not exist, as far as this caller knows.
    if prompt_api is None or (
        prompt_api.visibility != "public"
        and prompt_api.tenant_id is not None
        and prompt_api.tenant_id != caller.tenant.id
    ):
        raise SluiceError(errors.NOT_FOUND, f"No prompt-API '{slug}'.")
    # A tenant's own prompt-APIs need no subscription (and one it has just created may
    # not be in its cached entry yet).
    if prompt_api.tenant_id != caller.tenant.id and slug not in caller.tenant.prompt_apis:
        raise SluiceError(
            errors.ACCESS_NOT_APPROVED,
            f"Tenant '{caller.tenant.slug}' has no approved subscription to the prompt-API "
            f"'{slug}'. Request access in the console or with POST /api/access-requests/ "
            f'{{"kind": "subscribe_prompt_api", "prompt_api": "{slug}"}}.',
        )
    return prompt_api


async def check_owner_access(prompt_api: PromptApiEntry, version) -> None:
    """A tenant's prompt-API runs on its owner's access: when the owner loses its
    subscription to the model (or is suspended), the prompt-API stops for every caller."""
    if prompt_api.tenant_id is None:
        return  # platform-wide
    owner = await catalog.tenant(prompt_api.tenant_id)
    if owner is None or not owner.active or version.deployment not in owner.deployments:
        raise SluiceError(
            errors.PERMISSION_DENIED,
            f"The prompt-API '{prompt_api.slug}' v{version.number} runs on "
            f"'{version.deployment}', which its owner may no longer use; its owner must "
            "renew that subscription.",
        )


# --- limits ---------------------------------------------------------------------------


def resolve_max_tokens(caller: Caller, deployment: DeploymentEntry, asked: int | None) -> int:
    cap = caller.tenant.limits.max_tokens_cap
    if asked is not None and asked > cap:
        raise SluiceError(
            errors.INVALID_REQUEST,
            f"max_tokens is {asked}, above your plan's cap of {cap}; ask for less, or ask "
            "for a higher cap (POST /api/access-requests/ with kind raise_quota).",
            param="max_tokens",
        )
    default = int(deployment.config.get("default_max_tokens", 256))
    return asked if asked is not None else max(1, min(cap, default))


def estimate_tokens(*texts: str) -> int:
    """An upper estimate of the prompt's tokens, reserved at admission and settled later.

    The gateway holds no tokenizer (the web process loads no model), so it reserves by
    UTF-8 length: BPE vocabularies average three to four bytes a token in English, and
    settlement corrects the tenant's budget to the worker's real count.
    """
    size = sum(len(text.encode()) for text in texts)
    return math.ceil(size / 3) + 4 * len(texts) + 8


_SECONDS = re.compile(r"[0-9]{1,7}(\.[0-9]{1,6})?")
# Below this no answer can come back: the deadline is shorter than one round trip.
MIN_DEADLINE_S = 0.01


def deadline_for(request: HttpRequest, deployment: DeploymentEntry) -> tuple[float, int]:
    """(seconds allowed, epoch ms deadline) from X-Request-Timeout or the deployment."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        seconds = deployment.default_deadline_s or settings.SLUICE_DEFAULT_DEADLINE_S
    else:
        # Plain decimals only (float() would also take "1_0", "inf" and "1e3").
        seconds = float(raw) if _SECONDS.fullmatch(raw.strip()) else -1.0
        if not (MIN_DEADLINE_S <= seconds <= MAX_DEADLINE_S):
            raise SluiceError(
                errors.INVALID_REQUEST,
                f"{TIMEOUT_HEADER} must be a number of seconds from {MIN_DEADLINE_S} to "
                f"{MAX_DEADLINE_S:.0f}, not {raw!r}.",
                param=TIMEOUT_HEADER,
            )
    return seconds, protocol.now_ms() + int(seconds * 1000)


# --- the call ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the worker said: the done event's data, or the chunks so far."""

    done: dict[str, Any] | None = None
    chunks: list[str] = field(default_factory=list)


@dataclass
class Call:
    """One admitted request, from enqueue to settlement and its call-log record."""

    request_id: str
    endpoint: str
    caller: Caller | None
    started: float = field(default_factory=time.monotonic)
    created_at: float = field(default_factory=time.time)
    deployment: DeploymentEntry | None = None
    version_id: int | None = None
    admitted: admission.Admission | None = None
    deadline_ms: int = 0
    status_code: int = 200
    error_code: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float | None = None
    inference_ms: float | None = None
    # Set once a streaming response owns the rest of the call (see detach()).
    detached: bool = False
    _stream_id: str = "0-0"
    # From the moment the admit script may have run until a refusal says it wrote nothing:
    # a disconnect or a lost reply in between must still release the lease it may hold.
    _may_hold: bool = False
    _settled: bool = False
    _logged: bool = False

    # --- admission and enqueue ---

    async def submit(
        self,
        *,
        deployment: DeploymentEntry,
        deadline_ms: int,
        reserve_tokens: int,
        payload: dict[str, Any],
        stream: bool,
        task: str | None = None,
    ) -> None:
        """Admit the request and put it on the deployment's queue, or raise why not."""
        assert self.caller is not None
        self.deployment = deployment
        self.deadline_ms = deadline_ms
        tenant = self.caller.tenant
        per_minute = tenant.limits.tokens_per_minute
        if reserve_tokens > per_minute:
            raise SluiceError(
                errors.INVALID_REQUEST,
                f"This request may use up to {reserve_tokens:,} tokens (its prompt plus "
                f"max_tokens), more than tenant '{tenant.slug}' may use in a minute "
                f"({per_minute:,}), so it could never be admitted. Lower max_tokens or "
                "shorten the input, or ask for a higher limit (POST /api/access-requests/ "
                "with kind raise_quota).",
                param="max_tokens",
            )
        self._may_hold = True
        try:
            self.admitted = await admission.admit(
                request_id=self.request_id,
                key=self.caller.key,
                tenant=tenant,
                deployment=deployment,
                deadline_ms=deadline_ms,
                reserve_tokens=reserve_tokens,
            )
        except SluiceError:
            self._may_hold = False  # refused: the script wrote nothing
            raise
        message: protocol.InferenceMessage = {
            "request_id": self.request_id,
            "deployment": deployment.slug,
            "task": task or deployment.task,  # type: ignore[typeddict-item]
            "tenant_id": tenant.id,
            "deadline_ms": deadline_ms,
            "enqueued_ms": protocol.now_ms(),
            "stream": stream,
            "payload": payload,
            "ms_per_token": admission.ms_per_token(tenant),
        }
        try:
            await broker.send_async(
                deployment.queue_name, protocol.actor_name(deployment.slug), message
            )
        except (redis.RedisError, OSError) as exc:
            logger.warning("could not enqueue %s: %s", self.request_id, exc)
            # The message may have gone out with only its reply lost: cancel it too.
            await self.release(cancel=True)
            raise SluiceError(
                errors.BROKER_UNAVAILABLE,
                "The work queue cannot be reached right now; nothing was charged. Retry shortly.",
                headers=admission.retry_headers(1000),
            ) from exc

    def detach(self) -> None:
        """The streaming body takes over: it settles and logs when the stream ends."""
        self.detached = True

    def headers(self) -> dict[str, str]:
        return self.admitted.headers() if self.admitted is not None else {}

    # --- waiting for the worker ---

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The worker's events as they arrive, until done/error or the deadline.

        Raises SluiceError(DEADLINE_EXCEEDED) at the deadline (after cancelling the work and
        refunding it); an error event is raised as the SluiceError it describes.
        """
        client = get_async_redis()
        stream = protocol.reply_stream(self.request_id)
        last_look = False
        while True:
            left_ms = self.deadline_ms - protocol.now_ms()
            if last_look:
                raise self.deadline_error()
            if left_ms <= 0:
                if await self.release(cancel=True):
                    raise self.deadline_error()
                # The worker settled as the deadline passed, so it was charged: its answer
                # is on the stream (written with the settlement); read what is there.
                last_look = True
            reply = await client.xread(
                {stream: self._stream_id}, block=None if last_look else min(left_ms, READ_BLOCK_MS)
            )
            for _name, entries in reply or ():
                for entry_id, fields in entries:
                    self._stream_id = entry_id
                    event = protocol.decode_event(fields)
                    if event["type"] == "error":
                        self._settled = True  # the worker settled before writing it
                        raise worker_error(event["data"])
                    if event["type"] == "done":
                        self._settled = True
                        self._account(event["data"])
                    yield event["type"], event["data"]
                    if event["type"] == "done":
                        return

    async def result(self) -> Outcome:
        outcome = Outcome()
        async for kind, data in self.events():
            if kind == "chunk":
                outcome.chunks.append(data.get("text", ""))
            else:
                outcome.done = data
        return outcome

    def _account(self, done: dict[str, Any]) -> None:
        usage = done.get("usage") or {}
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        self.queue_ms = done.get("queue_ms")
        self.inference_ms = done.get("inference_ms")

    def deadline_error(self) -> SluiceError:
        allowed = (self.deadline_ms / 1000) - self.created_at
        return SluiceError(
            errors.DEADLINE_EXCEEDED,
            f"The request did not finish within its deadline of {allowed:.1f} s; nothing was "
            f"charged. Send a longer {TIMEOUT_HEADER} (seconds) or retry when the model is "
            "less busy.",
        )

    # --- ending ---

    async def release(self, *, cancel: bool) -> None:
        """Refund and free the lease of a request the client will not get (idempotent).

        Returns False when the settle script found the request already settled (its worker
        finished it just now), True otherwise.
        """
        if self._settled or not self._may_hold or self.caller is None:
            return True
        self._settled = True
        assert self.deployment is not None
        tenant = self.caller.tenant
        client = get_async_redis()
        keys = settlement.settle_keys(self.deployment.slug, tenant.id)
        args = settlement.settle_args(
            self.request_id,
            tenant.id,
            self.deployment.slug,
            tokens=0,
            ms_per_token=admission.ms_per_token(tenant),
            completed=False,
        )
        try:
            async with client.pipeline(transaction=False) as pipe:
                if cancel:
                    # Workers skip a cancelled message and stop a generation in progress.
                    protocol.queue_cancel(pipe, self.request_id, self.deadline_ms)
                pipe.eval(settlement.SETTLE, len(keys), *keys, *args)
                reserved = (await pipe.execute())[-1]
        except (redis.RedisError, OSError):
            # The lease and the reservation expire at the deadline on their own.
            logger.warning("could not release %s", self.request_id, exc_info=True)
            return True
        return int(reserved) != -1

    def fail(self, error: SluiceError) -> None:
        self.status_code = error.error.status
        self.error_code = error.error.code

    async def client_gone(self) -> None:
        self.status_code = CLIENT_CLOSED
        self.error_code = "client_closed"
        await self.release(cancel=True)

    async def log(self) -> None:
        """Append this call's record to the call-log stream (once)."""
        if self._logged:
            return
        self._logged = True
        caller = self.caller
        record: calllog.CallRecord = {
            "request_id": self.request_id,
            "tenant_id": caller.tenant.id if caller else None,
            "api_key_id": caller.key.id if caller else None,
            "deployment_id": self.deployment.id if self.deployment else None,
            "prompt_api_version_id": self.version_id,
            "endpoint": self.endpoint,
            "status_code": self.status_code,
            "error_code": self.error_code,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_ms": self.queue_ms,
            "inference_ms": self.inference_ms,
            "total_ms": round((time.monotonic() - self.started) * 1000, 3),
            "created_at": self.created_at,
        }
        await calllog.append(record)


def worker_error(data: dict[str, Any]) -> SluiceError:
    """The SluiceError for an error event written by a worker."""
    code = errors.all_codes().get(str(data.get("code")))
    if code is None:
        code = errors.INVALID_REQUEST if data.get("status") == 400 else errors.WORKER_ERROR
    headers = admission.retry_headers(1000) if code.status == 503 else None
    return SluiceError(code, str(data.get("message") or code.message), headers=headers)


@contextlib.asynccontextmanager
async def guarded(call: Call):
    """Around a whole request: record the outcome, release on disconnect, log once."""
    try:
        yield call
    except asyncio.CancelledError:
        # Django cancels the view when the client disconnects (Django 5.0+).
        await asyncio.shield(call.client_gone())
        raise
    except (redis.RedisError, OSError) as exc:
        # Redis went away mid-request (admission and enqueue handle their own): say so.
        logger.warning("redis failed during %s: %s", call.request_id, exc)
        lost = SluiceError(
            errors.BROKER_UNAVAILABLE,
            "The gateway lost its connection to the work queue; retry shortly.",
            headers=admission.retry_headers(1000),
        )
        call.fail(lost)
        await asyncio.shield(call.release(cancel=True))
        raise lost from exc
    except Exception as exc:
        # SluiceErrors and DRF's validation errors alike: the status the client will get.
        known = errors.to_sluice_error(exc)
        if known is not None:
            call.fail(known)
        else:
            call.status_code, call.error_code = 500, errors.INTERNAL_ERROR.code
        await call.release(cancel=True)
        raise
    finally:
        if not call.detached:
            await asyncio.shield(call.log())
