"""Charlie (owner of beta) can reach none of alpha's objects: every endpoint answers 404."""

from __future__ import annotations

import pytest

from analytics.models import CallLog
from gateway import services as gateway_services
from tenants import services
from tenants.models import Membership
from tests.conftest import actor
from tests.support import assert_error

pytestmark = pytest.mark.django_db


@pytest.fixture
def alphas_things(alpha, alice, bob, chat_deployment):
    key, _ = services.api_key_issue(tenant=alpha, name="alpha key", actor=actor(alice))
    pending = services.access_request_create(
        tenant=alpha, kind="raise_quota", quota={"max_tokens_cap": 4096}, actor=actor(bob)
    )
    prompt_api = gateway_services.prompt_api_create(
        tenant=alpha, slug="alpha-secret", name="Secret", actor=actor(alice)
    )
    gateway_services.prompt_api_version_create(
        prompt_api=prompt_api,
        actor=actor(alice),
        deployment=chat_deployment,
        messages=[{"role": "user", "content": "hi"}],
        input_schema={"type": "object"},
    )
    from django.utils import timezone

    CallLog.objects.create(
        request_id="req_alpha",
        tenant=alpha,
        api_key=key,
        status_code=200,
        total_ms=5,
        created_at=timezone.now(),
    )
    return {
        "key": key.pk,
        "request": pending.pk,
        "member": Membership.objects.get(tenant=alpha, user=bob).pk,
    }


def endpoints(things):
    return [
        ("get", f"/api/keys/{things['key']}/", None),
        ("post", f"/api/keys/{things['key']}/revoke/", None),
        ("post", f"/api/keys/{things['key']}/rotate/", None),
        ("get", f"/api/access-requests/{things['request']}/", None),
        ("post", f"/api/access-requests/{things['request']}/approve/", {}),
        ("post", f"/api/access-requests/{things['request']}/reject/", {}),
        ("post", f"/api/access-requests/{things['request']}/withdraw/", None),
        ("get", f"/api/members/{things['member']}/", None),
        ("patch", f"/api/members/{things['member']}/", {"role": "viewer"}),
        ("delete", f"/api/members/{things['member']}/", None),
        ("get", "/api/prompt-apis/alpha-secret/", None),
        ("get", "/api/prompt-apis/alpha-secret/versions/", None),
        ("get", "/api/prompt-apis/alpha-secret/versions/1/", None),
        ("patch", "/api/prompt-apis/alpha-secret/versions/1/", {"changelog": "x"}),
        ("post", "/api/prompt-apis/alpha-secret/versions/1/publish/", None),
        ("post", "/api/prompt-apis/alpha-secret/versions/1/activate/", None),
        ("post", "/api/prompt-apis/alpha-secret/versions/", {"messages": []}),
    ]


def test_charlie_gets_404_on_every_one_of_alphas_objects(api, alphas_things, beta, charlie):
    client = api.as_user(charlie)
    for method, url, body in endpoints(alphas_things):
        response = getattr(client, method)(url, body, format="json")
        assert_error(response, 404, "not_found")


def test_charlies_key_gets_404_too(api, alphas_things, beta, charlie):
    _, raw = services.api_key_issue(
        tenant=beta, name="k", scopes=["manage.read", "manage.write"], actor=actor(charlie)
    )
    client = api.with_key(raw)
    for method, url, body in endpoints(alphas_things):
        response = getattr(client, method)(url, body, format="json")
        assert_error(response, 404, "not_found")


def test_charlie_cannot_name_alpha_as_his_tenant(api, alphas_things, beta, charlie):
    response = api.as_user(charlie).get("/api/keys/", HTTP_X_SLUICE_TENANT="alpha")
    assert_error(response, 404, "not_found")
    response = api.as_user(charlie).get("/api/keys/?tenant=alpha")
    assert_error(response, 404, "not_found")


def test_charlies_lists_hold_nothing_of_alphas(api, alphas_things, beta, charlie):
    client = api.as_user(charlie)
    for url in (
        "/api/keys/",
        "/api/access-requests/",
        "/api/members/",
        "/api/call-logs/",
        "/api/subscriptions/",
        "/api/audit-events/",
    ):
        body = client.get(url).json()
        assert "alpha" not in str(body).lower(), (url, body)
    members = client.get("/api/members/").json()["results"]
    assert [m["username"] for m in members] == ["charlie"]
    assert [p["slug"] for p in client.get("/api/prompt-apis/").json()["results"]] == []
    assert client.get("/api/call-logs/").json()["results"] == []
