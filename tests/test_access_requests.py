"""The access-request workflow: legal transitions only, each audited, approval applies."""

from __future__ import annotations

import pytest

from gateway import services as gateway_services
from gateway.models import PromptApi
from tenants import services
from tenants.models import AccessRequest, AuditEvent, Subscription
from tests.conftest import actor
from tests.support import assert_error

pytestmark = pytest.mark.django_db


def file_subscription(api, user, deployment):
    response = api.as_user(user).post(
        "/api/access-requests/",
        {
            "kind": "subscribe_deployment",
            "deployment": deployment.slug,
            "justification": "prototype",
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()


class TestSubscribing:
    def test_a_member_requests_and_an_admin_approves(self, api, alpha, bob, alice, chat_deployment):
        filed = file_subscription(api, bob, chat_deployment)
        assert filed["state"] == "pending"
        assert filed["requester"] == "bob"
        assert not Subscription.objects.filter(tenant=alpha).exists()

        approved = (
            api.as_user(alice)
            .post(f"/api/access-requests/{filed['id']}/approve/", {"note": "ok"}, format="json")
            .json()
        )
        assert approved["state"] == "approved"
        assert approved["reviewer"] == "alice"
        assert approved["decided_at"]
        subscription = Subscription.objects.get(tenant=alpha, deployment=chat_deployment)
        assert subscription.access_request_id == filed["id"]
        actions = list(
            AuditEvent.objects.filter(tenant=alpha).order_by("id").values_list("action", flat=True)
        )
        assert actions[-3:] == [
            "access_request.create",
            "access_request.approve",
            "subscription.create",
        ]

    def test_an_admins_own_request_is_approved_at_once_where_admins_review(
        self, api, alpha, alice, chat_deployment
    ):
        filed = file_subscription(api, alice, chat_deployment)
        assert filed["state"] == "approved"
        assert "automatically" in filed["review_note"]
        assert Subscription.objects.filter(tenant=alpha, deployment=chat_deployment).exists()

    def test_when_the_plan_needs_platform_approval_only_staff_review(
        self, api, alpha, bob, alice, root, chat_deployment
    ):
        alpha.plan.requires_platform_approval = True
        alpha.plan.save(update_fields=["requires_platform_approval"])
        filed = file_subscription(api, alice, chat_deployment)
        assert filed["state"] == "pending"  # the owner cannot approve on this plan
        response = api.as_user(alice).post(f"/api/access-requests/{filed['id']}/approve/")
        assert "platform staff" in assert_error(response, 403, "permission_denied")["message"]
        queue = api.as_user(root).get("/api/access-requests/?state=pending").json()
        assert [row["id"] for row in queue["results"]] == [filed["id"]]
        approved = api.as_user(root).post(f"/api/access-requests/{filed['id']}/approve/")
        assert approved.json()["state"] == "approved"

    def test_nobody_reviews_their_own_request(self, api, alpha, bob, chat_deployment):
        filed = file_subscription(api, bob, chat_deployment)
        response = api.as_user(bob).post(f"/api/access-requests/{filed['id']}/approve/")
        assert_error(response, 403, "permission_denied")

    def test_a_second_identical_request_is_a_conflict(self, api, alpha, bob, chat_deployment):
        file_subscription(api, bob, chat_deployment)
        response = api.as_user(bob).post(
            "/api/access-requests/",
            {"kind": "subscribe_deployment", "deployment": chat_deployment.slug},
            format="json",
        )
        assert "pending" in assert_error(response, 409, "conflict")["message"]

    def test_a_viewer_cannot_request(self, api, alpha, vera, chat_deployment):
        response = api.as_user(vera).post(
            "/api/access-requests/",
            {"kind": "subscribe_deployment", "deployment": chat_deployment.slug},
            format="json",
        )
        assert_error(response, 403, "permission_denied")


class TestTransitions:
    @pytest.fixture
    def pending(self, api, alpha, bob, chat_deployment):
        return file_subscription(api, bob, chat_deployment)

    def test_approving_a_rejected_request_is_409_with_a_clear_message(self, api, alice, pending):
        client = api.as_user(alice)
        rejected = client.post(
            f"/api/access-requests/{pending['id']}/reject/", {"note": "no budget"}, format="json"
        ).json()
        assert rejected["state"] == "rejected"
        events_before = AuditEvent.objects.count()

        error = assert_error(
            client.post(f"/api/access-requests/{pending['id']}/approve/"),
            409,
            "invalid_transition",
        )
        assert error["message"] == (
            "This request is already rejected; only pending requests can be approved."
        )
        assert AccessRequest.objects.get(pk=pending["id"]).state == "rejected"
        assert AuditEvent.objects.count() == events_before
        assert not Subscription.objects.exists()

    @pytest.mark.parametrize(
        ("first", "then"),
        [
            ("approve", "approve"),
            ("approve", "reject"),
            ("approve", "withdraw"),
            ("reject", "reject"),
            ("reject", "withdraw"),
            ("withdraw", "approve"),
            ("withdraw", "reject"),
            ("withdraw", "withdraw"),
        ],
    )
    def test_only_pending_requests_move(self, api, alice, bob, pending, first, then):
        who = {"approve": alice, "reject": alice, "withdraw": bob}
        assert (
            api.as_user(who[first])
            .post(f"/api/access-requests/{pending['id']}/{first}/")
            .status_code
            == 200
        )
        assert_error(
            api.as_user(who[then]).post(f"/api/access-requests/{pending['id']}/{then}/"),
            409,
            "invalid_transition",
        )

    def test_each_transition_writes_one_audit_row_with_before_and_after(
        self, api, bob, alpha, pending
    ):
        api.as_user(bob).post(f"/api/access-requests/{pending['id']}/withdraw/")
        event = AuditEvent.objects.get(action="access_request.withdraw")
        assert (event.actor, event.tenant) == (bob, alpha)
        assert event.before == {"state": "pending"}
        assert event.after == {"state": "withdrawn"}
        assert event.target_id == str(pending["id"])

    def test_only_the_requester_withdraws(self, api, alice, pending):
        response = api.as_user(alice).post(f"/api/access-requests/{pending['id']}/withdraw/")
        assert_error(response, 403, "permission_denied")


class TestQuotaAndPublication:
    def test_a_quota_request_needs_staff_and_raises_the_limit(self, api, alpha, alice, root):
        response = api.as_user(alice).post(
            "/api/access-requests/",
            {"kind": "raise_quota", "quota": {"monthly_token_budget": 9_000_000}},
            format="json",
        )
        filed = response.json()
        assert filed["state"] == "pending"  # even an owner cannot raise their own quota
        assert_error(
            api.as_user(alice).post(f"/api/access-requests/{filed['id']}/approve/"),
            403,
            "permission_denied",
        )
        api.as_user(root).post(f"/api/access-requests/{filed['id']}/approve/")
        alpha.refresh_from_db()
        assert alpha.limits().monthly_token_budget == 9_000_000
        assert alpha.limits().requests_per_minute == alpha.plan.requests_per_minute
        assert AuditEvent.objects.filter(action="quota.raise", tenant=alpha).exists()

    @pytest.mark.parametrize(
        ("quota", "param"),
        [
            ({}, "quota"),
            ({"gpu_hours": 5}, "quota.gpu_hours"),
            ({"monthly_token_budget": 10}, "quota.monthly_token_budget"),
        ],
    )
    def test_a_bad_quota_request_is_refused(self, api, alpha, alice, quota, param):
        response = api.as_user(alice).post(
            "/api/access-requests/", {"kind": "raise_quota", "quota": quota}, format="json"
        )
        assert assert_error(response, 400)["param"] == param

    def test_publishing_by_request_freezes_the_version(
        self, api, alpha, alice, bob, chat_deployment
    ):
        services.access_request_approve(
            access_request=services.access_request_create(
                tenant=alpha,
                kind="subscribe_deployment",
                deployment=chat_deployment,
                actor=actor(bob),
            ),
            actor=actor(alice),
        )
        prompt_api = gateway_services.prompt_api_create(
            tenant=alpha, slug="greet", name="Greet", actor=actor(bob)
        )
        version = gateway_services.prompt_api_version_create(
            prompt_api=prompt_api,
            actor=actor(bob),
            deployment=chat_deployment,
            messages=[{"role": "user", "content": "Say hi to {{name}}"}],
            input_schema={"type": "object", "properties": {"name": {"type": "string"}}},
        )
        filed = (
            api.as_user(bob)
            .post(
                "/api/access-requests/",
                {"kind": "publish_version", "prompt_api": "greet", "version": 1},
                format="json",
            )
            .json()
        )
        assert filed["state"] == "pending"
        api.as_user(alice).post(f"/api/access-requests/{filed['id']}/approve/")
        version.refresh_from_db()
        assert version.is_published
        assert PromptApi.objects.get(slug="greet").active_version == version
