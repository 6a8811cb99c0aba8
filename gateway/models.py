"""The data plane's state: model deployments and prompt-APIs with immutable versions."""

from __future__ import annotations

import re

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

MODEL_NAME = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$",
    "Use letters, digits, '.', '_', ':' or '-' (this is the `model` name clients send).",
)
TEMPLATE_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class ModelDeployment(models.Model):
    """A model served by workers behind one bounded queue; its slug is the OpenAI `model`."""

    class Task(models.TextChoices):
        CHAT = "chat", "Chat"
        COMPLETION = "completion", "Completion"
        EMBEDDING = "embedding", "Embedding"
        CLASSIFICATION = "classification", "Classification"

    slug = models.CharField(max_length=100, unique=True, validators=[MODEL_NAME])
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    task = models.CharField(max_length=20, choices=Task.choices)
    backend = models.CharField(
        max_length=200, help_text="Dotted path of the backend class, e.g. workers.backends.X."
    )
    backend_config = models.JSONField(default=dict, blank=True)
    capacity = models.PositiveIntegerField(
        default=8,
        validators=[MinValueValidator(1)],
        help_text="Most requests admitted at once (queued plus running).",
    )
    max_batch_size = models.PositiveIntegerField(
        default=8, validators=[MinValueValidator(1), MaxValueValidator(1024)]
    )
    max_wait_ms = models.PositiveIntegerField(
        default=10,
        validators=[MaxValueValidator(10_000)],
        help_text="How long a batch waits to fill before it runs.",
    )
    default_deadline_s = models.FloatField(
        default=60.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="Deadline for requests that send no X-Request-Timeout.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def queue_name(self) -> str:
        """The Dramatiq queue that this deployment's workers consume."""
        return "deploy." + re.sub(r"[^A-Za-z0-9._-]", "_", self.slug)


class PromptApi(models.Model):
    """A prompt template plus a model, published as its own endpoint /v1/apis/<slug>."""

    class Visibility(models.TextChoices):
        PRIVATE = "private", "Private: the owning tenant only"
        PUBLIC = "public", "Public: any tenant may request access"

    tenant = models.ForeignKey(
        "tenants.Tenant",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="prompt_apis",
        help_text="Owning tenant; empty for a platform-wide prompt-API.",
    )
    slug = models.SlugField(max_length=80, unique=True)
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    visibility = models.CharField(
        max_length=10, choices=Visibility.choices, default=Visibility.PRIVATE
    )
    active_version = models.ForeignKey(
        "PromptApiVersion",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The version /v1/apis/<slug> runs when no ?version= is given.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        verbose_name = "prompt-API"

    def __str__(self) -> str:
        return self.slug

    @property
    def is_platform_wide(self) -> bool:
        return self.tenant_id is None


class PromptApiVersion(models.Model):
    """One version of a prompt-API; immutable once published (enforced by the services)."""

    class OutputType(models.TextChoices):
        TEXT = "text", "Text"
        JSON = "json", "JSON"

    class State(models.TextChoices):
        DRAFT = "draft", "Draft"
        PUBLISHED = "published", "Published"

    prompt_api = models.ForeignKey(PromptApi, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    messages = models.JSONField(
        help_text='Chat messages with {{variables}}: [{"role": "user", "content": "..."}]'
    )
    input_schema = models.JSONField(help_text="JSON Schema that `inputs` must satisfy.")
    output_type = models.CharField(
        max_length=10, choices=OutputType.choices, default=OutputType.TEXT
    )
    output_schema = models.JSONField(null=True, blank=True)
    deployment = models.ForeignKey(ModelDeployment, on_delete=models.PROTECT, related_name="+")
    parameters = models.JSONField(
        default=dict, blank=True, help_text="Defaults such as temperature and max_tokens."
    )
    changelog = models.TextField(blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.DRAFT)
    published_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["prompt_api", "-number"]
        verbose_name = "prompt-API version"
        constraints = [
            models.UniqueConstraint(fields=["prompt_api", "number"], name="version_number_unique"),
            models.CheckConstraint(
                name="published_version_has_date",
                condition=Q(state="draft") | Q(published_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prompt_api.slug} v{self.number}"

    @property
    def is_published(self) -> bool:
        return self.state == self.State.PUBLISHED

    def template_variables(self) -> set[str]:
        return {
            name
            for message in self.messages
            for name in TEMPLATE_VARIABLE.findall(str(message.get("content", "")))
        }
