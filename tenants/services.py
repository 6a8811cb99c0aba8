"""Every change to tenants, members, keys and access requests.

Each function is keyword-only, runs in one transaction, writes an AuditEvent with the
actor, and sends messages (cache invalidation, e-mail) only once the transaction commits.
Role checks on who may call what live in tenants.policy and are applied by the views;
rules that depend on the objects themselves (legal transitions, the last owner, who may
review a request) are enforced here, so no caller can skip them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.contrib.auth import get_user_model
from django.contrib.auth.tokens import default_token_generator
from django.core.mail import send_mail
from django.db import IntegrityError, connection, transaction
from django.db.models import Model
from django.urls import reverse
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from sluice import errors
from sluice.redisconn import (
    clear_flag_on_commit,
    publish_invalidation_on_commit,
    set_flag_on_commit,
)
from workers import protocol

from . import policy
from .models import (
    QUOTA_FIELDS,
    AccessRequest,
    ApiKey,
    AuditEvent,
    Membership,
    Plan,
    QuotaOverride,
    Role,
    Scope,
    Subscription,
    Tenant,
    hash_secret,
)
from .policy import Actor

if TYPE_CHECKING:
    from gateway.models import ModelDeployment, PromptApi, PromptApiVersion

logger = logging.getLogger(__name__)

# An invited person without an account gets one whose username is their e-mail address
# (they sign in with it), so the address must fit auth.User.username.
INVITE_EMAIL_MAX_LENGTH = 150
# The latest a key may expire: a day short of the largest datetime Python has, so that
# showing it in any time zone cannot overflow.
LATEST_KEY_EXPIRY = datetime(9999, 12, 30, tzinfo=UTC)


# --- audit ------------------------------------------------------------------------------


def audit_record(
    *,
    actor: Actor,
    action: str,
    target: Model,
    tenant: Tenant | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        actor=actor.user if actor.user and actor.user.pk else None,
        actor_key=actor.key,
        tenant=tenant,
        action=action,
        target_type=target._meta.label_lower,
        target_id=str(target.pk),
        target_repr=str(target)[:200],
        before=_jsonable(before or {}),
        after=_jsonable(after or {}),
    )


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, datetime):
            out[name] = value.isoformat()
        elif isinstance(value, Model):
            out[name] = str(value)
        else:
            out[name] = value
    return out


# --- tenants ----------------------------------------------------------------------------


@transaction.atomic
def tenant_create(*, name: str, slug: str, plan: Plan, owner=None, actor: Actor) -> Tenant:
    if Tenant.objects.filter(slug=slug).exists():
        raise errors.SluiceError(
            errors.CONFLICT, f"A tenant with slug '{slug}' already exists.", param="slug"
        )
    tenant = Tenant.objects.create(name=name, slug=slug, plan=plan)
    audit_record(
        actor=actor,
        action="tenant.create",
        target=tenant,
        tenant=tenant,
        after={"name": name, "slug": slug, "plan": plan.slug},
    )
    if owner is not None:
        membership = Membership.objects.create(user=owner, tenant=tenant, role=Role.OWNER)
        audit_record(
            actor=actor,
            action="member.add",
            target=membership,
            tenant=tenant,
            after={"user": owner.get_username(), "role": Role.OWNER},
        )
    return tenant


@transaction.atomic
def tenant_suspend(*, tenant: Tenant, reason: str = "", actor: Actor) -> Tenant:
    """Suspend a tenant: its keys stop working at once, everywhere."""
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    if tenant.status == Tenant.Status.SUSPENDED:
        return tenant
    tenant.status = Tenant.Status.SUSPENDED
    tenant.suspended_reason = reason[:200]
    tenant.save(update_fields=["status", "suspended_reason"])
    audit_record(
        actor=actor,
        action="tenant.suspend",
        target=tenant,
        tenant=tenant,
        before={"status": "active"},
        after={"status": "suspended", "reason": reason},
    )
    set_flag_on_commit(protocol.deny_tenant(tenant.pk))
    publish_invalidation_on_commit("tenant", tenant.pk)
    return tenant


@transaction.atomic
def tenant_reactivate(*, tenant: Tenant, actor: Actor) -> Tenant:
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    if tenant.status == Tenant.Status.ACTIVE:
        # Already active, but a deny flag may have outlived its suspension (a Redis error
        # when it was cleared): reactivating again clears it.
        clear_flag_on_commit(protocol.deny_tenant(tenant.pk))
        return tenant
    tenant.status = Tenant.Status.ACTIVE
    tenant.suspended_reason = ""
    tenant.save(update_fields=["status", "suspended_reason"])
    audit_record(
        actor=actor,
        action="tenant.reactivate",
        target=tenant,
        tenant=tenant,
        before={"status": "suspended"},
        after={"status": "active"},
    )
    clear_flag_on_commit(protocol.deny_tenant(tenant.pk))
    publish_invalidation_on_commit("tenant", tenant.pk)
    return tenant


# --- members ----------------------------------------------------------------------------


def _owner_count(tenant: Tenant) -> int:
    return Membership.objects.filter(tenant=tenant, role=Role.OWNER).count()


def _require_owner_authority(actor: Actor, tenant: Tenant, *roles: str) -> None:
    if Role.OWNER in roles and not policy.has_role(actor, tenant, Role.OWNER):
        raise errors.SluiceError(
            errors.PERMISSION_DENIED, "Only the tenant's owners may grant or change the owner role."
        )


@transaction.atomic
def member_invite(
    *, tenant: Tenant, email: str, role: str, actor: Actor
) -> tuple[Membership, bool]:
    """Add the user with this e-mail to the tenant, creating an account if there is none.

    A new account has no password; the invitation e-mail carries a link to set one.
    Returns (membership, whether the account was created).
    """
    _require_owner_authority(actor, tenant, role)
    email = email.strip().lower()
    User = get_user_model()
    user = User.objects.filter(email__iexact=email).first()
    created = user is None
    if user is None:
        if len(email) > INVITE_EMAIL_MAX_LENGTH:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                f"An invited person signs in with their e-mail address, which can be at most "
                f"{INVITE_EMAIL_MAX_LENGTH} characters; this one has {len(email)}.",
                param="email",
            )
        if User.objects.filter(username__iexact=email).exists():
            raise errors.SluiceError(
                errors.CONFLICT,
                f"An account named {email} has another e-mail address; invite that address.",
                param="email",
            )
        user = User(username=email, email=email)
        user.set_unusable_password()
        user.save()
    elif Membership.objects.filter(user=user, tenant=tenant).exists():
        raise errors.SluiceError(
            errors.CONFLICT, f"{email} is already a member of {tenant.name}.", param="email"
        )
    membership = Membership.objects.create(user=user, tenant=tenant, role=role)
    audit_record(
        actor=actor,
        action="member.invite",
        target=membership,
        tenant=tenant,
        after={"email": email, "role": role, "new_account": created},
    )
    transaction.on_commit(lambda: _send_invitation(membership, actor, new_account=created))
    return membership, created


def _send_invitation(membership: Membership, actor: Actor, *, new_account: bool) -> None:
    from django.conf import settings

    user = membership.user
    if new_account:
        uid = urlsafe_base64_encode(force_bytes(user.pk))
        token = default_token_generator.make_token(user)
        link = settings.SITE_URL + reverse("console:invite_accept", args=[uid, token])
        how = f"Choose a password to sign in: {link}"
    else:
        how = f"Sign in at {settings.SITE_URL}{reverse('console:login')}"
    try:
        send_mail(
            subject=f"You have been invited to {membership.tenant.name} on Sluice",
            message=(
                f"{actor.label} added you to {membership.tenant.name} as {membership.role}.\n\n"
                f"{how}\n"
            ),
            from_email=None,
            recipient_list=[user.email],
        )
    except OSError:
        logger.exception("could not send the invitation to %s", user.email)


@transaction.atomic
def member_change_role(*, membership: Membership, role: str, actor: Actor) -> Membership:
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    if membership.role == role:
        return membership
    _require_owner_authority(actor, membership.tenant, role, membership.role)
    if membership.role == Role.OWNER and _owner_count(membership.tenant) == 1:
        raise errors.SluiceError(
            errors.CONFLICT,
            "A tenant must keep at least one owner: make someone else an owner first.",
        )
    before = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    audit_record(
        actor=actor,
        action="member.change_role",
        target=membership,
        tenant=membership.tenant,
        before={"role": before},
        after={"role": role},
    )
    return membership


@transaction.atomic
def member_remove(*, membership: Membership, actor: Actor) -> None:
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    _require_owner_authority(actor, membership.tenant, membership.role)
    if membership.role == Role.OWNER and _owner_count(membership.tenant) == 1:
        raise errors.SluiceError(
            errors.CONFLICT, "The last owner cannot be removed; the tenant would be orphaned."
        )
    audit_record(
        actor=actor,
        action="member.remove",
        target=membership,
        tenant=membership.tenant,
        before={"user": membership.user.get_username(), "role": membership.role},
    )
    membership.delete()


# --- API keys ---------------------------------------------------------------------------


def _validate_key_fields(scopes: list[str], expires_at: datetime | None) -> None:
    valid = set(Scope.values)
    unknown = sorted(set(scopes) - valid)
    if unknown:
        raise errors.SluiceError(
            errors.INVALID_REQUEST,
            f"Unknown scope {unknown[0]!r}; choose from {', '.join(sorted(valid))}.",
            param="scopes",
        )
    if not scopes:
        raise errors.SluiceError(
            errors.INVALID_REQUEST, "A key needs at least one scope.", param="scopes"
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise errors.SluiceError(
            errors.INVALID_REQUEST, "expires_at must be in the future.", param="expires_at"
        )
    if expires_at is not None and expires_at > LATEST_KEY_EXPIRY:
        raise errors.SluiceError(
            errors.INVALID_REQUEST,
            f"expires_at can be at most {LATEST_KEY_EXPIRY:%Y-%m-%d}; for a key that never "
            "expires, leave it out.",
            param="expires_at",
        )


@transaction.atomic
def api_key_issue(
    *,
    tenant: Tenant,
    name: str,
    actor: Actor,
    scopes: list[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns (key, raw). The raw key exists only in this return value."""
    scopes = list(dict.fromkeys(scopes if scopes is not None else [Scope.INFERENCE]))
    _validate_key_fields(scopes, expires_at)
    if not tenant.is_active:
        raise errors.SluiceError(errors.TENANT_SUSPENDED, "A suspended tenant cannot issue keys.")
    raw, prefix, secret = ApiKey.objects.generate()
    key = ApiKey.objects.create(
        tenant=tenant,
        created_by=actor.user if actor.user and actor.user.pk else None,
        name=name,
        prefix=prefix,
        secret_hash=hash_secret(secret),
        scopes=scopes,
        expires_at=expires_at,
    )
    audit_record(
        actor=actor,
        action="apikey.issue",
        target=key,
        tenant=tenant,
        after={"name": name, "prefix": prefix, "scopes": scopes, "expires_at": expires_at},
    )
    return key, raw


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor: Actor) -> ApiKey:
    key = ApiKey.objects.select_for_update().get(pk=key.pk)
    if key.revoked_at is not None:
        return key
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor,
        action="apikey.revoke",
        target=key,
        tenant=key.tenant,
        after={"revoked_at": key.revoked_at},
    )
    # The admission script refuses a denied key at once, whatever any cache still holds;
    # the flag outlives every cache's TTL.
    set_flag_on_commit(protocol.deny_key(key.prefix), ttl_s=24 * 3600)
    publish_invalidation_on_commit("apikey", key.prefix)
    return key


