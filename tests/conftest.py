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


# --- the data plane: a live gateway, real Dramatiq workers, keys and subscriptions -------


@pytest.fixture(scope="session")
def gateway_url():
    """The real ASGI application under uvicorn, in a thread of this process, on a free port.

    Tests that use it need committed data (transactional_db): the server's request threads
    have database connections of their own.
    """
    import socket
    import threading

    import uvicorn

    from sluice.asgi import application

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(application, log_level="warning", lifespan="off", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20, what="the test gateway to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def wait_until(condition, *, timeout: float = 10.0, what: str = "the condition", every=0.02):
    """Poll `condition` until it is truthy (returning its value) or fail after `timeout`."""
    import time

    give_up = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@pytest.fixture
def clean_redis():
    """Wipe this run's Redis keys after the test (queues, leases, budgets, reply streams)."""
    yield
    client = get_redis()
    for found in client.scan_iter(match=f"{settings.REDIS_PREFIX}:*", count=1000):
        client.delete(found)


@pytest.fixture
def dataplane(transactional_db, gateway_url, clean_redis):
    """Committed data, a live gateway and a catalog that remembers nothing of other tests."""
    from gateway.catalog import catalog

    catalog.clear()
    yield gateway_url
    catalog.clear()


@pytest.fixture
def start_worker(clean_redis):
    """start_worker(*deployments, threads=None): a real Dramatiq worker in this process."""
    from workers.runtime import DeploymentSpec
    from workers.service import WorkerService

    started = []

    def start(*deployments, threads: int | None = None):
        service = WorkerService(
            [DeploymentSpec.from_model(deployment) for deployment in deployments], threads=threads
        )
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(timeout_ms=5000)


@pytest.fixture
def issue_key():
    """issue_key(tenant, user) -> the raw key of a fresh inference key."""

    def issue(tenant, user, **extra) -> str:
        _key, raw = services.api_key_issue(
            tenant=tenant, name="test key", actor=Actor(user=user), **extra
        )
        return raw

    return issue


@pytest.fixture
def subscribe():
    """subscribe(tenant, deployment_or_prompt_api): an approved subscription, directly."""
    from gateway.models import PromptApi
    from tenants.models import Subscription

    def make(tenant, target):
        field = "prompt_api" if isinstance(target, PromptApi) else "deployment"
        return Subscription.objects.create(tenant=tenant, **{field: target})

    return make


def fixed_deployment(slug: str = "fixed-chat", *, task: str = "chat", **fields) -> ModelDeployment:
    """A deployment served by the deterministic fixed-latency backend."""
    config = fields.pop("config", {})
    return ModelDeployment.objects.create(
        slug=slug,
        name=slug,
        task=task,
        backend="workers.backends.fixed.FixedLatencyBackend",
        backend_config={"latency_ms": 5, **config},
        **fields,
    )


def published_prompt_api(*, tenant, user, slug: str, deployment, **version):
    """A tenant's prompt-API with one published version, made through the services."""
    from gateway import services as gateway_services

    actor = Actor(user=user)
    prompt_api = gateway_services.prompt_api_create(
        tenant=tenant, slug=slug, name=slug.title(), actor=actor
    )
    draft = gateway_services.prompt_api_version_create(
        prompt_api=prompt_api, actor=actor, deployment=deployment, **version
    )
    gateway_services.prompt_api_version_publish(version=draft, actor=actor)
    return prompt_api


def published_text_prompt_api(*, tenant, user, deployment, slug: str = "wrap", template="{{text}}"):
    """A published prompt-API that sends its one `text` input to the model in `template`."""
    return published_prompt_api(
        tenant=tenant,
        user=user,
        slug=slug,
        deployment=deployment,
        messages=[{"role": "user", "content": template}],
        input_schema={"type": "object", "properties": {"text": {"type": "string"}}},
    )
