"""bootstrap_demo: idempotent demo data and a key that works."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from gateway.models import ModelDeployment, PromptApi, PromptApiVersion
from tenants.models import (
    AccessRequest,
    ApiKey,
    Membership,
    Plan,
    Subscription,
    Tenant,
)

pytestmark = pytest.mark.django_db

MODELS = [
    Plan,
    Tenant,
    Membership,
    ModelDeployment,
    PromptApi,
    PromptApiVersion,
    Subscription,
    AccessRequest,
    ApiKey,
]


def run(capsys) -> str:
    call_command("bootstrap_demo")
    return capsys.readouterr().out


def test_running_it_twice_leaves_one_of_everything(capsys, django_user_model):
    run(capsys)
    first = {model: model.objects.count() for model in MODELS}
    users = django_user_model.objects.count()
    run(capsys)
    assert {model: model.objects.count() for model in MODELS} == first
    assert django_user_model.objects.count() == users == 3
    assert first[ModelDeployment] == 2
    assert first[PromptApi] == 2
    assert first[Subscription] == 4
    assert first[ApiKey] == 1


def test_it_prints_logins_urls_and_a_working_key(capsys, api):
    out = run(capsys)
    assert "/admin/" in out
    assert "olivia" in out
    raw = next(word for word in out.split() if word.startswith("sk-sluice-"))
    key = ApiKey.objects.authenticate(raw)
    assert key is not None
    assert key.tenant.slug == "acme"
    listed = api.with_key(raw).get("/api/subscriptions/").json()
    assert listed["count"] == 4


def test_the_printed_key_changes_and_the_old_one_stops_working(capsys):
    first = next(w for w in run(capsys).split() if w.startswith("sk-sluice-"))
    second = next(w for w in run(capsys).split() if w.startswith("sk-sluice-"))
    assert first != second
    assert ApiKey.objects.authenticate(first) is None
    assert ApiKey.objects.authenticate(second) is not None


def test_prompt_apis_are_published_and_subscribed(capsys):
    run(capsys)
    acme = Tenant.objects.get(slug="acme")
    for slug in ("summarize", "classify-sentiment"):
        prompt_api = PromptApi.objects.get(slug=slug)
        assert prompt_api.active_version.is_published
        assert Subscription.objects.filter(tenant=acme, prompt_api=prompt_api).exists()
