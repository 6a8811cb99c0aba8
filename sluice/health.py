"""Liveness and readiness for load balancers: /healthz answers whether this process can
reach PostgreSQL and Redis, in milliseconds, without authentication."""

from __future__ import annotations

import time

import redis
from django.db import connection
from django.db.utils import Error as DatabaseError
from django.http import HttpRequest, JsonResponse

from sluice.redisconn import get_redis


def healthz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, dict[str, object]] = {}
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["postgres"] = {"ok": True}
    except DatabaseError as exc:
        checks["postgres"] = {"ok": False, "error": exc.__class__.__name__}
    middle = time.perf_counter()
    checks["postgres"]["ms"] = round((middle - started) * 1000, 2)
    try:
        get_redis().ping()
        checks["redis"] = {"ok": True}
    except redis.RedisError as exc:
        checks["redis"] = {"ok": False, "error": exc.__class__.__name__}
    checks["redis"]["ms"] = round((time.perf_counter() - middle) * 1000, 2)
    healthy = all(check["ok"] for check in checks.values())
    return JsonResponse({"ok": healthy, "checks": checks}, status=200 if healthy else 503)