@transaction.atomic
def api_key_rotate(*, key: ApiKey, actor: Actor) -> tuple[ApiKey, str]:
    """Revoke key and issue its replacement with the same name, scopes and expiry."""
    if key.revoked_at is not None:
        raise errors.SluiceError(
            errors.CONFLICT, "This key is revoked; issue a new key instead of rotating it."
        )
    expires_at = key.expires_at if key.expires_at and key.expires_at > timezone.now() else None
    new_key, raw = api_key_issue(
        tenant=key.tenant,
        name=key.name,
        scopes=list(key.scopes),
        expires_at=expires_at,
        actor=actor,
    )
    api_key_revoke(key=key, actor=actor)
    audit_record(
        actor=actor,
        action="apikey.rotate",
        target=new_key,
        tenant=key.tenant,
        before={"prefix": key.prefix},
        after={"prefix": new_key.prefix},
    )
    return new_key, raw


@transaction.atomic
def api_key_delete(*, key: ApiKey, actor: Actor) -> None:
    """Delete a key's row for good; a live key is revoked first so caches drop it too."""
    api_key_revoke(key=key, actor=actor)
    audit_record(
        actor=actor,
        action="apikey.delete",
        target=key,
        tenant=key.tenant,
        before={"name": key.name, "prefix": key.prefix},
    )
    key.delete()


