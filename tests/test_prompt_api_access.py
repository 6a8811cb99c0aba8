"""Who may run a prompt-API: its owner at once, others by subscription, and nobody once its
owner has lost the model it runs on."""

from __future__ import annotations

import openai
import pytest

from gateway.models import PromptApi
from tenants import services
from tenants.models import Subscription
from tenants.policy import SYSTEM

from .conftest import fixed_deployment, published_text_prompt_api, wait_until

INPUTS = {"text": "hello"}


@pytest.fixture
def chat(dataplane, alpha, subscribe):
    deployment = fixed_deployment("fixed-chat")
    subscribe(alpha, deployment)
    return deployment


def run(client: openai.OpenAI, slug: str):
    return client.post(f"/apis/{slug}", body={"inputs": INPUTS}, cast_to=object)


def client_for(dataplane, tenant, user, issue_key) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{dataplane}/v1", api_key=issue_key(tenant, user), max_retries=0, timeout=10
    )


def wrap(alpha, alice, chat):
    return published_text_prompt_api(
        tenant=alpha, user=alice, deployment=chat, template="Wrap: {{text}}"
    )


class OwnerTestCase:
    def test_an_owner_runs_a_prompt_api_it_just_made_with_a_warm_cache(
        self, chat, alpha, alice, dataplane, issue_key, start_worker
    ):
        start_worker(chat)
        client = client_for(dataplane, alpha, alice, issue_key)
        assert client.models.list()  # the tenant's entry is now cached
        wrap(alpha, alice, chat)
        assert run(client, "wrap")["output"]

    def test_a_prompt_api_stops_for_everyone_when_its_owner_loses_the_model(
        self, chat, alpha, alice, beta, charlie, dataplane, issue_key, subscribe, start_worker
    ):
        start_worker(chat)
        prompt_api = wrap(alpha, alice, chat)
        PromptApi.objects.filter(pk=prompt_api.pk).update(visibility="public")
        subscribe(beta, prompt_api)  # before beta's first call: nothing cached to refresh
        owner = client_for(dataplane, alpha, alice, issue_key)
        other = client_for(dataplane, beta, charlie, issue_key)
        assert run(owner, "wrap")["output"]
        assert run(other, "wrap")["output"]

        services.subscription_revoke(
            subscription=Subscription.objects.get(tenant=alpha, deployment=chat), actor=SYSTEM
        )

        for client in (owner, other):

            def refused(client=client) -> bool:
                try:
                    run(client, "wrap")
                except openai.PermissionDeniedError as error:
                    return "renew" in error.message
                return False

            wait_until(refused, timeout=5, what="the prompt-API to stop")
