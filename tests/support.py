"""Assertions shared by the API tests."""

from __future__ import annotations


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The response is an error in Sluice's shape with this status (and code)."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    body = response.json()
    assert set(body) >= {"error", "request_id"}, body
    error = body["error"]
    assert {"message", "type", "code", "param"} <= set(error), error
    assert error["message"], error
    assert body["request_id"] == response["X-Request-ID"]
    if code is not None:
        assert error["code"] == code, error
    return error