# --- access requests --------------------------------------------------------------------


def _pending_duplicate(tenant: Tenant, kind: str, **target: Any) -> bool:
    return AccessRequest.objects.filter(
        tenant=tenant, kind=kind, state=AccessRequest.State.PENDING, **target
    ).exists()


def quota_maximum(name: str) -> int:
    """The largest value the database can hold for the quota limit `name`."""
    field = QuotaOverride._meta.get_field(name)
    return connection.ops.integer_field_range(field.get_internal_type())[1]


def _clean_quota(tenant: Tenant, quota: dict[str, Any]) -> dict[str, int]:
    if not quota:
        raise errors.SluiceError(
            errors.INVALID_REQUEST,
            f"Name at least one limit to raise: {', '.join(QUOTA_FIELDS)}.",
            param="quota",
        )
    limits = tenant.limits()
    cleaned: dict[str, int] = {}
    for name, value in quota.items():
        if name not in QUOTA_FIELDS:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                f"Unknown limit {name!r}; choose from {', '.join(QUOTA_FIELDS)}.",
                param=f"quota.{name}",
            )
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                f"{name} must be a positive integer.",
                param=f"quota.{name}",
            )
        maximum = quota_maximum(name)
        if value > maximum:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                f"{name} can be at most {maximum:,}.",
                param=f"quota.{name}",
            )
        current = getattr(limits, name)
        if value <= current:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                f"{name} is already {current:,}; a quota request must ask for more.",
                param=f"quota.{name}",
            )
        cleaned[name] = value
    return cleaned


