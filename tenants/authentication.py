"""API-key authentication for the management API (the /v1 data plane has its own path)."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from .models import KEY_PREFIX, ApiKey

# last_used_at is a hint for humans; writing it more often than this is wasted I/O.
LAST_USED_GRANULARITY = timedelta(minutes=1)


def bearer_token(request) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer sk-sluice-...`; the request acts as the key's creator."""

    def authenticate(self, request: Request):
        raw = bearer_token(request)
        if raw is None:
            return None
        if not raw.startswith(KEY_PREFIX):
            raise exceptions.AuthenticationFailed(
                f"That is not a Sluice API key; keys start with '{KEY_PREFIX}'."
            )
        key = ApiKey.objects.verify(raw)
        if key is None:
            raise exceptions.AuthenticationFailed("The API key is invalid.")
        refusal = key.refusal()
        if refusal is not None:
            raise refusal
        user = key.created_by
        if user is None or not user.is_active:
            raise exceptions.AuthenticationFailed(
                "The person who created this key no longer has an active account."
            )
        now = timezone.now()
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_GRANULARITY:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return user, key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="sluice"'


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Tells the OpenAPI schema (and Swagger UI's Authorize button) how keys are sent."""

    target_class = ApiKeyAuthentication
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "sk-sluice-<prefix>_<secret><checksum>",
            "description": "An API key with the manage.read or manage.write scope.",
        }
