"""Deployments: tenants read the enabled ones, staff create and change them."""

from __future__ import annotations

import pytest

from gateway import services
from gateway.models import ModelDeployment
from sluice.errors import SluiceError
from tenants.models import AuditEvent
from tests.conftest import actor
from tests.support import assert_error

pytestmark = pytest.mark.django_db

NEW = {
    "slug": "qwen2.5-0.5b",
    "name": "Qwen 2.5 0.5B",
    "task": "chat",
    "backend": "workers.backends.upstream.OpenAIUpstreamBackend",
    "backend_config": {"base_url": "http://gpu-1:8000/v1"},
    "capacity": 32,
}


def test_a_tenant_sees_enabled_deployments_and_whether_it_is_subscribed(
    api, alpha, bob, chat_deployment, embedding_deployment
):
    embedding_deployment.enabled = False
    embedding_deployment.save(update_fields=["enabled"])
    rows = api.as_user(bob).get("/api/deployments/").json()["results"]
    assert [row["slug"] for row in rows] == [chat_deployment.slug]
    assert rows[0]["subscribed"] is False
    assert "backend" not in rows[0]  # internals are for staff
    assert_error(api.as_user(bob).get(f"/api/deployments/{embedding_deployment.slug}/"), 404)


def test_staff_create_and_change_deployments_with_an_audit_trail(api, root):
    client = api.as_user(root)
    created = client.post("/api/deployments/", NEW, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["queue_name"] == "deploy.qwen2.5-0.5b"
    changed = client.patch("/api/deployments/qwen2.5-0.5b/", {"capacity": 64}, format="json")
    assert changed.json()["capacity"] == 64
    assert list(AuditEvent.objects.values_list("action", flat=True).order_by("id")) == [
        "deployment.create",
        "deployment.update",
    ]


def test_a_deployment_cannot_be_renamed(api, root, chat_deployment):
    response = api.as_user(root).patch(
        f"/api/deployments/{chat_deployment.slug}/", {"slug": "other"}, format="json"
    )
    assert_error(response, 409, "conflict")


def test_tenants_cannot_write_deployments(api, alpha, alice, chat_deployment):
    assert_error(api.as_user(alice).post("/api/deployments/", NEW, format="json"), 403)
    assert_error(
        api.as_user(alice).patch(
            f"/api/deployments/{chat_deployment.slug}/", {"capacity": 1}, format="json"
        ),
        403,
    )


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"slug": "has space"}, "slug"),
        ({"backend": "not a path"}, "backend"),
        ({"capacity": 0}, "capacity"),
        ({"task": "dance"}, "task"),
        ({"max_batch_size": 5000}, "max_batch_size"),
    ],
)
def test_bad_deployments_are_refused(api, root, change, param):
    response = api.as_user(root).post("/api/deployments/", {**NEW, **change}, format="json")
    assert assert_error(response, 400)["param"] == param
    assert not ModelDeployment.objects.exists()


def test_a_duplicate_slug_is_a_conflict(api, root, chat_deployment):
    response = api.as_user(root).post(
        "/api/deployments/", {**NEW, "slug": chat_deployment.slug}, format="json"
    )
    assert_error(response, 409, "conflict")


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


UNSTORABLE_CONFIGS = [
    pytest.param({"x": float("nan")}, id="nan"),
    pytest.param({"x": "a\x00b"}, id="nul"),
    pytest.param({"x\ud800": 1}, id="surrogate"),
    pytest.param({"x": _nested(70)}, id="deep"),
]


@pytest.mark.parametrize("config", UNSTORABLE_CONFIGS)
def test_the_services_refuse_a_backend_config_postgresql_cannot_store(
    root, chat_deployment, config
):
    with pytest.raises(SluiceError) as refused:
        services.deployment_create(actor=actor(root), **(NEW | {"backend_config": config}))
    assert refused.value.param == "backend_config"
    with pytest.raises(SluiceError):
        services.deployment_update(
            deployment=chat_deployment, actor=actor(root), backend_config=config
        )
    assert list(ModelDeployment.objects.values_list("slug", "backend_config")) == [
        (chat_deployment.slug, {})
    ]


def test_a_deployment_under_a_published_prompt_api_keeps_a_generation_task(
    root, alpha, alice, chat_deployment, subscribe
):
    from tests.conftest import published_text_prompt_api

    subscribe(alpha, chat_deployment)
    published_text_prompt_api(tenant=alpha, user=alice, deployment=chat_deployment)
    with pytest.raises(SluiceError) as refused:
        services.deployment_update(
            deployment=chat_deployment, actor=actor(root), task=ModelDeployment.Task.EMBEDDING
        )
    assert refused.value.error.code == "conflict"
    assert "wrap" in refused.value.message
    services.deployment_update(
        deployment=chat_deployment, actor=actor(root), task=ModelDeployment.Task.COMPLETION
    )