@transaction.atomic
def access_request_create(
    *,
    tenant: Tenant,
    kind: str,
    actor: Actor,
    deployment: ModelDeployment | None = None,
    prompt_api: PromptApi | None = None,
    prompt_api_version: PromptApiVersion | None = None,
    quota: dict[str, Any] | None = None,
    justification: str = "",
) -> AccessRequest:
    """File a request; where the requester could approve it anyway, it is approved at once."""
    Kind = AccessRequest.Kind
    target: dict[str, Any] = {}
    if kind == Kind.SUBSCRIBE_DEPLOYMENT:
        if deployment is None:
            raise errors.SluiceError(
                errors.INVALID_REQUEST, "Name the deployment to subscribe to.", param="deployment"
            )
        if not deployment.enabled:
            raise errors.SluiceError(
                errors.CONFLICT, f"Deployment '{deployment.slug}' is disabled.", param="deployment"
            )
        if Subscription.objects.filter(
            tenant=tenant, deployment=deployment, revoked_at__isnull=True
        ).exists():
            raise errors.SluiceError(
                errors.CONFLICT,
                f"{tenant.name} is already subscribed to '{deployment.slug}'.",
                param="deployment",
            )
        target = {"deployment": deployment}
    elif kind == Kind.SUBSCRIBE_PROMPT_API:
        if prompt_api is None or not policy.prompt_api_visible_to(prompt_api, tenant):
            raise errors.SluiceError(errors.NOT_FOUND, "No such prompt-API.", param="prompt_api")
        if prompt_api.tenant_id == tenant.pk:
            raise errors.SluiceError(
                errors.CONFLICT,
                "Your tenant owns this prompt-API and may call it already.",
                param="prompt_api",
            )
        if Subscription.objects.filter(
            tenant=tenant, prompt_api=prompt_api, revoked_at__isnull=True
        ).exists():
            raise errors.SluiceError(
                errors.CONFLICT,
                f"{tenant.name} is already subscribed to '{prompt_api.slug}'.",
                param="prompt_api",
            )
        target = {"prompt_api": prompt_api}
    elif kind == Kind.RAISE_QUOTA:
        quota = _clean_quota(tenant, quota or {})
    elif kind == Kind.PUBLISH_VERSION:
        if prompt_api_version is None or prompt_api_version.prompt_api.tenant_id != tenant.pk:
            raise errors.SluiceError(
                errors.NOT_FOUND, "No such prompt-API version.", param="prompt_api_version"
            )
        if prompt_api_version.is_published:
            raise errors.SluiceError(
                errors.VERSION_PUBLISHED,
                f"{prompt_api_version} is already published.",
                param="prompt_api_version",
            )
        target = {"prompt_api_version": prompt_api_version}
    else:
        raise errors.SluiceError(
            errors.INVALID_REQUEST,
            f"Unknown kind {kind!r}; choose from {', '.join(Kind.values)}.",
            param="kind",
        )
    if target and _pending_duplicate(tenant, kind, **target):
        raise errors.SluiceError(errors.CONFLICT, "An identical request is already pending review.")
    access_request = AccessRequest.objects.create(
        tenant=tenant,
        kind=kind,
        requester=actor.user if actor.user and actor.user.pk else None,
        quota=quota or {},
        justification=justification,
        **target,
    )
    audit_record(
        actor=actor,
        action="access_request.create",
        target=access_request,
        tenant=tenant,
        after={"kind": kind, "target": access_request.target_label, "state": "pending"},
    )
    if policy.may_decide_own_request(actor, access_request):
        access_request = _decide(
            access_request=access_request,
            state=AccessRequest.State.APPROVED,
            note="Approved automatically: the requester may approve such requests.",
            actor=actor,
        )
    return access_request


