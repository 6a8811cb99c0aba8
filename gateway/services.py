"""Every change to deployments and prompt-APIs: atomic, audited, invalidating on commit."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from sluice import errors
from sluice.redisconn import publish_invalidation_on_commit
from tenants.models import Subscription, Tenant
from tenants.policy import Actor
from tenants.services import audit_record

from . import prompts
from .models import ModelDeployment, PromptApi, PromptApiVersion

DEPLOYMENT_FIELDS = (
    "slug",
    "name",
    "description",
    "task",
    "backend",
    "backend_config",
    "capacity",
    "max_batch_size",
    "max_wait_ms",
    "default_deadline_s",
    "enabled",
)
VERSION_FIELDS = (
    "messages",
    "input_schema",
    "output_type",
    "output_schema",
    "deployment",
    "parameters",
    "changelog",
)
PROMPT_TASKS = (ModelDeployment.Task.CHAT, ModelDeployment.Task.COMPLETION)
# Slugs that would collide with console pages (/prompt-apis/new/).
RESERVED_SLUGS = frozenset({"new", "create", "edit"})


def _full_clean(instance, exclude: list[str] | None = None) -> None:
    """Run model validation and re-raise the first problem in the error format."""
    try:
        instance.full_clean(exclude=exclude, validate_constraints=False)
    except ValidationError as exc:
        field, messages = next(iter(exc.message_dict.items()))
        param = None if field == "__all__" else field
        raise errors.SluiceError(
            errors.INVALID_REQUEST,
            f"{param}: {messages[0]}" if param else messages[0],
            param=param,
        ) from None


# --- deployments ------------------------------------------------------------------------


@transaction.atomic
def deployment_create(*, actor: Actor, **fields: Any) -> ModelDeployment:
    unknown = set(fields) - set(DEPLOYMENT_FIELDS)
    if unknown:
        raise errors.SluiceError(errors.UNKNOWN_FIELD, f"Unknown field {sorted(unknown)[0]!r}.")
    if ModelDeployment.objects.filter(slug=fields.get("slug")).exists():
        raise errors.SluiceError(
            errors.CONFLICT, f"A deployment named '{fields['slug']}' already exists.", param="slug"
        )
    prompts.check_storable("backend_config", fields.get("backend_config"))
    deployment = ModelDeployment(**fields)
    _full_clean(deployment)
    deployment.save()
    audit_record(
        actor=actor,
        action="deployment.create",
        target=deployment,
        after={name: getattr(deployment, name) for name in DEPLOYMENT_FIELDS},
    )
    publish_invalidation_on_commit("deployment", deployment.slug)
    return deployment


@transaction.atomic
def deployment_update(
    *, deployment: ModelDeployment, actor: Actor, **changes: Any
) -> ModelDeployment:
    deployment = ModelDeployment.objects.select_for_update().get(pk=deployment.pk)
    unknown = set(changes) - set(DEPLOYMENT_FIELDS)
    if unknown:
        raise errors.SluiceError(errors.UNKNOWN_FIELD, f"Unknown field {sorted(unknown)[0]!r}.")
    if "slug" in changes and changes["slug"] != deployment.slug:
        raise errors.SluiceError(
            errors.CONFLICT,
            "A deployment's slug is the model name clients send; create a new deployment "
            "instead of renaming one.",
            param="slug",
        )
    prompts.check_storable("backend_config", changes.get("backend_config"))
    check_task_change(deployment, changes.get("task", deployment.task))
    before = {name: getattr(deployment, name) for name in changes}
    for name, value in changes.items():
        setattr(deployment, name, value)
    _full_clean(deployment, exclude=["slug"])
    deployment.save(update_fields=[*changes, "updated_at"])
    audit_record(
        actor=actor,
        action="deployment.update",
        target=deployment,
        before=before,
        after={name: getattr(deployment, name) for name in changes},
    )
    publish_invalidation_on_commit("deployment", deployment.slug)
    return deployment


# --- prompt-APIs ------------------------------------------------------------------------


def check_task_change(deployment: ModelDeployment, task: str) -> None:
    """A deployment that published prompt-APIs run on must keep generating text."""
    if task in PROMPT_TASKS or deployment.pk is None:
        return
    versions = PromptApiVersion.objects.filter(deployment=deployment).exclude(
        state=PromptApiVersion.State.DRAFT
    )
    used_by = versions.select_related("prompt_api").first()
    if used_by is not None:
        raise errors.SluiceError(
            errors.CONFLICT,
            f"Prompt-API '{used_by.prompt_api.slug}' v{used_by.number} runs on "
            f"'{deployment.slug}' and needs a chat or completion model; the task cannot "
            f"become {task!r}. Create a new deployment instead.",
            param="task",
        )


@transaction.atomic
def prompt_api_create(
    *,
    tenant: Tenant | None,
    slug: str,
    name: str,
    actor: Actor,
    description: str = "",
    visibility: str = PromptApi.Visibility.PRIVATE,
) -> PromptApi:
    if slug in RESERVED_SLUGS:
        raise errors.SluiceError(
            errors.INVALID_REQUEST, f"'{slug}' is reserved; choose another slug.", param="slug"
        )
    if PromptApi.objects.filter(slug=slug).exists():
        raise errors.SluiceError(
            errors.CONFLICT, f"The prompt-API slug '{slug}' is taken.", param="slug"
        )
    prompt_api = PromptApi(
        tenant=tenant,
        slug=slug,
        name=name,
        description=description,
        visibility=visibility,
        created_by=actor.user if actor.user and actor.user.pk else None,
    )
    _full_clean(prompt_api, exclude=["active_version", "created_by", "tenant"])
    prompt_api.save()
    audit_record(
        actor=actor,
        action="prompt_api.create",
        target=prompt_api,
        tenant=tenant,
        after={"slug": slug, "name": name, "visibility": visibility},
    )
    return prompt_api


def _check_version(fields: dict[str, Any]) -> None:
    prompts.check_version_definition(
        messages=fields["messages"],
        input_schema=fields["input_schema"],
        output_type=fields.get("output_type", PromptApiVersion.OutputType.TEXT),
        output_schema=fields.get("output_schema"),
        parameters=fields.get("parameters") or {},
    )
    deployment = fields["deployment"]
    if deployment.task not in PROMPT_TASKS:
        raise errors.SluiceError(
            errors.INVALID_REQUEST,
            f"Deployment '{deployment.slug}' serves {deployment.task}; a prompt-API needs a "
            "chat or completion deployment.",
            param="deployment",
        )


@transaction.atomic
def prompt_api_version_create(
    *, prompt_api: PromptApi, actor: Actor, **fields: Any
) -> PromptApiVersion:
    unknown = set(fields) - set(VERSION_FIELDS)
    if unknown:
        raise errors.SluiceError(errors.UNKNOWN_FIELD, f"Unknown field {sorted(unknown)[0]!r}.")
    _check_version(fields)
    # Lock the prompt-API so two concurrent drafts cannot take the same number.
    PromptApi.objects.select_for_update().filter(pk=prompt_api.pk).first()
    number = (prompt_api.versions.aggregate(top=Max("number"))["top"] or 0) + 1
    version = PromptApiVersion.objects.create(
        prompt_api=prompt_api,
        number=number,
        created_by=actor.user if actor.user and actor.user.pk else None,
        **fields,
    )
    audit_record(
        actor=actor,
        action="prompt_api.version_create",
        target=version,
        tenant=prompt_api.tenant,
        after={"number": number, "deployment": version.deployment},
    )
    return version


@transaction.atomic
def prompt_api_version_update(
    *, version: PromptApiVersion, actor: Actor, **changes: Any
) -> PromptApiVersion:
    version = PromptApiVersion.objects.select_for_update().get(pk=version.pk)
    if version.is_published:
        raise errors.SluiceError(
            errors.VERSION_PUBLISHED,
            f"{version} is published and can no longer change; create a new version.",
        )
    unknown = set(changes) - set(VERSION_FIELDS)
    if unknown:
        raise errors.SluiceError(errors.UNKNOWN_FIELD, f"Unknown field {sorted(unknown)[0]!r}.")
    merged = {name: getattr(version, name) for name in VERSION_FIELDS} | changes
    _check_version(merged)
    before = {name: getattr(version, name) for name in changes}
    for name, value in changes.items():
        setattr(version, name, value)
    version.save(update_fields=list(changes))
    audit_record(
        actor=actor,
        action="prompt_api.version_update",
        target=version,
        tenant=version.prompt_api.tenant,
        before=before,
        after=changes,
    )
    return version


@transaction.atomic
def prompt_api_version_publish(*, version: PromptApiVersion, actor: Actor) -> PromptApiVersion:
    """Freeze a draft and make it the version its prompt-API serves."""
    version = (
        PromptApiVersion.objects.select_for_update(of=("self",))
        .select_related("prompt_api", "deployment")
        .get(pk=version.pk)
    )
    if version.is_published:
        raise errors.SluiceError(errors.VERSION_PUBLISHED, f"{version} is already published.")
    prompt_api = version.prompt_api
    if (
        prompt_api.tenant_id is not None
        and not Subscription.objects.filter(
            tenant_id=prompt_api.tenant_id, deployment=version.deployment, revoked_at__isnull=True
        ).exists()
    ):
        raise errors.SluiceError(
            errors.ACCESS_NOT_APPROVED,
            f"Tenant '{prompt_api.tenant.slug}' has no approved subscription to deployment "
            f"'{version.deployment.slug}'; request access to it before publishing a version "
            "that runs on it.",
            param="deployment",
        )
    version.state = PromptApiVersion.State.PUBLISHED
    version.published_at = timezone.now()
    version.save(update_fields=["state", "published_at"])
    previous = prompt_api.active_version_id
    prompt_api.active_version = version
    prompt_api.save(update_fields=["active_version"])
    audit_record(
        actor=actor,
        action="prompt_api.version_publish",
        target=version,
        tenant=prompt_api.tenant,
        before={"active_version": previous},
        after={"active_version": version.pk, "number": version.number},
    )
    publish_invalidation_on_commit("prompt_api", prompt_api.slug)
    return version


@transaction.atomic
def prompt_api_activate_version(*, version: PromptApiVersion, actor: Actor) -> PromptApi:
    """Serve an older published version again (a rollback)."""
    if not version.is_published:
        raise errors.SluiceError(
            errors.CONFLICT, f"{version} is a draft; publish it before making it active."
        )
    prompt_api = PromptApi.objects.select_for_update().get(pk=version.prompt_api_id)
    previous = prompt_api.active_version_id
    prompt_api.active_version = version
    prompt_api.save(update_fields=["active_version"])
    audit_record(
        actor=actor,
        action="prompt_api.activate_version",
        target=prompt_api,
        tenant=prompt_api.tenant,
        before={"active_version": previous},
        after={"active_version": version.pk},
    )
    publish_invalidation_on_commit("prompt_api", prompt_api.slug)
    return prompt_api
