"""What the hot path knows without asking PostgreSQL: keys, tenants, deployments, prompt-APIs.

Each web process keeps these in memory. An entry is loaded from the database once, then
served from here until it is invalidated: services publish a message on Redis when a key
is revoked, a tenant suspended, a subscription or deployment or prompt-API changed
(sluice.redisconn.publish_invalidation_on_commit), and every process drops the entry on
receipt. Entries also expire after CATALOG_TTL_S, so a lost message only delays a change.
A revoked key or a suspended tenant is additionally refused by the admission script itself
(a deny flag in Redis), so that refusal never waits on a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone

from sluice.redisconn import get_async_redis, invalidation_channel
from tenants.models import ApiKey, Limits, Subscription, Tenant
from workers.breaker import DEFAULT_FAILURE_THRESHOLD

from . import prompts
from .models import MODEL_NAME, ModelDeployment, PromptApi, PromptApiVersion

logger = logging.getLogger(__name__)

_PRIORITY = {"high": 0, "normal": 1, "low": 2}
# The invalidation listener pings this often and reconnects after this long unheard.
LIVENESS_PING_S = 0.5
LIVENESS_TIMEOUT_S = 1.5
# Entries held at most (each a few hundred bytes): far above any real catalog's rows.
MAX_SLOTS = 50_000


def _could_be_slug(name: str) -> bool:
    """Model and prompt-API names share one shape; anything else is not looked up (a NUL
    in a name, say, which PostgreSQL would refuse with an error)."""
    return MODEL_NAME.regex.fullmatch(name) is not None


@dataclass(frozen=True)
class KeyEntry:
    id: int
    prefix: str
    secret_hash: str
    tenant_id: int
    scopes: frozenset[str]
    expires_at: float | None
    revoked_at: str | None


@dataclass(frozen=True)
class TenantEntry:
    id: int
    slug: str
    active: bool
    limits: Limits
    deployments: frozenset[str]  # slugs of subscribed deployments
    prompt_apis: frozenset[str]  # slugs it may call: subscribed or its own

    @property
    def priority(self) -> int:
        return _PRIORITY.get(self.limits.priority, 1)


@dataclass(frozen=True)
class DeploymentEntry:
    id: int
    slug: str
    task: str
    enabled: bool
    capacity: int
    max_batch_size: int
    default_deadline_s: float
    queue_name: str
    config: dict[str, Any]
    created: int  # epoch seconds, for /v1/models

    @property
    def breaker_threshold(self) -> int:
        """Consecutive upstream failures that open the circuit; 0: no upstream, no circuit."""
        if not self.config.get("base_url"):
            return 0
        breaker = self.config.get("breaker") or {}
        return int(breaker.get("failure_threshold", DEFAULT_FAILURE_THRESHOLD))


@dataclass(frozen=True)
class VersionEntry:
    id: int
    number: int
    messages: list[dict[str, str]]
    input_schema: dict[str, Any]
    input_validator: Any
    output_type: str
    output_validator: Any | None
    deployment: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class PromptApiEntry:
    id: int
    slug: str
    tenant_id: int | None
    visibility: str
    active_number: int | None
    versions: dict[int, VersionEntry] = field(default_factory=dict)


@dataclass
class _Slot:
    value: Any
    loaded: float


class Catalog:
    """Per-process cache of the rows the hot path reads; see the module docstring."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, object], _Slot] = {}
        self._listeners: dict[int, asyncio.Task] = {}
        # Bumped by every invalidation: a load that started before one is not stored, so a
        # change committed while a row was being read cannot be cached for CATALOG_TTL_S.
        self._generation = 0
        self.loads = 0  # database loads, for tests and the overhead benchmark

    # --- reads ---------------------------------------------------------------------

    async def key(self, prefix: str) -> KeyEntry | None:
        return await self._get(("key", prefix), lambda: _load_key(prefix))

    async def tenant(self, tenant_id: int) -> TenantEntry | None:
        return await self._get(("tenant", tenant_id), lambda: _load_tenant(tenant_id))

    async def deployment(self, slug: str) -> DeploymentEntry | None:
        if not _could_be_slug(slug):
            return None
        return await self._get(("deployment", slug), lambda: _load_deployment(slug))

    async def prompt_api(self, slug: str) -> PromptApiEntry | None:
        if not _could_be_slug(slug):
            return None
        return await self._get(("prompt_api", slug), lambda: _load_prompt_api(slug))

    async def subscribed_deployments(self, tenant: TenantEntry) -> list[DeploymentEntry]:
        found = [await self.deployment(slug) for slug in sorted(tenant.deployments)]
        return [entry for entry in found if entry is not None and entry.enabled]

    async def _get(self, slot_key: tuple[str, object], load: Callable[[], Any]) -> Any:
        self._ensure_listener()
        slot = self._slots.get(slot_key)
        now = time.monotonic()
        if slot is not None and now - slot.loaded < settings.CATALOG_TTL_S:
            return slot.value
        generation = self._generation
        # Not thread-sensitive: a pool of its own, so a slow database delays only the
        # requests that wait for a load (sluice/dataplane_asgi.py).
        value = await sync_to_async(_closing(load), thread_sensitive=False)()
        self.loads += 1
        if generation == self._generation and self._room(now, for_miss=value is None):
            self._slots[slot_key] = _Slot(value, now)
        return value

    def _room(self, now: float, *, for_miss: bool) -> bool:
        """Whether another slot may be stored. Misses (a made-up key prefix or model name)
        are cached so they cost the database one query, but callers choose them freely:
        past MAX_SLOTS, expired slots go first, and then misses are no longer stored."""
        if len(self._slots) < MAX_SLOTS:
            return True
        ttl = settings.CATALOG_TTL_S
        for name in [name for name, slot in self._slots.items() if now - slot.loaded >= ttl]:
            del self._slots[name]
        return len(self._slots) < MAX_SLOTS or not for_miss

    # --- invalidation --------------------------------------------------------------

    def forget(self, kind: str, ident: str) -> None:
        self._generation += 1
        if kind == "apikey":
            self._slots.pop(("key", ident), None)
        elif kind in ("tenant", "subscription"):
            self._slots.pop(("tenant", int(ident)), None)
        elif kind == "deployment":
            self._slots.pop(("deployment", ident), None)
        elif kind == "prompt_api":
            self._slots.pop(("prompt_api", ident), None)
        else:
            self.clear()

    def clear(self) -> None:
        self._generation += 1
        self._slots.clear()

    def _ensure_listener(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._listeners.get(id(loop))
        if task is None or task.done():
            self._listeners[id(loop)] = loop.create_task(self._listen(), name="catalog-listener")

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = get_async_redis().pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(invalidation_channel())
                # Anything may have changed while we were not listening.
                self.clear()
                backoff = 0.1
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError):
                logger.warning("catalog invalidations lost; reconnecting in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _receive(self, pubsub) -> None:
        """Apply invalidations until the connection fails or goes silent.

        A connection can die without closing (a NAT or load balancer dropping an idle
        flow): reads then wait for ever and every change would wait for CATALOG_TTL_S. So
        the listener pings every LIVENESS_PING_S and, hearing nothing at all (not even the
        pong) for LIVENESS_TIMEOUT_S, reconnects, which clears the cache.
        """
        heard = pinged = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=LIVENESS_PING_S)
            now = time.monotonic()
            if message is not None:
                heard = now
                if message["type"] == "message":
                    self._apply(message)
            if now - heard > LIVENESS_TIMEOUT_S:
                raise redis.ConnectionError(f"no reply from Redis for {now - heard:.1f}s")
            if now - pinged >= LIVENESS_PING_S:
                await pubsub.ping()
                pinged = now

    def _apply(self, message: dict[str, Any]) -> None:
        try:
            body = json.loads(message["data"])
            self.forget(body["kind"], body["id"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed invalidation: %r", message)


catalog = Catalog()


# --- loaders (sync, run in a thread by sync_to_async) -----------------------------------


def _closing(load: Callable[[], Any]) -> Callable[[], Any]:
    """Run a loader as Django runs a request: connections closed (or kept, per
    CONN_MAX_AGE) afterwards, since no request_finished signal runs in the loaders' pool."""

    def run() -> Any:
        close_old_connections()
        try:
            return load()
        finally:
            close_old_connections()

    return run


def _load_key(prefix: str) -> KeyEntry | None:
    key = (
        ApiKey.objects.filter(prefix=prefix)
        .only("id", "prefix", "secret_hash", "tenant_id", "scopes", "expires_at", "revoked_at")
        .first()
    )
    if key is None:
        return None
    return KeyEntry(
        id=key.id,
        prefix=key.prefix,
        secret_hash=key.secret_hash,
        tenant_id=key.tenant_id,
        scopes=frozenset(key.scopes),
        expires_at=key.expires_at.timestamp() if key.expires_at else None,
        revoked_at=f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else None,
    )


def _load_tenant(tenant_id: int) -> TenantEntry | None:
    tenant = Tenant.objects.select_related("plan", "quota_override").filter(pk=tenant_id).first()
    if tenant is None:
        return None
    live = Subscription.objects.filter(tenant=tenant, revoked_at__isnull=True)
    deployments = live.filter(deployment__isnull=False).values_list("deployment__slug", flat=True)
    subscribed = live.filter(prompt_api__isnull=False).values_list("prompt_api__slug", flat=True)
    own = PromptApi.objects.filter(tenant=tenant).values_list("slug", flat=True)
    return TenantEntry(
        id=tenant.id,
        slug=tenant.slug,
        active=tenant.is_active,
        limits=tenant.limits(),
        deployments=frozenset(deployments),
        prompt_apis=frozenset(subscribed) | frozenset(own),
    )


def _load_deployment(slug: str) -> DeploymentEntry | None:
    deployment = ModelDeployment.objects.filter(slug=slug).first()
    if deployment is None:
        return None
    return DeploymentEntry(
        id=deployment.id,
        slug=deployment.slug,
        task=deployment.task,
        enabled=deployment.enabled,
        capacity=deployment.capacity,
        max_batch_size=deployment.max_batch_size,
        default_deadline_s=deployment.default_deadline_s,
        queue_name=deployment.queue_name,
        config=dict(deployment.backend_config or {}),
        created=int(deployment.created_at.timestamp()),
    )


def _validator(schema: dict[str, Any]):
    return prompts.make_validator(schema)


def _load_prompt_api(slug: str) -> PromptApiEntry | None:
    prompt_api = PromptApi.objects.filter(slug=slug).first()
    if prompt_api is None:
        return None
    versions = {}
    published = PromptApiVersion.objects.filter(
        Q(prompt_api=prompt_api), state=PromptApiVersion.State.PUBLISHED
    ).select_related("deployment")
    for version in published:
        versions[version.number] = VersionEntry(
            id=version.id,
            number=version.number,
            messages=list(version.messages),
            input_schema=dict(version.input_schema),
            input_validator=_validator(version.input_schema),
            output_type=version.output_type,
            output_validator=(_validator(version.output_schema) if version.output_schema else None),
            deployment=version.deployment.slug,
            parameters=dict(version.parameters or {}),
        )
    active = prompt_api.active_version.number if prompt_api.active_version_id else None
    return PromptApiEntry(
        id=prompt_api.id,
        slug=prompt_api.slug,
        tenant_id=prompt_api.tenant_id,
        visibility=prompt_api.visibility,
        active_number=active,
        versions=versions,
    )


def key_is_expired(entry: KeyEntry) -> bool:
    return entry.expires_at is not None and entry.expires_at <= timezone.now().timestamp()