def _lock(access_request: AccessRequest) -> AccessRequest:
    return (
        AccessRequest.objects.select_for_update(of=("self",))
        .select_related("tenant__plan", "prompt_api_version__prompt_api")
        .get(pk=access_request.pk)
    )


def _illegal(access_request: AccessRequest, verb: str) -> errors.SluiceError:
    return errors.SluiceError(
        errors.INVALID_TRANSITION,
        f"This request is already {access_request.state}; only pending requests can be {verb}.",
    )


def _decide(*, access_request: AccessRequest, state: str, note: str, actor: Actor) -> AccessRequest:
    before = access_request.state
    access_request.state = state
    access_request.reviewer = actor.user if actor.user and actor.user.pk else None
    access_request.review_note = note
    access_request.decided_at = timezone.now()
    access_request.save(update_fields=["state", "reviewer", "review_note", "decided_at"])
    audit_record(
        actor=actor,
        action=f"access_request.{'approve' if state == 'approved' else 'reject'}",
        target=access_request,
        tenant=access_request.tenant,
        before={"state": before},
        after={"state": state, "note": note},
    )
    if state == AccessRequest.State.APPROVED:
        _apply(access_request, actor)
    return access_request


def _apply(access_request: AccessRequest, actor: Actor) -> None:
    Kind = AccessRequest.Kind
    tenant = access_request.tenant
    if access_request.kind in (Kind.SUBSCRIBE_DEPLOYMENT, Kind.SUBSCRIBE_PROMPT_API):
        target = (
            {"deployment": access_request.deployment}
            if access_request.kind == Kind.SUBSCRIBE_DEPLOYMENT
            else {"prompt_api": access_request.prompt_api}
        )
        subscription = Subscription.objects.filter(
            tenant=tenant, revoked_at__isnull=True, **target
        ).first()
        if subscription is None:
            try:
                with transaction.atomic():
                    subscription = Subscription.objects.create(
                        tenant=tenant, access_request=access_request, **target
                    )
            except IntegrityError:  # approved twice at once elsewhere: one subscription
                return
            audit_record(
                actor=actor,
                action="subscription.create",
                target=subscription,
                tenant=tenant,
                after={"target": str(subscription.target)},
            )
            publish_invalidation_on_commit("subscription", tenant.pk)
    elif access_request.kind == Kind.RAISE_QUOTA:
        override, _ = QuotaOverride.objects.select_for_update().get_or_create(tenant=tenant)
        before = {name: getattr(override, name) for name in access_request.quota}
        for name, value in access_request.quota.items():
            setattr(override, name, value)
        override.save(update_fields=[*access_request.quota, "updated_at"])
        audit_record(
            actor=actor,
            action="quota.raise",
            target=override,
            tenant=tenant,
            before=before,
            after=dict(access_request.quota),
        )
        publish_invalidation_on_commit("tenant", tenant.pk)
    elif access_request.kind == Kind.PUBLISH_VERSION:
        from gateway.services import prompt_api_version_publish

        prompt_api_version_publish(version=access_request.prompt_api_version, actor=actor)


