"""Prompt-APIs: drafts, publication, immutability, and refusal of bad definitions."""

from __future__ import annotations

import pytest

from gateway.models import PromptApiVersion
from tenants import services
from tests.conftest import actor
from tests.support import assert_error

pytestmark = pytest.mark.django_db

VERSION = {
    "messages": [
        {"role": "system", "content": "Translate into {{language}}."},
        {"role": "user", "content": "{{text}}"},
    ],
    "input_schema": {
        "type": "object",
        "properties": {"text": {"type": "string"}, "language": {"type": "string"}},
        "required": ["text", "language"],
    },
    "parameters": {"temperature": 0.3, "max_tokens": 64},
}


@pytest.fixture
def subscribed(alpha, alice, chat_deployment):
    services.access_request_create(
        tenant=alpha, kind="subscribe_deployment", deployment=chat_deployment, actor=actor(alice)
    )
    return chat_deployment


@pytest.fixture
def translate(api, alpha, bob):
    response = api.as_user(bob).post(
        "/api/prompt-apis/", {"slug": "translate", "name": "Translate"}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


def add_version(api, user, on, **overrides):
    body = {**VERSION, "deployment": on.slug, **overrides}
    return api.as_user(user).post("/api/prompt-apis/translate/versions/", body, format="json")


class TestVersions:
    def test_a_member_drafts_and_an_admin_publishes(self, api, bob, alice, translate, subscribed):
        assert translate["endpoint"] == "/v1/apis/translate"
        draft = add_version(api, bob, subscribed)
        assert draft.status_code == 201, draft.content
        assert draft.json()["number"] == 1
        assert draft.json()["state"] == "draft"
        assert_error(
            api.as_user(bob).post("/api/prompt-apis/translate/versions/1/publish/"),
            403,
            "permission_denied",
        )
        published = api.as_user(alice).post("/api/prompt-apis/translate/versions/1/publish/")
        assert published.json()["state"] == "published"
        detail = api.as_user(bob).get("/api/prompt-apis/translate/").json()
        assert detail["active_version"] == 1

    def test_a_published_version_cannot_be_edited(self, api, bob, alice, translate, subscribed):
        add_version(api, bob, subscribed)
        api.as_user(alice).post("/api/prompt-apis/translate/versions/1/publish/")
        response = api.as_user(alice).patch(
            "/api/prompt-apis/translate/versions/1/", {"changelog": "sneaky"}, format="json"
        )
        assert "no longer change" in assert_error(response, 409, "version_published")["message"]
        assert PromptApiVersion.objects.get(number=1).changelog == ""
        assert_error(
            api.as_user(alice).post("/api/prompt-apis/translate/versions/1/publish/"),
            409,
            "version_published",
        )

    def test_a_draft_can_be_edited(self, api, bob, translate, subscribed):
        add_version(api, bob, subscribed)
        response = api.as_user(bob).patch(
            "/api/prompt-apis/translate/versions/1/", {"changelog": "first cut"}, format="json"
        )
        assert response.status_code == 200, response.content
        assert response.json()["changelog"] == "first cut"

    def test_publishing_needs_the_tenant_to_hold_the_deployment(
        self, api, bob, alice, translate, chat_deployment
    ):
        add_version(api, bob, chat_deployment)
        response = api.as_user(alice).post("/api/prompt-apis/translate/versions/1/publish/")
        assert "request access" in assert_error(response, 403, "access_not_approved")["message"]

    def test_versions_number_themselves_and_old_ones_can_be_reactivated(
        self, api, bob, alice, translate, subscribed
    ):
        for _ in range(2):
            add_version(api, bob, subscribed)
            number = PromptApiVersion.objects.order_by("-number").first().number
            api.as_user(alice).post(f"/api/prompt-apis/translate/versions/{number}/publish/")
        assert api.as_user(bob).get("/api/prompt-apis/translate/").json()["active_version"] == 2
        api.as_user(alice).post("/api/prompt-apis/translate/versions/1/activate/")
        assert api.as_user(bob).get("/api/prompt-apis/translate/").json()["active_version"] == 1


class TestBadDefinitions:
    def test_an_invalid_input_schema_is_refused_with_a_clear_error(
        self, api, bob, translate, subscribed
    ):
        response = add_version(
            api,
            bob,
            subscribed,
            input_schema={"type": "object", "properties": {"text": {"type": "strng"}}},
        )
        error = assert_error(response, 400, "invalid_schema")
        assert error["param"] == "input_schema"
        assert "not a valid JSON Schema" in error["message"]
        assert "properties/text/type" in error["message"]
        assert not PromptApiVersion.objects.exists()

    def test_a_template_variable_must_be_declared(self, api, bob, translate, subscribed):
        response = add_version(
            api,
            bob,
            subscribed,
            messages=[{"role": "user", "content": "Hello {{nobody}}"}],
        )
        assert "{{nobody}}" in assert_error(response, 400, "invalid_request")["message"]

    @pytest.mark.parametrize(
        ("overrides", "param"),
        [
            ({"input_schema": {"type": "string"}}, "input_schema"),
            ({"output_type": "json", "output_schema": {"type": 12}}, "output_schema"),
            ({"output_schema": {"type": "object"}}, "output_schema"),
            ({"parameters": {"temperature": 7}}, "parameters.temperature"),
            ({"parameters": {"logprobs": True}}, "parameters.logprobs"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            ({"messages": []}, "messages"),
            ({"deployment": "nope"}, "deployment"),
        ],
    )
    def test_each_bad_field_is_named(self, api, bob, translate, subscribed, overrides, param):
        error = assert_error(add_version(api, bob, subscribed, **overrides), 400)
        assert error["param"] == param, error

    def test_an_embedding_deployment_cannot_back_a_prompt_api(
        self, api, bob, translate, embedding_deployment
    ):
        error = assert_error(add_version(api, bob, embedding_deployment), 400)
        assert "chat or completion" in error["message"]


class TestVisibility:
    def test_other_tenants_see_public_apis_but_not_drafts_and_cannot_edit(
        self, api, alpha, bob, alice, charlie, beta, translate, subscribed
    ):
        add_version(api, bob, subscribed)
        api.as_user(alice).post("/api/prompt-apis/translate/versions/1/publish/")
        add_version(api, bob, subscribed)  # a draft v2
        assert_error(api.as_user(charlie).get("/api/prompt-apis/translate/"), 404, "not_found")

        from gateway.models import PromptApi

        PromptApi.objects.filter(slug="translate").update(visibility="public")
        client = api.as_user(charlie)
        assert client.get("/api/prompt-apis/translate/").status_code == 200
        numbers = [
            v["number"]
            for v in client.get("/api/prompt-apis/translate/versions/").json()["results"]
        ]
        assert numbers == [1]
        assert_error(client.get("/api/prompt-apis/translate/versions/2/"), 404)
        response = client.post(
            "/api/prompt-apis/translate/versions/",
            {**VERSION, "deployment": subscribed.slug},
            format="json",
        )
        assert_error(response, 403, "permission_denied")

    def test_only_staff_create_platform_wide_apis(self, api, alpha, alice, root):
        body = {"slug": "p", "name": "P", "platform_wide": True}
        assert_error(api.as_user(alice).post("/api/prompt-apis/", body, format="json"), 403)
        created = api.as_user(root).post("/api/prompt-apis/", body, format="json")
        assert created.status_code == 201
        assert created.json()["owner"] is None


def test_a_slug_that_is_a_console_page_is_reserved(api, alpha, bob):
    response = api.as_user(bob).post(
        "/api/prompt-apis/", {"slug": "new", "name": "New"}, format="json"
    )
    assert "reserved" in assert_error(response, 400, "invalid_request")["message"]
