"""Shared fixtures: the personas of CONVENTIONS.md and the real services they use.

- alice owns tenant "alpha"; bob is a member there; vera is a viewer there;
- charlie owns tenant "beta", an outsider to alpha;
- root is platform staff.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from gateway.models import ModelDeployment
from sluice.redisconn import get_redis
from tenants import services
from tenants.models import Membership, Plan, Role
from tenants.policy import SYSTEM, Actor


@pytest.fixture(scope="session", autouse=True)
def _redis_namespace():
    """Remove every key this run wrote, whatever Redis it used."""
    client = get_redis()

    def clean() -> None:
        for found in client.scan_iter(match=f"{settings.REDIS_PREFIX}:*", count=1000):
            client.delete(found)

    clean()
    yield
    clean()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2's deliberate slowness is a cost per user created; tests create many.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def plan(db) -> Plan:
    return Plan.objects.create(
        name="Team",
        slug="team",
        requests_per_minute=120,
        tokens_per_minute=200_000,
        monthly_token_budget=5_000_000,
        max_tokens_cap=512,
        requires_platform_approval=False,
    )


@pytest.fixture
def django_user(django_user_model):
    def make(username: str, **extra):
        return django_user_model.objects.create_user(
            username=username,
            email=f"{username}@example.com",
            password="correct horse battery",
            **extra,
        )

    return make


@pytest.fixture
def alice(django_user):
    return django_user("alice")


@pytest.fixture
def bob(django_user):
    return django_user("bob")


@pytest.fixture
def vera(django_user):
    return django_user("vera")


@pytest.fixture
def charlie(django_user):
    return django_user("charlie")


@pytest.fixture
def root(django_user):
    return django_user("root", is_staff=True, is_superuser=True)


@pytest.fixture
def alpha(plan, alice, bob, vera):
    tenant = services.tenant_create(
        name="Alpha", slug="alpha", plan=plan, owner=alice, actor=SYSTEM
    )
    Membership.objects.create(user=bob, tenant=tenant, role=Role.MEMBER)
    Membership.objects.create(user=vera, tenant=tenant, role=Role.VIEWER)
    return tenant


@pytest.fixture
def beta(plan, charlie):
    return services.tenant_create(name="Beta", slug="beta", plan=plan, owner=charlie, actor=SYSTEM)


@pytest.fixture
def chat_deployment(db) -> ModelDeployment:
    return ModelDeployment.objects.create(
        slug="smollm2-135m-instruct",
        name="SmolLM2 135M Instruct",
        task=ModelDeployment.Task.CHAT,
        backend="workers.backends.fixed.FixedLatencyBackend",
        capacity=4,
    )


@pytest.fixture
def embedding_deployment(db) -> ModelDeployment:
    return ModelDeployment.objects.create(
        slug="all-minilm-l6-v2",
        name="all-MiniLM-L6-v2",
        task=ModelDeployment.Task.EMBEDDING,
        backend="workers.backends.fixed.FixedLatencyBackend",
    )


@pytest.fixture
def api():
    """A DRF test client; `api.as_user(user)` logs in, `api.with_key(raw)` sends a key."""

    class Client(APIClient):
        def as_user(self, user):
            self.force_authenticate(user=None)
            self.force_login(user)
            return self

        def with_key(self, raw: str):
            self.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
            return self

    return Client()


def actor(user) -> Actor:
    return Actor(user=user)
