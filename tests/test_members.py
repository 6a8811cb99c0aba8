"""Members: invitations, role changes and removal, with the owner rules."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.core import mail

from tenants.models import AuditEvent, Membership
from tests.support import assert_error

pytestmark = pytest.mark.django_db


def membership(tenant, user):
    return Membership.objects.get(tenant=tenant, user=user)


class TestInvitations:
    def test_an_admin_invites_a_newcomer_who_gets_a_password_link(
        self, api, alpha, alice, django_capture_on_commit_callbacks
    ):
        with django_capture_on_commit_callbacks(execute=True):
            response = api.as_user(alice).post(
                "/api/members/", {"email": "Dana@Example.com", "role": "member"}, format="json"
            )
        assert response.status_code == 201, response.content
        assert response.json()["email"] == "dana@example.com"
        dana = get_user_model().objects.get(email="dana@example.com")
        assert not dana.has_usable_password()
        assert len(mail.outbox) == 1
        assert re.search(r"/invite/[^/]+/[^/]+/", mail.outbox[0].body)
        assert AuditEvent.objects.filter(action="member.invite", tenant=alpha).exists()

    def test_inviting_an_existing_member_is_a_conflict(self, api, alpha, alice, bob):
        response = api.as_user(alice).post("/api/members/", {"email": bob.email}, format="json")
        assert_error(response, 409, "conflict")

    def test_a_member_cannot_invite(self, api, alpha, bob):
        response = api.as_user(bob).post("/api/members/", {"email": "x@example.com"}, format="json")
        assert_error(response, 403, "permission_denied")

    def test_only_owners_grant_the_owner_role(self, api, alpha, alice, bob):
        membership(alpha, bob).__class__.objects.filter(tenant=alpha, user=bob).update(role="admin")
        response = api.as_user(bob).post(
            "/api/members/", {"email": "x@example.com", "role": "owner"}, format="json"
        )
        assert_error(response, 403, "permission_denied")


class TestRoles:
    def test_an_admin_changes_a_role(self, api, alpha, alice, bob):
        target = membership(alpha, bob)
        response = api.as_user(alice).patch(
            f"/api/members/{target.pk}/", {"role": "viewer"}, format="json"
        )
        assert response.json()["role"] == "viewer"
        event = AuditEvent.objects.get(action="member.change_role")
        assert (event.before, event.after) == ({"role": "member"}, {"role": "viewer"})

    def test_the_last_owner_cannot_step_down_or_leave(self, api, alpha, alice):
        own = membership(alpha, alice)
        response = api.as_user(alice).patch(
            f"/api/members/{own.pk}/", {"role": "admin"}, format="json"
        )
        assert "at least one owner" in assert_error(response, 409, "conflict")["message"]
        assert_error(api.as_user(alice).delete(f"/api/members/{own.pk}/"), 409, "conflict")
        assert membership(alpha, alice).role == "owner"

    def test_anyone_may_leave_but_only_admins_remove_others(self, api, alpha, bob, vera):
        assert_error(
            api.as_user(bob).delete(f"/api/members/{membership(alpha, vera).pk}/"),
            403,
            "permission_denied",
        )
        assert (
            api.as_user(bob).delete(f"/api/members/{membership(alpha, bob).pk}/").status_code == 204
        )
        assert not Membership.objects.filter(tenant=alpha, user=bob).exists()

    def test_an_unknown_role_is_refused(self, api, alpha, alice, bob):
        response = api.as_user(alice).patch(
            f"/api/members/{membership(alpha, bob).pk}/", {"role": "emperor"}, format="json"
        )
        assert assert_error(response, 400, "invalid_request")["param"] == "role"
