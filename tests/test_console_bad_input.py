"""Bad input in the console's forms is a form error (or a 404 page), never a 500.

Personas (tests/conftest.py): alice owns alpha, bob is a member there.
"""

from __future__ import annotations

import html
import json

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from gateway import services as gateway_services
from gateway.models import PromptApiVersion
from tenants.models import AccessRequest, ApiKey
from tests.conftest import actor

pytestmark = pytest.mark.django_db

MESSAGES = [{"role": "user", "content": "Summarize: {{text}}"}]
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def _text(response) -> str:
    return html.unescape(response.content.decode())


@pytest.fixture
def console(client, alpha, alice):
    client.raise_request_exception = False  # a 500 is a failed assertion, not an exception
    client.force_login(alice)
    return client


def test_switching_to_a_tenant_slug_with_a_nul_is_a_404(console):
    response = console.post(reverse("console:switch_tenant"), {"tenant": "alpha\x00"})
    assert response.status_code == 404


class TestKeyExpiry:
    @pytest.mark.parametrize("day", ["9999-12-31", "9999-12-30"])
    def test_a_day_at_the_end_of_the_calendar_is_a_form_error(self, console, day):
        response = console.post(
            reverse("console:key_create"),
            {"name": "k", "scopes": "inference", "expires_on": day},
        )
        assert response.status_code == 200
        assert "Pick 9999-12-29 or an earlier date" in _text(response)
        assert not ApiKey.objects.exists()

    def test_the_last_day_allowed_works_and_the_key_list_shows_it(self, console):
        response = console.post(
            reverse("console:key_create"),
            {"name": "k", "scopes": "inference", "expires_on": "9999-12-29"},
        )
        assert response.status_code == 200
        assert ApiKey.objects.get().expires_at.isoformat() == "9999-12-30T00:00:00+00:00"
        assert console.get(reverse("console:keys")).status_code == 200


def test_inviting_an_email_too_long_to_sign_in_with_is_a_form_error(console):
    email = "a" * 150 + "@example.com"
    response = console.post(reverse("console:member_invite"), {"email": email, "role": "member"})
    assert response.status_code == 200
    assert "at most 150 characters" in _text(response)
    assert not get_user_model().objects.filter(email=email).exists()


def test_asking_for_more_quota_than_the_database_holds_is_a_form_error(console):
    response = console.post(
        reverse("console:access_request_create"),
        {"kind": "raise_quota", "q-requests_per_minute": "1099511627776"},
    )
    assert response.status_code == 200
    assert "less than or equal to 2147483647" in _text(response)
    assert not AccessRequest.objects.exists()


class TestVersionJson:
    @pytest.fixture
    def url(self, alpha, alice):
        gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(alice)
        )
        return reverse("console:version_create", args=["summarize"])

    def post(self, console, url, deployment, **changes):
        data = {
            "deployment": deployment.slug,
            "messages": json.dumps(MESSAGES),
            "input_schema": json.dumps(SCHEMA),
            "output_type": "text",
            "output_schema": "",
            "parameters": "",
            "changelog": "",
        }
        return console.post(url, data | changes)

    @pytest.mark.parametrize(
        ("field", "text", "expected"),
        [
            ("messages", "[" * 5000 + "]" * 5000, "This JSON is nested too deeply."),
            ("messages", "[" * 70 + "]" * 70, "nested more than 64 levels deep"),
            ("parameters", '{"temperature": NaN}', "This JSON holds NaN"),
            ("parameters", '{"temperature": -Infinity}', "This JSON holds -Infinity"),
            ("parameters", '{"temperature": 1e400}', "temperature is inf"),
            ("parameters", '{"max_tokens": ' + "9" * 5000 + "}", "a number too long to read"),
            ("input_schema", '{"type": "object", "x": NaN}', "This JSON holds NaN"),
            (
                "messages",
                '[{"role": "user", "content": "a\\u0000b"}]',
                "[0].content contains a NUL character",
            ),
            (
                "messages",
                '[{"role": "user", "content": "a\x00b"}]',
                "This is not valid JSON: Invalid control character",
            ),
            (
                "messages",
                '[{"role": "user", "content": "a\\ud800b"}]',
                "contains an unpaired surrogate (\\ud800)",
            ),
        ],
    )
    def test_json_that_cannot_be_stored_is_a_form_error(
        self, console, url, chat_deployment, field, text, expected
    ):
        response = self.post(console, url, chat_deployment, **{field: text})
        assert response.status_code == 200
        assert expected in _text(response)
        assert not PromptApiVersion.objects.exists()

    def test_good_json_is_still_saved(self, console, url, chat_deployment):
        response = self.post(console, url, chat_deployment, parameters='{"temperature": 0.2}')
        assert response.status_code == 302
        assert PromptApiVersion.objects.get().parameters == {"temperature": 0.2}
