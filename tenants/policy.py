"""Who may do what: the role matrix, in one place, used by the API and the console alike.

| role    | may                                                                  |
|---------|----------------------------------------------------------------------|
| viewer  | read everything in the tenant                                        |
| member  | + issue and revoke own keys, request access, draft prompt-APIs       |
| admin   | + revoke any key, manage members (not owners), publish versions,     |
|         |   review members' requests where the plan allows                     |
| owner   | + manage owners and admins                                           |
| staff   | everything, in every tenant; the only reviewers of quota requests    |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sluice import errors

from .models import AccessRequest, Membership, Role, Tenant

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from gateway.models import PromptApi

    from .models import ApiKey


@dataclass(frozen=True)
class Actor:
    """The person behind a change, and the API key they used if any."""

    user: User | None
    key: ApiKey | None = None

    @property
    def is_staff(self) -> bool:
        return bool(self.user and self.user.is_active and self.user.is_staff)

    @property
    def label(self) -> str:
        who = self.user.get_username() if self.user else "system"
        return f"{who} (key {self.key.display_prefix})" if self.key else who


SYSTEM = Actor(user=None)


def membership(actor: Actor, tenant: Tenant) -> Membership | None:
    if actor.user is None or not actor.user.is_authenticated:
        return None
    cache = actor.user.__dict__.setdefault("_sluice_memberships", {})
    if tenant.pk not in cache:
        cache[tenant.pk] = Membership.objects.filter(user=actor.user, tenant=tenant).first()
    return cache[tenant.pk]


def role_in(actor: Actor, tenant: Tenant) -> str | None:
    if actor.is_staff:
        return Role.OWNER
    found = membership(actor, tenant)
    return found.role if found else None


def has_role(actor: Actor, tenant: Tenant, role: str) -> bool:
    if actor.is_staff:
        return True
    found = membership(actor, tenant)
    return bool(found and found.has_role(role))


def require_role(actor: Actor, tenant: Tenant, role: str, doing: str) -> None:
    if not has_role(actor, tenant, role):
        raise errors.SluiceError(
            errors.PERMISSION_DENIED,
            f"You need the {role} role (or higher) in tenant '{tenant.slug}' to {doing}.",
        )


def require_staff(actor: Actor, doing: str) -> None:
    if not actor.is_staff:
        raise errors.SluiceError(errors.PERMISSION_DENIED, f"Only platform staff may {doing}.")


def tenant_admins_review(access_request: AccessRequest) -> bool:
    """Whether this request is for the tenant's own admins to decide (else platform staff)."""
    if access_request.kind == AccessRequest.Kind.RAISE_QUOTA:
        return False
    if access_request.kind == AccessRequest.Kind.PUBLISH_VERSION:
        prompt_api = access_request.prompt_api_version.prompt_api
        if prompt_api.visibility == prompt_api.Visibility.PRIVATE:
            return True
    return not access_request.tenant.plan.requires_platform_approval


def review_refusal(actor: Actor, access_request: AccessRequest) -> str | None:
    """Why actor may not review this request, or None if they may."""
    if actor.is_staff:
        return None
    if not tenant_admins_review(access_request):
        return "Only platform staff may review this request on the tenant's plan."
    if actor.user is not None and access_request.requester_id == actor.user.pk:
        return "You cannot review your own request."
    if not has_role(actor, access_request.tenant, Role.ADMIN):
        return "Only the tenant's owners and admins may review its requests."
    return None


def can_review(actor: Actor, access_request: AccessRequest) -> bool:
    return review_refusal(actor, access_request) is None


def may_decide_own_request(actor: Actor, access_request: AccessRequest) -> bool:
    """Requests whose requester could approve them anyway are approved at once."""
    if actor.is_staff:
        return True
    return tenant_admins_review(access_request) and has_role(
        actor, access_request.tenant, Role.ADMIN
    )


def prompt_api_visible_to(prompt_api: PromptApi, tenant: Tenant) -> bool:
    return prompt_api.tenant_id == tenant.pk or prompt_api.visibility == "public"
