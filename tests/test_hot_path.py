"""The hot path: no database once warm, few Redis round trips, and changes that still
reach every gateway process within seconds."""

from __future__ import annotations

import threading

import openai
import pytest
import redis.asyncio
from django.db.backends import utils as db_utils

from gateway.catalog import catalog
from tenants import services
from tenants.models import ApiKey
from tenants.policy import SYSTEM, Actor

from .conftest import fixed_deployment, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def chat(dataplane, alpha, subscribe):
    deployment = fixed_deployment("fixed-chat", capacity=16)
    subscribe(alpha, deployment)
    return deployment


@pytest.fixture
def client(dataplane, alpha, alice, issue_key):
    return openai.OpenAI(base_url=f"{dataplane}/v1", api_key=issue_key(alpha, alice), max_retries=0)


@pytest.fixture
def queries(monkeypatch):
    """Every SQL statement any thread of this process runs, while the fixture is active."""
    seen: list[str] = []
    lock = threading.Lock()
    for cls in (db_utils.CursorWrapper, db_utils.CursorDebugWrapper):
        for name in ("execute", "executemany"):
            original = getattr(cls, name)

            def counting(self, sql, *args, _original=original, **kwargs):
                with lock:
                    seen.append(str(sql))
                return _original(self, sql, *args, **kwargs)

            monkeypatch.setattr(cls, name, counting)
    return seen


class HotPathTestCase:
    def test_a_warm_gateway_runs_no_database_query(self, chat, client, start_worker, queries):
        start_worker(chat)
        client.chat.completions.create(model="fixed-chat", messages=MESSAGES)
        client.models.list()
        loads = catalog.loads
        queries.clear()
        for _ in range(5):
            client.chat.completions.create(model="fixed-chat", messages=MESSAGES)
        client.models.list()
        assert queries == []
        assert catalog.loads == loads

    def test_it_takes_at_most_three_redis_round_trips_before_enqueueing(
        self, chat, client, start_worker, monkeypatch
    ):
        start_worker(chat)
        client.chat.completions.create(model="fixed-chat", messages=MESSAGES)  # warm up
        trips: list[tuple] = []  # one entry per round trip: a command, or a pipeline
        original = redis.asyncio.Redis.execute_command
        original_pipeline = redis.asyncio.client.Pipeline.execute

        async def recording(self, *args, **options):
            trips.append(args)
            return await original(self, *args, **options)

        async def recording_pipeline(self, *args, **options):
            trips.append(tuple(word for args, _ in self.command_stack for word in args))
            return await original_pipeline(self, *args, **options)

        monkeypatch.setattr(redis.asyncio.Redis, "execute_command", recording)
        monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", recording_pipeline)
        client.chat.completions.create(model="fixed-chat", messages=MESSAGES)
        enqueue = next(index for index, args in enumerate(trips) if b"enqueue" in _words(args))
        assert enqueue + 1 <= 3, trips[: enqueue + 1]


def _words(args: tuple) -> list[bytes]:
    return [
        arg.encode() if isinstance(arg, str) else arg
        for arg in args
        if isinstance(arg, str | bytes)
    ]


class InvalidationTestCase:
    def test_a_revoked_key_is_refused_everywhere_within_two_seconds(
        self, chat, client, alpha, alice
    ):
        assert client.models.list()  # the key is now cached in the gateway
        services.api_key_revoke(key=ApiKey.objects.get(tenant=alpha), actor=Actor(user=alice))

        def refused() -> bool:
            try:
                client.models.list()
            except openai.AuthenticationError:
                return True
            return False

        wait_until(refused, timeout=2.0, what="the revoked key to be refused")
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="fixed-chat", messages=MESSAGES)

    def test_a_suspension_reaches_the_gateway_within_two_seconds(self, chat, client, alpha):
        assert client.models.list()
        services.tenant_suspend(tenant=alpha, reason="audit", actor=SYSTEM)

        def refused() -> bool:
            try:
                client.chat.completions.create(model="fixed-chat", messages=MESSAGES)
            except openai.PermissionDeniedError as error:
                return error.code == "tenant_suspended"
            return False

        wait_until(refused, timeout=2.0, what="the suspension to be enforced")

    def test_a_new_subscription_is_usable_at_once(self, chat, client, alpha, subscribe):
        assert [model.id for model in client.models.list()] == ["fixed-chat"]
        other = fixed_deployment("fixed-two")
        from sluice.redisconn import publish_invalidation_on_commit

        subscribe(alpha, other)
        publish_invalidation_on_commit("subscription", alpha.pk)  # what the services do
        wait_until(
            lambda: len(client.models.list().data) == 2,
            timeout=2.0,
            what="the new subscription to show",
        )


class SilentConnectionTestCase:
    def test_a_listener_that_hears_nothing_reconnects(self, monkeypatch):
        import asyncio

        import redis as redis_sync

        from gateway import catalog as catalog_module

        monkeypatch.setattr(catalog_module, "LIVENESS_PING_S", 0.01)
        monkeypatch.setattr(catalog_module, "LIVENESS_TIMEOUT_S", 0.05)

        class Silent:  # a connection dropped by the network without closing
            pings = 0

            async def get_message(self, timeout):
                await asyncio.sleep(timeout)

            async def ping(self):
                self.pings += 1

        silent = Silent()
        with pytest.raises(redis_sync.ConnectionError, match="no reply"):
            asyncio.run(catalog_module.Catalog()._receive(silent))
        assert silent.pings >= 1
