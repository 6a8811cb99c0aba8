"""Pieces every management-API view shares: strict serializers, pagination, tenant context."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError
from rest_framework import exceptions, permissions, serializers
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.pagination import Cursor, CursorPagination, PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from sluice import errors
from tenants.models import Membership, Scope, Tenant
from tenants.policy import Actor

TENANT_HEADER = "X-Sluice-Tenant"


class StrictSerializer(serializers.Serializer):
    """A serializer that refuses fields it does not know instead of silently ignoring them."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(set(data) - writable)
            if unknown:
                raise serializers.ValidationError(
                    {name: [f"Unknown field {name!r}."] for name in unknown}, code="unknown_field"
                )
        return super().to_internal_value(data)


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 200


class NewestFirstPagination(CursorPagination):
    """Stable pages over tables that grow while you read them (call logs)."""

    ordering = ("-created_at", "-id")
    page_size_query_param = "page_size"
    max_page_size = 500

    def paginate_queryset(self, queryset, request, view=None):
        self.model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Request) -> Cursor | None:
        """DRF's, but also refusing a position that is no value of the ordering field.

        DRF hands the position to the database unchecked (a 500), and answers a cursor it
        cannot decode with a 404; both are the client's mistake, so both are a 400.
        """
        try:
            cursor = super().decode_cursor(request)
            if cursor is not None and cursor.position is not None:
                field = self.model._meta.get_field(self.ordering[0].lstrip("-"))
                value = field.to_python(cursor.position)
                if isinstance(value, datetime):
                    value.astimezone(UTC)  # overflows if no database could hold it
        except (exceptions.NotFound, ValidationError, ValueError, OverflowError):
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                "Invalid cursor: pass back the 'next' or 'previous' link of a page unchanged.",
                param="cursor",
            ) from None
        return cursor


class ScopeRefused(errors.SluiceError, exceptions.PermissionDenied):
    """A key without the scope an operation needs.

    A SluiceError, so the handler renders its code; also a DRF APIException, because DRF
    (the browsable API, schema generators) asks permission classes "may I?" and expects
    only APIExceptions back.
    """


class JsonOnlyNegotiation(DefaultContentNegotiation):
    """DRF's negotiation, but an unknown ?format= is a 406 saying so, not a bare 404."""

    def filter_renderers(self, renderers, format):
        found = [renderer for renderer in renderers if renderer.format == format]
        if not found:
            raise exceptions.NotAcceptable(
                f"There is no format {format!r}; the management API answers in JSON."
            )
        return found


class ApiKeyScopes(permissions.BasePermission):
    """A request made with an API key needs manage.read to read and manage.write to change."""

    message = "This API key lacks the scope this operation needs."

    def has_permission(self, request: Request, view: APIView) -> bool:
        key = getattr(request, "auth", None)
        if key is None or not hasattr(key, "scopes"):
            return True
        needed = (
            Scope.MANAGE_READ if request.method in permissions.SAFE_METHODS else Scope.MANAGE_WRITE
        )
        if needed == Scope.MANAGE_READ and key.has_scope(Scope.MANAGE_WRITE):
            return True
        if not key.has_scope(needed):
            raise ScopeRefused(
                errors.INSUFFICIENT_SCOPE,
                f"This API key lacks the '{needed}' scope; issue a key with it for the "
                "management API.",
            )
        return True


class ManagementView(APIView):
    """Base for management views: authenticated, scope-checked, with an Actor and a tenant."""

    permission_classes = [permissions.IsAuthenticated, ApiKeyScopes]
    content_negotiation_class = JsonOnlyNegotiation
    # False where staff may act without naming a tenant: platform-wide things
    # (deployments) and lists that then span every tenant. self.tenant is None then.
    tenant_required = True

    pagination_class = Pagination

    def paginated(self, queryset, serializer_class) -> Response:
        """One page of queryset, serialized, with next/previous links."""
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(queryset, self.request, view=self)
        return paginator.get_paginated_response(serializer_class(page, many=True).data)

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        key = request.auth if hasattr(request.auth, "scopes") else None
        self.actor = Actor(user=request.user, key=key)
        self.tenant = resolve_tenant(request, self.actor, required=self.tenant_required)


def resolve_tenant(request: Request, actor: Actor, *, required: bool) -> Tenant | None:
    """The tenant a management request acts in.

    An API key acts in its own tenant. A console session names one with the
    X-Sluice-Tenant header or ?tenant=<slug>, or needs none if the user belongs to just one.
    Platform staff may name any tenant; a tenant the user cannot see is a 404.
    """
    if actor.key is not None:
        return actor.key.tenant
    slug = request.headers.get(TENANT_HEADER) or request.query_params.get("tenant")
    if slug:
        tenant = None
        # PostgreSQL cannot even compare text holding NUL, and no slug holds one.
        if "\x00" not in slug:
            tenant = Tenant.objects.select_related("plan").filter(slug=slug).first()
        if tenant is None or not (
            actor.is_staff or Membership.objects.filter(user=actor.user, tenant=tenant).exists()
        ):
            raise errors.SluiceError(errors.NOT_FOUND, f"No tenant '{slug}' that you belong to.")
        return tenant
    if actor.is_staff and not required:
        return None  # staff reading across every tenant
    memberships = list(
        Membership.objects.filter(user=actor.user).select_related("tenant__plan")[:2]
    )
    if len(memberships) == 1:
        return memberships[0].tenant
    if not memberships:
        if actor.is_staff:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                f"Name the tenant to act in with the {TENANT_HEADER} header or ?tenant=<slug>.",
                param="tenant",
            )
        raise errors.SluiceError(errors.PERMISSION_DENIED, "You do not belong to any tenant.")
    raise errors.SluiceError(
        errors.INVALID_REQUEST,
        f"You belong to several tenants; name one with the {TENANT_HEADER} header or "
        "?tenant=<slug>.",
        param="tenant",
    )