@transaction.atomic
def access_request_approve(
    *, access_request: AccessRequest, actor: Actor, note: str = ""
) -> AccessRequest:
    access_request = _lock(access_request)
    if not access_request.can_move_to(AccessRequest.State.APPROVED):
        raise _illegal(access_request, "approved")
    refusal = policy.review_refusal(actor, access_request)
    if refusal:
        raise errors.SluiceError(errors.PERMISSION_DENIED, refusal)
    if access_request.kind == AccessRequest.Kind.RAISE_QUOTA:
        # One filed before quotas were bounded may ask for more than can be stored.
        for name, value in access_request.quota.items():
            maximum = quota_maximum(name)
            if value > maximum:
                raise errors.SluiceError(
                    errors.CONFLICT,
                    f"This request asks for {name} {value:,}, more than the "
                    f"{maximum:,} that can be stored; reject it instead.",
                )
    return _decide(
        access_request=access_request, state=AccessRequest.State.APPROVED, note=note, actor=actor
    )


@transaction.atomic
def access_request_reject(
    *, access_request: AccessRequest, actor: Actor, note: str = ""
) -> AccessRequest:
    access_request = _lock(access_request)
    if not access_request.can_move_to(AccessRequest.State.REJECTED):
        raise _illegal(access_request, "rejected")
    refusal = policy.review_refusal(actor, access_request)
    if refusal:
        raise errors.SluiceError(errors.PERMISSION_DENIED, refusal)
    return _decide(
        access_request=access_request, state=AccessRequest.State.REJECTED, note=note, actor=actor
    )


@transaction.atomic
def access_request_withdraw(*, access_request: AccessRequest, actor: Actor) -> AccessRequest:
    access_request = _lock(access_request)
    if not access_request.can_move_to(AccessRequest.State.WITHDRAWN):
        raise _illegal(access_request, "withdrawn")
    is_requester = actor.user is not None and access_request.requester_id == actor.user.pk
    if not (is_requester or actor.is_staff):
        raise errors.SluiceError(
            errors.PERMISSION_DENIED, "Only the person who filed a request may withdraw it."
        )
    access_request.state = AccessRequest.State.WITHDRAWN
    access_request.decided_at = timezone.now()
    access_request.save(update_fields=["state", "decided_at"])
    audit_record(
        actor=actor,
        action="access_request.withdraw",
        target=access_request,
        tenant=access_request.tenant,
        before={"state": "pending"},
        after={"state": "withdrawn"},
    )
    return access_request


@transaction.atomic
def subscription_revoke(*, subscription: Subscription, actor: Actor) -> Subscription:
    subscription = Subscription.objects.select_for_update().get(pk=subscription.pk)
    if subscription.revoked_at is not None:
        return subscription
    subscription.revoked_at = timezone.now()
    subscription.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor,
        action="subscription.revoke",
        target=subscription,
        tenant=subscription.tenant,
        after={"revoked_at": subscription.revoked_at},
    )
    publish_invalidation_on_commit("subscription", subscription.tenant_id)
    return subscription
