"""The call-log API: read-only, tenant-scoped, filtered and cursor-paginated."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from django.utils import timezone

from analytics.models import CallLog
from tenants import services
from tests.conftest import actor
from tests.support import assert_error

pytestmark = pytest.mark.django_db


@pytest.fixture
def logs(alpha, beta, alice, charlie, chat_deployment, embedding_deployment):
    key, _ = services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
    other_key, _ = services.api_key_issue(tenant=alpha, name="k2", actor=actor(alice))
    now = timezone.now()
    rows = []
    for index in range(30):
        rows.append(
            CallLog(
                request_id=f"req_{index}",
                tenant=alpha,
                api_key=key if index % 2 else other_key,
                deployment=chat_deployment if index % 3 else embedding_deployment,
                endpoint="chat.completions",
                status_code=[200, 429, 503][index % 3],
                error_code=["", "rate_limited", "queue_full"][index % 3],
                prompt_tokens=10,
                completion_tokens=5,
                total_ms=12.5,
                created_at=now - timedelta(minutes=index),
            )
        )
    rows.append(
        CallLog(request_id="req_beta", tenant=beta, status_code=200, total_ms=1, created_at=now)
    )
    CallLog.objects.bulk_create(rows)
    return {"key": key, "now": now}


def test_it_pages_newest_first_without_repeats(api, logs, vera):
    client = api.as_user(vera)
    seen = []
    url = "/api/call-logs/?page_size=7"
    while url:
        page = client.get(url).json()
        seen += [row["request_id"] for row in page["results"]]
        url = page["next"]
    assert seen == [f"req_{index}" for index in range(30)]


def test_it_filters_by_status_key_deployment_and_time(api, logs, alice, chat_deployment):
    client = api.as_user(alice)

    def ids(query: str) -> set[str]:
        return {
            row["request_id"] for row in client.get(f"/api/call-logs/?{query}").json()["results"]
        }

    assert ids("status=503") == {f"req_{i}" for i in range(30) if i % 3 == 2}
    assert ids("status_class=4xx") == {f"req_{i}" for i in range(30) if i % 3 == 1}
    assert ids("error_code=queue_full") == ids("status=503")
    assert ids(f"key={logs['key'].pk}") == {f"req_{i}" for i in range(30) if i % 2}
    assert ids(f"deployment={chat_deployment.slug}") == {f"req_{i}" for i in range(30) if i % 3}
    since = (logs["now"] - timedelta(minutes=4, seconds=30)).isoformat()
    assert ids(f"since={since.replace('+', '%2B')}") == {f"req_{i}" for i in range(5)}


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("status=abc", "status"),
        ("since=yesterday", "since"),
        ("status_class=3xx", "status_class"),
        ("colour=blue", "colour"),
    ],
)
def test_bad_filters_are_a_400(api, logs, alice, query, param):
    response = api.as_user(alice).get(f"/api/call-logs/?{query}")
    assert assert_error(response, 400)["param"] == param


def test_staff_see_every_tenant(api, logs, root):
    assert len(api.as_user(root).get("/api/call-logs/?page_size=100").json()["results"]) == 31


def test_call_logs_are_read_only(api, logs, alice):
    assert_error(api.as_user(alice).post("/api/call-logs/", {}, format="json"), 405)


@pytest.mark.parametrize(
    "decoded",
    [
        "p=garbage",
        "p=\x00",
        "p=0001-01-01T00:00:00+05:00",  # before the first instant a datetime can hold
        "o=many",
    ],
)
def test_a_cursor_it_did_not_issue_is_a_400(api, logs, alice, decoded):
    cursor = base64.b64encode(decoded.encode()).decode()
    response = api.as_user(alice).get("/api/call-logs/", {"cursor": cursor})
    error = assert_error(response, 400, "invalid_request")
    assert error["param"] == "cursor"
    assert "Invalid cursor" in error["message"]
