"""Bad input on every write endpoint gets a clear 4xx in the error shape, never a 500."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.test import override_settings
from rest_framework import exceptions as drf_exceptions

from gateway import services as gateway_services
from sluice.api import ApiKeyScopes
from sluice.errors import SluiceError
from tenants import services
from tenants.models import AccessRequest, ApiKey, Membership
from tests.conftest import actor
from tests.support import assert_error

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alpha, alice, bob, root, chat_deployment):
    pending = services.access_request_create(
        tenant=alpha, kind="raise_quota", quota={"max_tokens_cap": 4096}, actor=actor(bob)
    )
    services.access_request_create(
        tenant=alpha, kind="subscribe_deployment", deployment=chat_deployment, actor=actor(alice)
    )
    prompt_api = gateway_services.prompt_api_create(
        tenant=alpha, slug="tr", name="Tr", actor=actor(alice)
    )
    gateway_services.prompt_api_version_create(
        prompt_api=prompt_api,
        actor=actor(alice),
        deployment=chat_deployment,
        messages=[{"role": "user", "content": "hi"}],
        input_schema={"type": "object"},
    )
    return {
        "request": pending.pk,
        "member": Membership.objects.get(user=bob).pk,
        "deployment": chat_deployment.slug,
    }


# (method, url, who, a body with a wrong type, fields that are required on create)
WRITES = [
    ("post", "/api/keys/", "alice", {"name": {"nested": True}}, ["name"]),
    ("post", "/api/access-requests/", "alice", {"kind": 7}, ["kind"]),
    ("post", "/api/access-requests/{request}/reject/", "root", {"note": ["x"]}, []),
    ("post", "/api/access-requests/{request}/approve/", "root", {"note": {"x": 1}}, []),
    ("post", "/api/members/", "alice", {"email": 42}, ["email"]),
    ("patch", "/api/members/{member}/", "alice", {"role": 3.5}, []),
    (
        "post",
        "/api/deployments/",
        "root",
        {"slug": "x", "name": "x", "task": "chat", "backend": "a.B", "capacity": "lots"},
        ["slug", "name", "task", "backend"],
    ),
    ("patch", "/api/deployments/{deployment}/", "root", {"enabled": "maybe"}, []),
    (
        "post",
        "/api/prompt-apis/",
        "alice",
        {"slug": "ok", "name": "ok", "visibility": 1},
        ["slug", "name"],
    ),
    (
        "post",
        "/api/prompt-apis/tr/versions/",
        "alice",
        {"messages": "hello", "input_schema": {"type": "object"}, "deployment": "x"},
        ["messages", "input_schema", "deployment"],
    ),
    ("patch", "/api/prompt-apis/tr/versions/1/", "alice", {"input_schema": "not an object"}, []),
]


def call(api, users, world, method, url, who, data, content_type="application/json"):
    client = api.as_user(users[who])
    return getattr(client, method)(url.format(**world), data, content_type=content_type)


@pytest.fixture
def users(alice, root):
    return {"alice": alice, "root": root}


@pytest.mark.parametrize(("method", "url", "who", "wrong", "required"), WRITES)
class TestEveryWriteEndpoint:
    def test_malformed_json_is_a_400(self, api, users, world, method, url, who, wrong, required):
        response = call(api, users, world, method, url, who, '{"name": "unterminated')
        assert "not valid JSON" in assert_error(response, 400, "invalid_json")["message"]

    def test_a_body_that_is_not_an_object_is_a_400(
        self, api, users, world, method, url, who, wrong, required
    ):
        assert_error(call(api, users, world, method, url, who, "[1, 2, 3]"), 400)

    def test_wrong_types_are_a_400_naming_the_field(
        self, api, users, world, method, url, who, wrong, required
    ):
        error = assert_error(call(api, users, world, method, url, who, json.dumps(wrong)), 400)
        assert error["param"] in wrong, error

    def test_unknown_fields_are_refused(self, api, users, world, method, url, who, wrong, required):
        error = assert_error(
            call(api, users, world, method, url, who, json.dumps({"colour": "blue"})),
            400,
            "unknown_field",
        )
        assert error["param"] == "colour"
        assert "Unknown field" in error["message"]

    def test_missing_required_fields_are_named(
        self, api, users, world, method, url, who, wrong, required
    ):
        if not required:
            pytest.skip("nothing is required here")
        error = assert_error(
            call(api, users, world, method, url, who, "{}"), 400, "invalid_request"
        )
        assert error["param"] in required

    def test_an_oversize_body_is_a_413(self, api, users, world, method, url, who, wrong, required):
        body = json.dumps({"name": "x" * 2_000_000})
        error = assert_error(
            call(api, users, world, method, url, who, body), 413, "request_too_large"
        )
        assert "limit" in error["message"]

    def test_a_form_body_is_a_415(self, api, users, world, method, url, who, wrong, required):
        response = call(
            api,
            users,
            world,
            method,
            url,
            who,
            "name=x",
            content_type="application/x-www-form-urlencoded",
        )
        assert_error(response, 415, "unsupported_media_type")


def test_nothing_was_created_by_all_that(api, users, world):
    for method, url, who, wrong, _ in WRITES:
        call(api, users, world, method, url, who, json.dumps(wrong))
    assert ApiKey.objects.count() == 0
    assert AccessRequest.objects.count() == 2
    assert AccessRequest.objects.get(pk=world["request"]).state == "pending"


def test_an_unknown_api_path_is_a_json_404(api, alice):
    assert_error(api.as_user(alice).get("/api/nothing-here/"), 404, "not_found")


def test_a_wrong_method_is_a_405(api, alpha, alice):
    assert_error(api.as_user(alice).delete("/api/keys/"), 405, "method_not_allowed")


@override_settings(DEBUG=False)
def test_an_unexpected_exception_is_a_json_500_with_the_request_id(api, alpha, alice, monkeypatch):
    from tenants import selectors

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(selectors, "api_keys_for", explode)
    api.raise_request_exception = False
    response = api.as_user(alice).get("/api/keys/")
    error = assert_error(response, 500, "internal_error")
    assert "boom" not in response.content.decode()
    assert "request_id" in error["message"]


# --- values that would reach the database unchecked --------------------------------------


@pytest.mark.parametrize(
    "url", ["/api/tenant/?tenant=%00", "/api/call-logs/?tenant=%00", "/api/keys/?tenant=alp%00ha"]
)
def test_a_nul_in_the_url_is_a_400_before_any_lookup(api, alpha, alice, url):
    error = assert_error(api.as_user(alice).get(url), 400, "invalid_request")
    assert "NUL" in error["message"]


def test_a_nul_in_the_tenant_header_is_a_404(api, alpha, alice):
    response = api.as_user(alice).get("/api/tenant/", HTTP_X_SLUICE_TENANT="alpha\x00")
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize("who", ["alice", "root"])
def test_a_nul_in_a_deployment_slug_is_a_400(api, users, alpha, chat_deployment, who):
    response = api.as_user(users[who]).get("/api/deployments/%00/")
    assert_error(response, 400, "invalid_request")


class TestInvitationEmails:
    def test_an_email_too_long_to_sign_in_with_is_a_400(self, api, alpha, alice):
        email = "a" * 150 + "@example.com"
        response = api.as_user(alice).post("/api/members/", {"email": email}, format="json")
        assert assert_error(response, 400)["param"] == "email"
        assert not get_user_model().objects.filter(email=email).exists()

    def test_the_longest_email_that_fits_is_invited(self, api, alpha, alice):
        email = "a" * (150 - len("@example.com")) + "@example.com"
        response = api.as_user(alice).post("/api/members/", {"email": email}, format="json")
        assert response.status_code == 201, response.content
        assert get_user_model().objects.get(email=email).username == email

    def test_the_service_refuses_a_long_email_itself(self, alpha, alice):
        with pytest.raises(SluiceError) as refused:
            services.member_invite(
                tenant=alpha, email="a" * 150 + "@example.com", role="member", actor=actor(alice)
            )
        assert refused.value.param == "email"
        assert refused.value.error.status == 400

    def test_an_email_that_is_another_accounts_username_is_a_409(
        self, api, alpha, alice, django_user_model
    ):
        django_user_model.objects.create_user(username="dana@example.com", email="d@else.org")
        response = api.as_user(alice).post(
            "/api/members/", {"email": "Dana@Example.com"}, format="json"
        )
        assert assert_error(response, 409, "conflict")["param"] == "email"


class TestQuotaBounds:
    @pytest.mark.parametrize(
        ("name", "too_much"),
        [
            ("requests_per_minute", 1_099_511_627_776),
            ("tokens_per_minute", 2**31),
            ("max_tokens_cap", 2**31),
            ("monthly_token_budget", 2**63),
        ],
    )
    def test_more_than_the_database_holds_is_a_400(self, api, alpha, alice, name, too_much):
        response = api.as_user(alice).post(
            "/api/access-requests/",
            {"kind": "raise_quota", "quota": {name: too_much}},
            format="json",
        )
        assert assert_error(response, 400)["param"] == f"quota.{name}"
        assert not AccessRequest.objects.exists()

    def test_the_most_the_database_holds_is_filed_and_approved(self, api, alpha, alice, root):
        most = {"requests_per_minute": 2**31 - 1, "monthly_token_budget": 2**63 - 1}
        filed = api.as_user(alice).post(
            "/api/access-requests/", {"kind": "raise_quota", "quota": most}, format="json"
        )
        assert filed.status_code == 201, filed.content
        approved = api.as_user(root).post(
            f"/api/access-requests/{filed.json()['id']}/approve/", {}, format="json"
        )
        assert approved.status_code == 200, approved.content
        limits = alpha.limits()
        assert (limits.requests_per_minute, limits.monthly_token_budget) == (2**31 - 1, 2**63 - 1)

    def test_the_service_refuses_it_too(self, alpha, alice):
        with pytest.raises(SluiceError) as refused:
            services.access_request_create(
                tenant=alpha,
                kind="raise_quota",
                quota={"tokens_per_minute": 2**31},
                actor=actor(alice),
            )
        assert refused.value.param == "quota.tokens_per_minute"

    def test_approving_a_request_filed_before_the_bound_is_a_409(self, api, alpha, alice, root):
        stale = AccessRequest.objects.create(
            tenant=alpha,
            kind="raise_quota",
            requester=alice,
            quota={"requests_per_minute": 1_099_511_627_776},
        )
        url = f"/api/access-requests/{stale.pk}"
        error = assert_error(api.as_user(root).post(f"{url}/approve/", {}, format="json"), 409)
        assert "reject it" in error["message"]
        stale.refresh_from_db()
        assert stale.state == "pending"
        rejected = api.as_user(root).post(f"{url}/reject/", {}, format="json")
        assert rejected.json()["state"] == "rejected"


@pytest.mark.parametrize(
    "expires_at",
    ["9999-12-31T23:59:59Z", "9999-12-31T23:59:59-05:00", "9999-12-30T00:00:01+00:00"],
)
def test_a_key_expiry_at_the_end_of_the_calendar_is_a_400(api, alpha, alice, expires_at):
    response = api.as_user(alice).post(
        "/api/keys/", {"name": "k", "expires_at": expires_at}, format="json"
    )
    assert assert_error(response, 400)["param"] == "expires_at"
    assert not ApiKey.objects.exists()


# --- JSON only ----------------------------------------------------------------------------


class TestJsonOnly:
    @pytest.fixture
    def read_only(self, alpha, alice):
        _key, raw = services.api_key_issue(
            tenant=alpha, name="ro", scopes=["manage.read"], actor=actor(alice)
        )
        return raw

    @pytest.mark.parametrize("url", ["/api/keys/", "/api/prompt-apis/", "/api/members/{member}/"])
    def test_a_client_asking_for_html_gets_a_json_406(self, api, world, read_only, url):
        response = api.with_key(read_only).get(url.format(**world), HTTP_ACCEPT="text/html")
        assert_error(response, 406, "not_acceptable")

    def test_an_unknown_format_is_a_406_that_names_it(self, api, world, read_only):
        error = assert_error(api.with_key(read_only).get("/api/keys/?format=api"), 406)
        assert "'api'" in error["message"]

    def test_a_browsers_accept_header_gets_json(self, api, world, read_only):
        accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        response = api.with_key(read_only).get("/api/keys/", HTTP_ACCEPT=accept)
        assert response.status_code == 200
        assert response["Content-Type"] == "application/json"

    def test_a_missing_scope_is_an_api_exception_drf_can_catch(self, world, read_only):
        # DRF asks permission classes "may I?" outside the request too (its browsable API
        # did, to decide whether to draw a form) and catches only APIExceptions.
        request = SimpleNamespace(method="POST", auth=ApiKey.objects.get(name="ro"))
        with pytest.raises(drf_exceptions.APIException):
            ApiKeyScopes().has_permission(request, view=None)


# --- paths ----------------------------------------------------------------------------


class TestTrailingSlash:
    def test_a_post_without_the_slash_is_a_json_404_that_says_where(self, api, alpha, alice):
        response = api.as_user(alice).post("/api/members", {"email": "x@example.com"})
        error = assert_error(response, 404, "not_found")
        assert "/api/members/" in error["message"]
        assert not Membership.objects.filter(user__email="x@example.com").exists()

    @override_settings(DEBUG=True)
    def test_it_is_the_same_with_debug_on(self, api, alpha, alice):
        assert_error(api.as_user(alice).post("/api/tenant", {}, format="json"), 404)

    def test_it_needs_no_csrf_token(self, api, world, alpha, alice):
        _key, raw = services.api_key_issue(
            tenant=alpha, name="w", scopes=["manage.write"], actor=actor(alice)
        )
        assert_error(api.with_key(raw).post("/api/keys", {}, format="json"), 404)

    def test_a_path_that_is_not_there_with_a_slash_either_gets_no_hint(self, api, alpha, alice):
        error = assert_error(api.as_user(alice).get("/api/nothing-here"), 404, "not_found")
        assert "slash" not in error["message"]


def test_a_bad_host_is_a_400_with_a_request_id_and_no_traceback(api, db, caplog):
    with caplog.at_level(logging.INFO):
        response = api.get("/api/tenant/", HTTP_HOST="evil.example")
    assert_error(response, 400, "invalid_request")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "evil.example" in caplog.text
