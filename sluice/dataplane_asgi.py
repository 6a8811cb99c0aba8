"""A Django ASGI handler for the /v1 data plane, with its own short middleware list.

Django's usual middleware (sessions, CSRF, auth, messages, ...) is synchronous: under
ASGI each one hops to a thread and back on every request, about a dozen hops per
request. The data plane uses none of them (API keys, no cookies, no templates), and
measured with bench/overhead.py they were most of the gateway's CPU per request and of
a refusal's latency. This handler is the same Django, URLconf and views; only the
middleware list differs (settings.DATA_PLANE_MIDDLEWARE).

It also runs requests without Django's ThreadSensitiveContext, which starts a thread per
request (for request_started/finished and response.close) so that a view's synchronous
database work stays on one thread. The data plane does no database work per request:
the catalog loads rows in a thread pool of its own and closes its connections itself
(gateway/catalog.py), so the signals' few microseconds of work share one thread, and a
slow database can only delay the requests that wait for a catalog load.
"""

from __future__ import annotations

from django.conf import settings
from django.core.handlers.asgi import ASGIHandler


class DataPlaneHandler(ASGIHandler):
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"The data plane serves HTTP only, not {scope['type']}.")
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        # BaseHandler.load_middleware reads settings.MIDDLEWARE; give it ours while it
        # builds the chain. This runs once, at start-up, before any request.
        everyone = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.DATA_PLANE_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = everyone


def route(data_plane, everything_else, prefix: str = "/v1/"):
    """An ASGI app sending HTTP requests under `prefix` to `data_plane`."""

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(prefix):
            return await data_plane(scope, receive, send)
        return await everything_else(scope, receive, send)

    return app
