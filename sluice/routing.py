"""WebSocket routes; the live dashboards add theirs here."""

from __future__ import annotations

websocket_urlpatterns: list = []
