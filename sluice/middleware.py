"""Request id and body-size middleware; both async-capable so the hot path stays async."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from sluice import errors

current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)
# Where Django itself reports a refused Host header.
host_logger = logging.getLogger("django.security.DisallowedHost")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
API_PREFIXES = ("/api/", "/v1/")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES)


class RequestIdMiddleware:
    """Give every request an id (the client's X-Request-ID if sane) and echo it back.

    Also refuses bodies larger than MAX_REQUEST_BODY_BYTES with 413 before anything reads
    them, so an oversize upload never reaches a parser.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _before(self, request: HttpRequest) -> HttpResponse | None:
        incoming = request.headers.get("X-Request-ID", "")
        request.request_id = incoming if _CLIENT_ID.match(incoming) else new_request_id()
        current_request_id.set(request.request_id)
        # ALLOWED_HOSTS is enforced when the host is first read (CommonMiddleware does it
        # for the console); the data plane runs without it, so read it here. Left to
        # Django, a refusal is logged as an ERROR with a traceback: it is a client's (or a
        # scanner's) mistake, worth one line.
        try:
            request.get_host()
        except DisallowedHost as exc:
            host_logger.warning("%s", exc)
            return errors.json_error(
                request, errors.INVALID_REQUEST, "This server does not answer to that Host."
            )
        if "\x00" in request.path or "%00" in request.META.get("QUERY_STRING", ""):
            # No name, slug or filter holds a NUL, and PostgreSQL refuses one in a query.
            message = "The URL contains a NUL character (%00)."
            if is_api_path(request.path):
                return errors.json_error(request, errors.INVALID_REQUEST, message)
            return HttpResponseBadRequest(message, content_type="text/plain")
        length = request.headers.get("Content-Length", "")
        if not length and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            # A chunked body has no length up front; Django has read it whole by now. DRF
            # reads no body without CONTENT_LENGTH, so give it the real one.
            try:
                length = str(len(request.body))
            except RequestDataTooBig:
                length = str(settings.MAX_REQUEST_BODY_BYTES + 1)
            request.META["CONTENT_LENGTH"] = length
        if length.isdigit() and int(length) > settings.MAX_REQUEST_BODY_BYTES:
            message = (
                f"The request body is over the limit of {settings.MAX_REQUEST_BODY_BYTES:,} bytes."
                if request.headers.get("Transfer-Encoding")
                else f"The request body is {int(length):,} bytes; the limit is "
                f"{settings.MAX_REQUEST_BODY_BYTES:,} bytes."
            )
            return errors.json_error(request, errors.REQUEST_TOO_LARGE, message)
        return None

    @staticmethod
    def _after(request: HttpRequest, response: HttpResponse) -> HttpResponse:
        response["X-Request-ID"] = request.request_id
        # SecurityMiddleware sets it elsewhere; the data plane runs without that one.
        response.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self._acall(request)
        refused = self._before(request)
        return self._after(request, refused or self.get_response(request))

    async def _acall(self, request: HttpRequest):
        refused = self._before(request)
        return self._after(request, refused or await self.get_response(request))
