"""Every error Sluice can return: its code, HTTP status, OpenAI error type and message.

Views raise :class:`SluiceError` (or let DRF raise its own exceptions); one handler renders
all of them in the OpenAI shape::

    {"error": {"message": ..., "type": ..., "code": ..., "param": ...}, "request_id": ...}

Codes are stable strings that clients may switch on. The ``type`` values follow OpenAI's,
so the official client maps statuses onto its exception classes (BadRequestError,
AuthenticationError, PermissionDeniedError, NotFoundError, ConflictError, RateLimitError,
InternalServerError).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypedDict

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    type: str
    message: str
    # Tell the openai client not to retry where waiting cannot help.
    retryable: bool | None = None


_CODES: dict[str, ErrorCode] = {}


def _code(code: str, status: int, type_: str, message: str, retryable: bool | None = None):
    entry = ErrorCode(code, status, type_, message, retryable)
    _CODES[code] = entry
    return entry


INVALID_REQUEST = _code("invalid_request", 400, "invalid_request_error", "The request is invalid.")
INVALID_JSON = _code("invalid_json", 400, "invalid_request_error", "The body is not valid JSON.")
UNKNOWN_FIELD = _code("unknown_field", 400, "invalid_request_error", "Unknown field.")
UNSUPPORTED_PARAMETER = _code(
    "unsupported_parameter", 400, "invalid_request_error", "This parameter is not supported."
)
CONTEXT_LENGTH_EXCEEDED = _code(
    "context_length_exceeded", 400, "invalid_request_error", "The input is too long."
)
INVALID_SCHEMA = _code(
    "invalid_schema", 400, "invalid_request_error", "The JSON Schema is itself invalid."
)
NOT_AUTHENTICATED = _code(
    "not_authenticated",
    401,
    "authentication_error",
    "Authentication required: send 'Authorization: Bearer sk-sluice-...' or log in.",
)
INVALID_API_KEY = _code(
    "invalid_api_key", 401, "authentication_error", "The API key is invalid.", retryable=False
)
PERMISSION_DENIED = _code(
    "permission_denied",
    403,
    "permission_error",
    "You do not have permission to do this.",
    retryable=False,
)
INSUFFICIENT_SCOPE = _code(
    "insufficient_scope",
    403,
    "permission_error",
    "This API key lacks the scope this operation needs.",
    retryable=False,
)
ACCESS_NOT_APPROVED = _code(
    "access_not_approved",
    403,
    "permission_error",
    "Your tenant has no approved subscription to this resource.",
    retryable=False,
)
TENANT_SUSPENDED = _code(
    "tenant_suspended", 403, "permission_error", "This tenant is suspended.", retryable=False
)
NOT_FOUND = _code("not_found", 404, "not_found_error", "Not found.")
MODEL_NOT_FOUND = _code("model_not_found", 404, "not_found_error", "The model does not exist.")
METHOD_NOT_ALLOWED = _code(
    "method_not_allowed", 405, "invalid_request_error", "Method not allowed."
)
NOT_ACCEPTABLE = _code("not_acceptable", 406, "invalid_request_error", "Not acceptable.")
CONFLICT = _code("conflict", 409, "conflict_error", "The request conflicts with current state.")
INVALID_TRANSITION = _code(
    "invalid_transition", 409, "conflict_error", "This transition is not allowed.", False
)
VERSION_PUBLISHED = _code(
    "version_published",
    409,
    "conflict_error",
    "Published prompt-API versions are immutable; add a new version instead.",
    retryable=False,
)
REQUEST_TOO_LARGE = _code(
    "request_too_large", 413, "invalid_request_error", "The request body is too large."
)
UNSUPPORTED_MEDIA_TYPE = _code(
    "unsupported_media_type",
    415,
    "invalid_request_error",
    "Send the body as JSON with 'Content-Type: application/json'.",
)
RATE_LIMITED = _code("rate_limited", 429, "rate_limit_error", "Rate limit exceeded.")
QUOTA_EXCEEDED = _code("quota_exceeded", 429, "insufficient_quota", "Token quota exceeded.")
INTERNAL_ERROR = _code("internal_error", 500, "server_error", "Internal server error.")
WORKER_ERROR = _code(
    "worker_error", 500, "server_error", "The model worker failed on this request."
)
WORKER_UNAVAILABLE = _code(
    "worker_unavailable",
    503,
    "server_error",
    "The model worker stopped before finishing this request; nothing was charged. Retry.",
)
INVALID_MODEL_OUTPUT = _code(
    "invalid_model_output",
    502,
    "server_error",
    "The model's answer did not match the prompt-API's output schema.",
)
BROKER_UNAVAILABLE = _code(
    "broker_unavailable", 503, "server_error", "The work queue cannot be reached; retry later."
)
QUEUE_FULL = _code(
    "queue_full", 503, "server_overloaded", "The deployment is at capacity; retry later."
)
UPSTREAM_UNAVAILABLE = _code(
    "upstream_unavailable", 503, "server_error", "The upstream model server is unavailable."
)
DEADLINE_EXCEEDED = _code(
    "deadline_exceeded", 504, "timeout", "The request did not finish before its deadline."
)


def all_codes() -> dict[str, ErrorCode]:
    return dict(_CODES)


class ErrorBody(TypedDict):
    message: str
    type: str
    code: str
    param: str | None


class SluiceError(Exception):
    """An error with a stable code; rendered by :func:`exception_handler`."""

    def __init__(
        self,
        error: ErrorCode,
        message: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        details: Any = None,
    ) -> None:
        self.error = error
        self.message = message or error.message
        self.param = param
        self.headers = dict(headers or {})
        self.details = details
        super().__init__(self.message)


def error_payload(
    error: ErrorCode,
    message: str | None = None,
    *,
    param: str | None = None,
    request_id: str | None = None,
    details: Any = None,
) -> dict[str, Any]:
    body: ErrorBody = {
        "message": message or error.message,
        "type": error.type,
        "code": error.code,
        "param": param,
    }
    payload: dict[str, Any] = {"error": body, "request_id": request_id}
    if details is not None:
        payload["error"]["details"] = details
    return payload


def error_headers(error: ErrorCode, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if error.retryable is False:
        headers.setdefault("x-should-retry", "false")
    return headers


def json_error(
    request: HttpRequest | None,
    error: ErrorCode,
    message: str | None = None,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    details: Any = None,
) -> JsonResponse:
    """A plain Django JsonResponse in the error shape, for code outside DRF views."""
    request_id = getattr(request, "request_id", None)
    response = JsonResponse(
        error_payload(error, message, param=param, request_id=request_id, details=details),
        status=error.status,
    )
    for name, value in error_headers(error, headers).items():
        response[name] = value
    return response


def _first_validation_error(detail: Any, path: str = "") -> tuple[str | None, str]:
    """Find the first (param, message) in a DRF ValidationError detail tree."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                name = path
            elif isinstance(key, int):  # DRF keys a list's errors by index
                name = f"{path}[{key}]"
            else:
                name = f"{path}.{key}" if path else str(key)
            return _first_validation_error(value, name)
    if isinstance(detail, list) and detail:
        if all(isinstance(item, str) for item in detail):
            return path or None, str(detail[0])
        for index, item in enumerate(detail):
            if item:
                return _first_validation_error(item, f"{path}[{index}]" if path else f"[{index}]")
    return path or None, str(detail)


