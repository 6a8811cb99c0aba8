"""The OpenAPI schema and Swagger UI are served and describe the management API."""

from __future__ import annotations

import re

import pytest

from tests.support import assert_error

pytestmark = pytest.mark.django_db


def test_the_schema_lists_every_management_endpoint(api, alpha, alice):
    response = api.as_user(alice).get("/api/schema/?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for expected in (
        "/api/keys/",
        "/api/access-requests/{request_id}/approve/",
        "/api/prompt-apis/{slug}/versions/",
        "/api/call-logs/",
        "/api/deployments/",
        "/api/members/",
    ):
        assert expected in paths, expected


def test_swagger_ui_is_served(api, alpha, alice):
    response = api.as_user(alice).get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_swagger_ui_needs_no_internet(api, alpha, alice, settings):
    # Its scripts come from Sluice's own static files, so the page works offline.
    from django.contrib.staticfiles import finders

    page = api.as_user(alice).get("/api/docs/").content.decode()
    scripts = re.findall(r'src="([^"]+)"', page)
    assert scripts
    prefix = "/" + settings.STATIC_URL.strip("/") + "/"
    for src in scripts:
        assert src.startswith(prefix), src
        assert finders.find(src.removeprefix(prefix)), src


def test_the_schema_is_public_but_the_api_is_not(api, db):
    schema = api.get("/api/schema/?format=json")
    assert schema.status_code == 200
    assert "ApiKey" in schema.json()["components"]["securitySchemes"]
    assert_error(api.get("/api/keys/"), 401)


def test_options_on_the_docs_page_says_what_it_allows(api, alpha, alice):
    response = api.as_user(alice).options("/api/docs/")
    assert response.status_code == 200
    assert "GET" in response["Allow"]
