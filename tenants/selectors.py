"""Reads of tenant data, always scoped by tenant. `access_*` return one object or raise 404."""

from __future__ import annotations

from django.db.models import QuerySet

from sluice import errors

from .models import AccessRequest, ApiKey, AuditEvent, Membership, Subscription, Tenant


def _not_found(what: str) -> errors.SluiceError:
    return errors.SluiceError(errors.NOT_FOUND, f"No such {what} in this tenant.")


def api_keys_for(tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant).select_related("created_by", "tenant")


def access_api_key(*, tenant: Tenant, key_id: int) -> ApiKey:
    key = api_keys_for(tenant).filter(pk=key_id).first()
    if key is None:
        raise _not_found("API key")
    return key


def access_requests_for(tenant: Tenant | None) -> QuerySet[AccessRequest]:
    """A tenant's requests; None (staff only) means every tenant's."""
    queryset = AccessRequest.objects.select_related(
        "tenant__plan",
        "requester",
        "reviewer",
        "deployment",
        "prompt_api",
        "prompt_api_version__prompt_api",
    )
    return queryset if tenant is None else queryset.filter(tenant=tenant)


def access_access_request(*, tenant: Tenant | None, request_id: int) -> AccessRequest:
    found = access_requests_for(tenant).filter(pk=request_id).first()
    if found is None:
        raise _not_found("access request")
    return found


def members_of(tenant: Tenant) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(tenant=tenant).select_related("user").order_by("user__username")
    )


def access_membership(*, tenant: Tenant, membership_id: int) -> Membership:
    found = members_of(tenant).filter(pk=membership_id).first()
    if found is None:
        raise _not_found("member")
    return found


def subscriptions_of(tenant: Tenant, *, live_only: bool = True) -> QuerySet[Subscription]:
    queryset = Subscription.objects.filter(tenant=tenant).select_related("deployment", "prompt_api")
    return queryset.filter(revoked_at__isnull=True) if live_only else queryset


def access_subscription(*, tenant: Tenant, subscription_id: int) -> Subscription:
    found = subscriptions_of(tenant, live_only=False).filter(pk=subscription_id).first()
    if found is None:
        raise _not_found("subscription")
    return found


def audit_events_for(tenant: Tenant) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(tenant=tenant).select_related("actor", "actor_key")


def tenants_of(user) -> QuerySet[Tenant]:
    if user.is_staff:
        return Tenant.objects.select_related("plan").all()
    return Tenant.objects.filter(memberships__user=user).select_related("plan")
