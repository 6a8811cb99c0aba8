"""Who may do what: tenants, their plans and members, API keys, access requests, audit."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import zlib
from dataclasses import dataclass

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from sluice import errors
from sluice.errors import SluiceError


class Priority(models.TextChoices):
    HIGH = "high", "High"
    NORMAL = "normal", "Normal"
    LOW = "low", "Low"


class Plan(models.Model):
    """Limits shared by every tenant on the plan; a tenant's QuotaOverride wins over them."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    description = models.TextField(blank=True)
    requests_per_minute = models.PositiveIntegerField(
        default=60,
        validators=[MinValueValidator(1)],
        help_text="Requests per minute allowed for each API key.",
    )
    tokens_per_minute = models.PositiveIntegerField(
        default=100_000,
        validators=[MinValueValidator(1)],
        help_text="Prompt plus completion tokens per minute for the tenant.",
    )
    monthly_token_budget = models.PositiveBigIntegerField(
        default=10_000_000, help_text="Tokens the tenant may spend per calendar month (UTC)."
    )
    max_tokens_cap = models.PositiveIntegerField(
        default=1024,
        validators=[MinValueValidator(1)],
        help_text="The largest max_tokens a single request may ask for.",
    )
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.NORMAL)
    fair_share_weight = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Relative share of a saturated deployment's capacity.",
    )
    requires_platform_approval = models.BooleanField(
        default=True,
        help_text=(
            "When on, only platform staff approve this plan's access requests; when off, "
            "tenant owners and admins review their members' requests."
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int
    tokens_per_minute: int
    monthly_token_budget: int
    max_tokens_cap: int
    priority: str
    fair_share_weight: int


QUOTA_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "monthly_token_budget",
    "max_tokens_cap",
)


class Tenant(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="tenants")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    suspended_reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE

    def limits(self) -> Limits:
        """The plan's limits with this tenant's approved quota overrides applied."""
        override = getattr(self, "quota_override", None)
        values = {}
        for name in QUOTA_FIELDS:
            raised = getattr(override, name, None)
            values[name] = getattr(self.plan, name) if raised is None else raised
        return Limits(
            priority=self.plan.priority, fair_share_weight=self.plan.fair_share_weight, **values
        )


class QuotaOverride(models.Model):
    """Limits raised for one tenant by an approved quota request; empty fields use the plan."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="quota_override")
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    monthly_token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    max_tokens_cap = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"Quota override for {self.tenant}"


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


# Higher rank may do everything a lower rank may.
ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_user_tenant_unique")
        ]
        ordering = ["tenant__name", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[Role(self.role)] >= ROLE_RANK[Role(role)]


# --- API keys --------------------------------------------------------------------------

KEY_PREFIX = "sk-sluice-"
_ALPHABET = string.ascii_letters + string.digits
_LOWER = string.ascii_lowercase + string.digits
PREFIX_LENGTH = 8
SECRET_LENGTH = 32
CHECKSUM_LENGTH = 6


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(_ALPHABET[rest])
    return "".join(reversed(digits)).rjust(width, _ALPHABET[0])


def key_checksum(body: str) -> str:
    """CRC32 of everything before the checksum, so scanners can validate a key offline."""
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


_KEY_SHAPE = re.compile(
    rf"{KEY_PREFIX}[a-z0-9]{{{PREFIX_LENGTH}}}_[A-Za-z0-9]{{{SECRET_LENGTH + CHECKSUM_LENGTH}}}"
)


def parse_raw_key(raw: str) -> tuple[str, str] | None:
    """Split ``sk-sluice-<prefix>_<secret><checksum>`` into (prefix, secret), or None."""
    # The shape first: only the key's own alphabet reaches the checksum and the database.
    if not _KEY_SHAPE.fullmatch(raw):
        return None
    rest = raw[len(KEY_PREFIX) :]
    body, checksum = raw[:-CHECKSUM_LENGTH], raw[-CHECKSUM_LENGTH:]
    if not hmac.compare_digest(key_checksum(body), checksum):
        return None
    return rest[:PREFIX_LENGTH], rest[PREFIX_LENGTH + 1 : PREFIX_LENGTH + 1 + SECRET_LENGTH]


def hash_secret(secret: str) -> str:
    return hmac.new(
        settings.API_KEY_HMAC_SECRET.encode(), secret.encode(), hashlib.sha256
    ).hexdigest()


class Scope(models.TextChoices):
    INFERENCE = "inference", "Inference (/v1 endpoints)"
    MANAGE_READ = "manage.read", "Management API: read"
    MANAGE_WRITE = "manage.write", "Management API: write"


def default_scopes() -> list[str]:
    return [Scope.INFERENCE]


class ApiKeyQuerySet(models.QuerySet):
    def usable(self) -> ApiKeyQuerySet:
        now = timezone.now()
        return self.filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now),
            revoked_at__isnull=True,
            tenant__status=Tenant.Status.ACTIVE,
        )


class ApiKeyManager(models.Manager.from_queryset(ApiKeyQuerySet)):
    def generate(self) -> tuple[str, str, str]:
        """A fresh (raw key, prefix, secret); the prefix is unique among stored keys."""
        while True:
            prefix = "".join(secrets.choice(_LOWER) for _ in range(PREFIX_LENGTH))
            if not self.filter(prefix=prefix).exists():
                break
        secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))
        body = f"{KEY_PREFIX}{prefix}_{secret}"
        return body + key_checksum(body), prefix, secret

    def verify(self, raw: str) -> ApiKey | None:
        """The key whose secret this is, whatever its state; compared in constant time."""
        parsed = parse_raw_key(raw)
        if parsed is None:
            return None
        prefix, secret = parsed
        key = self.select_related("tenant__plan", "created_by").filter(prefix=prefix).first()
        if key is None or not hmac.compare_digest(key.secret_hash, hash_secret(secret)):
            return None
        return key

    def authenticate(self, raw: str) -> ApiKey | None:
        """The key for this raw string if it may be used now, else None."""
        key = self.verify(raw)
        return key if key is not None and key.refusal() is None else None


class ApiKey(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="api_keys",
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=PREFIX_LENGTH, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    scopes = ArrayField(
        models.CharField(max_length=20, choices=Scope.choices), default=default_scopes
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ApiKeyManager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.display_prefix})"

    @property
    def display_prefix(self) -> str:
        """What consoles show in place of the key: enough to recognise it, nothing more."""
        return f"{KEY_PREFIX}{self.prefix}_…"

    @property
    def status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        return "active"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def refusal(self) -> SluiceError | None:
        """Why this (genuine) key may not be used now, or None if it may."""
        if self.revoked_at:
            return SluiceError(
                errors.INVALID_API_KEY,
                f"This API key was revoked on {self.revoked_at:%Y-%m-%d %H:%M} UTC.",
            )
        if self.expires_at and self.expires_at <= timezone.now():
            return SluiceError(
                errors.INVALID_API_KEY, f"This API key expired on {self.expires_at:%Y-%m-%d} UTC."
            )
        if self.tenant.status != Tenant.Status.ACTIVE:
            return SluiceError(
                errors.TENANT_SUSPENDED,
                f"Tenant '{self.tenant.slug}' is suspended, so its API keys are disabled.",
            )
        return None


# --- Access requests and subscriptions -----------------------------------------------------


class AccessRequest(models.Model):
    """One approval workflow for every kind of thing a tenant may ask for."""

    class Kind(models.TextChoices):
        SUBSCRIBE_DEPLOYMENT = "subscribe_deployment", "Use a model deployment"
        SUBSCRIBE_PROMPT_API = "subscribe_prompt_api", "Use a prompt-API"
        RAISE_QUOTA = "raise_quota", "Raise a quota"
        PUBLISH_VERSION = "publish_version", "Publish a prompt-API version"

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        WITHDRAWN = "withdrawn", "Withdrawn"

    # The only legal moves; anything else is a 409 with this table's reason.
    TRANSITIONS = {
        State.PENDING: {State.APPROVED, State.REJECTED, State.WITHDRAWN},
        State.APPROVED: set(),
        State.REJECTED: set(),
        State.WITHDRAWN: set(),
    }

    kind = models.CharField(max_length=30, choices=Kind.choices)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="access_requests")
    requester = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="access_requests",
    )
    deployment = models.ForeignKey(
        "gateway.ModelDeployment", on_delete=models.CASCADE, null=True, blank=True
    )
    prompt_api = models.ForeignKey(
        "gateway.PromptApi", on_delete=models.CASCADE, null=True, blank=True
    )
    prompt_api_version = models.ForeignKey(
        "gateway.PromptApiVersion", on_delete=models.CASCADE, null=True, blank=True
    )
    quota = models.JSONField(
        default=dict, blank=True, help_text="For quota requests: the limits asked for."
    )
    justification = models.TextField(blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="reviewed_access_requests",
    )
    review_note = models.TextField(blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "state", "-created_at"])]
        constraints = [
            models.CheckConstraint(
                name="access_request_target_matches_kind",
                condition=(
                    Q(kind="subscribe_deployment", deployment__isnull=False)
                    | Q(kind="subscribe_prompt_api", prompt_api__isnull=False)
                    | Q(kind="raise_quota")
                    | Q(kind="publish_version", prompt_api_version__isnull=False)
                ),
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.target_label} ({self.state})"

    @property
    def target_label(self) -> str:
        if self.kind == self.Kind.SUBSCRIBE_DEPLOYMENT:
            return str(self.deployment)
        if self.kind == self.Kind.SUBSCRIBE_PROMPT_API:
            return str(self.prompt_api)
        if self.kind == self.Kind.PUBLISH_VERSION:
            return str(self.prompt_api_version)
        return ", ".join(f"{name} → {value:,}" for name, value in sorted(self.quota.items()))

    def can_move_to(self, state: str) -> bool:
        return state in self.TRANSITIONS[self.State(self.state)]


class Subscription(models.Model):
    """A tenant's standing permission to call one deployment or one prompt-API."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="subscriptions")
    deployment = models.ForeignKey(
        "gateway.ModelDeployment",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="subscriptions",
    )
    prompt_api = models.ForeignKey(
        "gateway.PromptApi",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="subscriptions",
    )
    access_request = models.ForeignKey(
        AccessRequest, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                name="subscription_exactly_one_target",
                condition=(
                    Q(deployment__isnull=False, prompt_api__isnull=True)
                    | Q(deployment__isnull=True, prompt_api__isnull=False)
                ),
            ),
            models.UniqueConstraint(
                fields=["tenant", "deployment"],
                condition=Q(revoked_at__isnull=True, deployment__isnull=False),
                name="subscription_one_live_per_deployment",
            ),
            models.UniqueConstraint(
                fields=["tenant", "prompt_api"],
                condition=Q(revoked_at__isnull=True, prompt_api__isnull=False),
                name="subscription_one_live_per_prompt_api",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant} → {self.deployment or self.prompt_api}"

    @property
    def target(self):
        return self.deployment or self.prompt_api


class AuditEvent(models.Model):
    """An append-only record of every change that matters, with who made it."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="audit_events",
    )
    actor_key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    tenant = models.ForeignKey(
        Tenant, on_delete=models.SET_NULL, null=True, blank=True, related_name="audit_events"
    )
    action = models.CharField(max_length=60)
    target_type = models.CharField(max_length=60)
    target_id = models.CharField(max_length=64)
    target_repr = models.CharField(max_length=200)
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [
            models.Index(fields=["tenant", "-at"]),
            models.Index(fields=["target_type", "target_id"]),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.target_repr}"