def _from_drf(exc: drf.APIException) -> SluiceError:
    if isinstance(exc, drf.ValidationError):
        param, message = _first_validation_error(exc.detail)
        codes = exc.get_codes()
        first_code = _first_validation_error(codes)[1] if codes else ""
        error = UNKNOWN_FIELD if first_code == "unknown_field" else INVALID_REQUEST
        text = f"{param}: {message}" if param else message
        return SluiceError(error, text, param=param, details=exc.detail)
    if isinstance(exc, drf.ParseError):
        return SluiceError(INVALID_JSON, f"The body is not valid JSON: {exc.detail}")
    if isinstance(exc, drf.AuthenticationFailed):
        return SluiceError(INVALID_API_KEY, str(exc.detail))
    if isinstance(exc, drf.NotAuthenticated):
        return SluiceError(NOT_AUTHENTICATED)
    if isinstance(exc, drf.PermissionDenied):
        message = str(exc.detail)
        default = str(drf.PermissionDenied.default_detail)
        return SluiceError(PERMISSION_DENIED, None if message == default else message)
    if isinstance(exc, drf.NotFound):
        return SluiceError(NOT_FOUND)
    if isinstance(exc, drf.MethodNotAllowed):
        return SluiceError(METHOD_NOT_ALLOWED, str(exc.detail))
    if isinstance(exc, drf.NotAcceptable):
        return SluiceError(NOT_ACCEPTABLE, str(exc.detail))
    if isinstance(exc, drf.UnsupportedMediaType):
        return SluiceError(UNSUPPORTED_MEDIA_TYPE, f"{exc.detail} {UNSUPPORTED_MEDIA_TYPE.message}")
    if isinstance(exc, drf.Throttled):
        headers = {"Retry-After": str(int(exc.wait or 1))}
        return SluiceError(RATE_LIMITED, str(exc.detail), headers=headers)
    return SluiceError(INTERNAL_ERROR, str(exc.detail))


def to_sluice_error(exc: Exception) -> SluiceError | None:
    from django_ratelimit.exceptions import Ratelimited

    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, Ratelimited):
        return SluiceError(
            RATE_LIMITED,
            "Too many attempts; wait a minute and try again.",
            headers={"Retry-After": "60"},
        )
    if isinstance(exc, Http404):
        return SluiceError(NOT_FOUND)
    if isinstance(exc, RequestDataTooBig):
        return SluiceError(REQUEST_TOO_LARGE)
    if isinstance(exc, DjangoPermissionDenied):
        return SluiceError(PERMISSION_DENIED)
    if isinstance(exc, drf.APIException):
        return _from_drf(exc)
    return None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: render every known exception in the error shape."""
    error = to_sluice_error(exc)
    if error is None:
        return None  # let Django's 500 handler log it and answer in JSON (sluice.urls)
    request = context.get("request")
    response = Response(
        error_payload(
            error.error,
            error.message,
            param=error.param,
            request_id=getattr(request, "request_id", None),
            details=error.details,
        ),
        status=error.error.status,
    )
    for name, value in error_headers(error.error, error.headers).items():
        response[name] = value
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        response["WWW-Authenticate"] = auth_header
    from rest_framework.views import set_rollback  # here: rest_framework.views imports us

    set_rollback()
    return response


def ratelimited_view(request: HttpRequest, exception: Exception):
    """django-ratelimit's RATELIMIT_VIEW: a 429, never the 403 it would otherwise be."""
    from django.shortcuts import render

    from sluice.middleware import is_api_path

    message = "Too many attempts; wait a minute and try again."
    if not is_api_path(request.path):
        response = render(request, "429.html", {"message": message}, status=429)
        response["Retry-After"] = "60"
        return response
    return json_error(request, RATE_LIMITED, message, headers={"Retry-After": "60"})
