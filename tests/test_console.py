"""The tenant console: sign-in, the tenant switcher, and every page a tenant's people use.

Personas (tests/conftest.py): alice owns alpha, bob is a member there, vera a viewer;
charlie owns beta and is an outsider to alpha; root is platform staff.
"""

from __future__ import annotations

import html
import io
import re
import time
import zlib
from datetime import timedelta

import pytest
from django.core import mail
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from analytics.models import CallLog
from gateway import services as gateway_services
from gateway.models import PromptApi, PromptApiVersion
from tenants import services
from tenants.models import AccessRequest, ApiKey, AuditEvent, Membership, Role, Subscription
from tenants.policy import SYSTEM
from tests.conftest import actor

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery"

MESSAGES = [{"role": "user", "content": "Summarize: {{text}}"}]
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def _fresh(prefix: str, count: int = 250) -> str:
    """A rate-limit key value whose 60 s window has at least 20 s left.

    django-ratelimit staggers each key's window by crc32(value) % 60; picking a value whose
    window ends well after now keeps eleven quick requests inside one window, so the test
    never straddles a boundary.
    """
    now = int(time.time())
    for index in range(1, count):
        value = f"{prefix}{index}"
        end = now - now % 60 + zlib.crc32(value.encode()) % 60
        if end < now:
            end += 60
        if end - now >= 20:
            return value
    raise AssertionError("no rate-limit window with time left")  # pragma: no cover


_addresses = iter(range(1, 250))


def _address() -> str:
    """A client address of its own, so one test's logins never count against another's."""
    return f"10.1.{next(_addresses)}.1"


def _text(response) -> str:
    """The page as a person reads it: entities such as ' turned back into characters."""
    return html.unescape(response.content.decode())


def _key_page_text(client) -> str:
    return _text(client.get(reverse("console:keys") + "?status=all"))


# --- signing in ---------------------------------------------------------------------------


class TestLogin:
    def test_it_sends_anonymous_visitors_to_the_login_page(self, client, alpha):
        response = client.get(reverse("console:keys"))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("console:login"))
        assert "next=/keys/" in response["Location"]

    def test_it_signs_in_and_lands_on_the_overview(self, client, alpha, alice):
        page = client.get(reverse("console:login"))
        assert page.status_code == 200
        assert "Sign in to Sluice" in _text(page)
        response = client.post(
            reverse("console:login"),
            {"username": "alice", "password": PASSWORD},
            REMOTE_ADDR=_address(),
            follow=True,
        )
        assert response.redirect_chain[-1][0] == reverse("console:home")
        assert "Alpha" in _text(response)

    def test_it_refuses_a_wrong_password_in_the_form(self, client, alpha, alice):
        response = client.post(
            reverse("console:login"),
            {"username": "alice", "password": "nope"},
            REMOTE_ADDR=_address(),
        )
        assert response.status_code == 200
        assert "correct username and password" in _text(response)
        assert "_auth_user_id" not in client.session

    def test_it_answers_the_eleventh_bad_login_from_one_address_with_429(self, client, alice):
        address = _fresh("10.77.0.")
        username = _fresh("nobody-")
        statuses = [
            client.post(
                reverse("console:login"),
                {"username": username, "password": f"guess {attempt}"},
                REMOTE_ADDR=address,
            ).status_code
            for attempt in range(11)
        ]
        assert statuses[:10] == [200] * 10
        assert statuses[10] == 429
        blocked = client.post(
            reverse("console:login"),
            {"username": "alice", "password": PASSWORD},
            REMOTE_ADDR=address,
        )
        assert blocked.status_code == 429, "a right password does not lift the limit"
        assert blocked["Retry-After"] == "60"
        assert "Too many attempts" in _text(blocked)
        assert "_auth_user_id" not in client.session

    def test_it_limits_guesses_at_one_username_from_many_addresses(self, client, alice):
        username = _fresh("target-")
        statuses = [
            client.post(
                reverse("console:login"),
                {"username": username, "password": "guess"},
                REMOTE_ADDR=f"10.88.{attempt}.1",
            ).status_code
            for attempt in range(11)
        ]
        assert statuses[-1] == 429
        assert statuses[:10] == [200] * 10

    def test_it_signs_out_with_a_post(self, client, alpha, alice):
        client.force_login(alice)
        response = client.post(reverse("console:logout"))
        assert response.status_code == 302
        assert client.get(reverse("console:home")).status_code == 302

    def test_every_form_is_csrf_protected(self, alpha, alice):
        strict = Client(enforce_csrf_checks=True)
        strict.force_login(alice)
        response = strict.post(reverse("console:key_create"), {"name": "x", "scopes": "inference"})
        assert response.status_code == 403
        assert not ApiKey.objects.exists()
        assert "This form expired" in _text(response)


class TestInvitation:
    def test_it_invites_by_email_and_the_link_sets_a_password_and_signs_in(
        self, client, alpha, alice, django_capture_on_commit_callbacks
    ):
        client.force_login(alice)
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(
                reverse("console:member_invite"),
                {"email": "Dana@Example.com", "role": "member"},
                follow=True,
            )
        assert "Added dana@example.com as Member" in _text(response)
        membership = Membership.objects.get(tenant=alpha, user__email="dana@example.com")
        assert membership.role == Role.MEMBER
        assert len(mail.outbox) == 1
        link = re.search(r"http\S+/invite/\S+/", mail.outbox[0].body).group(0)
        path = link.split("://", 1)[1].split("/", 1)[1]

        newcomer = Client()
        form_page = newcomer.get(f"/{path}", follow=True)
        assert "Choose a password" in _text(form_page)
        set_password_url = form_page.redirect_chain[-1][0]
        done = newcomer.post(
            set_password_url,
            {"new_password1": "a long river of words", "new_password2": "a long river of words"},
            follow=True,
        )
        assert done.redirect_chain[-1][0] == reverse("console:home")
        assert "Alpha" in _text(done)
        assert "Welcome" in _text(done)
        membership.user.refresh_from_db()
        assert membership.user.check_password("a long river of words")

        reused = Client().get(f"/{path}", follow=True)
        assert "This link no longer works" in _text(reused)

    def test_a_bad_invitation_link_says_so(self, client):
        response = client.get(reverse("console:invite_accept", args=["MTIz", "bad-token"]))
        assert response.status_code == 200
        assert "This link no longer works" in _text(response)


# --- tenants ------------------------------------------------------------------------------


class TestTenantSwitcher:
    def test_it_defaults_to_the_first_membership_and_switches(self, client, alpha, beta, alice):
        Membership.objects.create(user=alice, tenant=beta, role=Role.VIEWER)
        client.force_login(alice)
        home = _text(client.get(reverse("console:home")))
        assert "<h1>Alpha</h1>" in home
        response = client.post(reverse("console:switch_tenant"), {"tenant": "beta"}, follow=True)
        assert "<h1>Beta</h1>" in _text(response)
        assert "you are viewer" in _text(response)

    def test_it_refuses_to_switch_to_a_tenant_you_are_not_in(self, client, alpha, beta, charlie):
        client.force_login(charlie)
        response = client.post(reverse("console:switch_tenant"), {"tenant": "alpha"})
        assert response.status_code == 404
        assert "<h1>Beta</h1>" in _text(client.get(reverse("console:home")))

    def test_staff_may_switch_to_any_tenant(self, client, alpha, root):
        client.force_login(root)
        landing = client.get(reverse("console:home"))
        assert "Choose a tenant" in _text(landing)
        assert 'href="/admin/"' in _text(landing)
        response = client.post(reverse("console:switch_tenant"), {"tenant": "alpha"}, follow=True)
        assert "<h1>Alpha</h1>" in _text(response)
        assert "Platform staff" in _text(response)

    def test_a_user_without_a_tenant_gets_a_friendly_page(self, client, django_user):
        loner = django_user("loner")
        client.force_login(loner)
        response = client.get(reverse("console:keys"))
        assert response.status_code == 200
        assert "You are not in any tenant yet" in _text(response)
        assert 'href="/admin/"' not in _text(response)


class TestOverview:
    def test_it_shows_plan_limits_counts_and_an_empty_usage_state(self, client, alpha, alice):
        services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
        client.force_login(alice)
        page = _text(client.get(reverse("console:home")))
        assert "Team plan" in page
        assert "200,000" in page  # tokens per minute
        assert "5,000,000" in page  # monthly budget
        assert "No calls yet" in page

    def test_it_summarises_recent_calls(self, client, alpha, alice, chat_deployment):
        now = timezone.now()
        for index, status in enumerate([200, 200, 200, 429]):
            CallLog.objects.create(
                request_id=f"req_{index}",
                tenant=alpha,
                deployment=chat_deployment,
                endpoint="/v1/chat/completions",
                status_code=status,
                error_code="rate_limited" if status == 429 else "",
                prompt_tokens=10,
                completion_tokens=5,
                total_ms=12.0,
                created_at=now - timedelta(minutes=index),
            )
        CallLog.objects.create(
            request_id="req_old",
            tenant=alpha,
            status_code=200,
            prompt_tokens=100,
            total_ms=1,
            created_at=now - timedelta(days=3),
        )
        client.force_login(alice)
        response = client.get(reverse("console:home"))
        assert response.context["day"] == {
            "requests": 4,
            "tokens": 60,
            "failed": 1,
            "error_share": 25.0,
        }
        assert response.context["week"]["requests"] == 5
        assert len(response.context["recent"]) == 5
        assert "rate_limited" in _text(response)
        assert "No calls yet" not in _text(response)

    def test_a_suspended_tenant_shows_a_banner(self, client, alpha, alice):
        services.tenant_suspend(tenant=alpha, reason="unpaid invoice", actor=SYSTEM)
        client.force_login(alice)
        page = _text(client.get(reverse("console:home")))
        assert "Alpha is suspended." in page
        assert "unpaid invoice" in page


# --- API keys -----------------------------------------------------------------------------


class TestApiKeys:
    def test_it_shows_the_raw_key_once_and_stores_only_its_hash(self, client, alpha, bob):
        client.force_login(bob)
        response = client.post(
            reverse("console:key_create"),
            {"name": "ci", "scopes": ["inference", "manage.read"]},
        )
        assert response.status_code == 200
        page = _text(response)
        raw = re.search(r"sk-sluice-[a-z0-9]{8}_[A-Za-z0-9]{38}", page).group(0)
        assert "Copy it now, it will not be shown again" in page
        assert "data-copy" in page
        assert "no-store" in response["Cache-Control"]
        key = ApiKey.objects.get()
        assert key.created_by == bob and key.scopes == ["inference", "manage.read"]
        assert ApiKey.objects.authenticate(raw) == key

        secret = raw.split("_", 1)[1][:32]
        dump = io.StringIO()
        call_command("dumpdata", stdout=dump)
        assert raw not in dump.getvalue() and secret not in dump.getvalue()
        assert raw not in str(dict(client.session.items()))
        assert all(raw not in morsel.value for morsel in response.cookies.values())

        listing = _key_page_text(client)
        assert key.display_prefix in listing
        assert raw not in listing and secret not in listing
        assert raw not in _text(client.get(reverse("console:key", args=[key.pk])))

    def test_a_viewer_cannot_create_keys(self, client, alpha, vera):
        client.force_login(vera)
        assert client.get(reverse("console:key_create")).status_code == 403
        response = client.post(reverse("console:key_create"), {"name": "x", "scopes": "inference"})
        assert response.status_code == 403
        assert "member role" in _text(response)
        assert not ApiKey.objects.exists()
        assert "New API key" not in _text(client.get(reverse("console:keys")))

    def test_it_explains_form_mistakes(self, client, alpha, bob):
        client.force_login(bob)
        response = client.post(
            reverse("console:key_create"),
            {"name": "x", "expires_on": (timezone.now() - timedelta(days=2)).date().isoformat()},
        )
        assert response.status_code == 200
        assert "Pick at least one scope." in _text(response)
        assert "Pick today or a later date." in _text(response)
        assert not ApiKey.objects.exists()

    def test_a_key_with_an_expiry_works_through_that_day(self, client, alpha, bob):
        client.force_login(bob)
        day = (timezone.now() + timedelta(days=30)).date()
        client.post(
            reverse("console:key_create"),
            {"name": "temp", "scopes": ["inference"], "expires_on": day.isoformat()},
        )
        key = ApiKey.objects.get()
        assert key.expires_at.date() == day + timedelta(days=1)

    def test_a_suspended_tenant_cannot_issue_keys(self, client, alpha, alice):
        services.tenant_suspend(tenant=alpha, actor=SYSTEM)
        client.force_login(alice)
        response = client.post(reverse("console:key_create"), {"name": "x", "scopes": "inference"})
        assert response.status_code == 200
        assert "A suspended tenant cannot issue keys." in _text(response)

    def test_it_revokes_a_key(self, client, alpha, alice, bob):
        key, raw = services.api_key_issue(tenant=alpha, name="old", actor=actor(bob))
        client.force_login(alice)
        response = client.post(reverse("console:key_revoke", args=[key.pk]), follow=True)
        assert "Revoked old" in _text(response)
        key.refresh_from_db()
        assert key.revoked_at is not None
        assert ApiKey.objects.authenticate(raw) is None
        assert AuditEvent.objects.filter(action="apikey.revoke", actor=alice).exists()

    def test_a_member_manages_own_keys_but_not_others(self, client, alpha, alice, bob):
        own, _ = services.api_key_issue(tenant=alpha, name="bobs", actor=actor(bob))
        other, _ = services.api_key_issue(tenant=alpha, name="alices", actor=actor(alice))
        client.force_login(bob)
        refused = client.post(reverse("console:key_revoke", args=[other.pk]))
        assert refused.status_code == 403
        assert "manage other people's keys" in _text(refused)
        other.refresh_from_db()
        assert other.revoked_at is None
        client.post(reverse("console:key_revoke", args=[own.pk]))
        own.refresh_from_db()
        assert own.revoked_at is not None

    def test_rotating_shows_the_new_key_once_and_revokes_the_old(self, client, alpha, bob):
        key, old_raw = services.api_key_issue(tenant=alpha, name="svc", actor=actor(bob))
        client.force_login(bob)
        response = client.post(reverse("console:key_rotate", args=[key.pk]))
        assert response.status_code == 200
        new_raw = re.search(r"sk-sluice-[a-z0-9]{8}_[A-Za-z0-9]{38}", _text(response)).group(0)
        assert new_raw != old_raw
        assert "Copy it now, it will not be shown again" in _text(response)
        assert ApiKey.objects.authenticate(old_raw) is None
        assert ApiKey.objects.authenticate(new_raw).name == "svc"
        assert new_raw not in _key_page_text(client)

    def test_rotating_a_revoked_key_explains_why_not(self, client, alpha, bob):
        key, _ = services.api_key_issue(tenant=alpha, name="svc", actor=actor(bob))
        services.api_key_revoke(key=key, actor=actor(bob))
        client.force_login(bob)
        response = client.post(reverse("console:key_rotate", args=[key.pk]), follow=True)
        assert "issue a new key instead of rotating it" in _text(response)


# --- cross-tenant ---------------------------------------------------------------------------


class TestCrossTenant:
    @pytest.fixture
    def alphas_things(self, alpha, alice, bob, chat_deployment):
        key, _ = services.api_key_issue(tenant=alpha, name="secret", actor=actor(alice))
        filed = services.access_request_create(
            tenant=alpha,
            kind="subscribe_deployment",
            deployment=chat_deployment,
            actor=actor(bob),
        )
        prompt_api = gateway_services.prompt_api_create(
            tenant=alpha, slug="alpha-private", name="Private", actor=actor(alice)
        )
        gateway_services.prompt_api_version_create(
            prompt_api=prompt_api,
            actor=actor(alice),
            messages=MESSAGES,
            input_schema=SCHEMA,
            deployment=chat_deployment,
        )
        bobs = Membership.objects.get(tenant=alpha, user=bob)
        return {"key": key, "request": filed, "membership": bobs}

    def test_charlie_gets_404_on_alphas_pages(self, client, beta, charlie, alphas_things):
        client.force_login(charlie)
        key, filed = alphas_things["key"], alphas_things["request"]
        membership = alphas_things["membership"]
        for url in [
            reverse("console:key", args=[key.pk]),
            reverse("console:access_request", args=[filed.pk]),
            reverse("console:prompt_api", args=["alpha-private"]),
            reverse("console:version", args=["alpha-private", 1]),
            reverse("console:version_edit", args=["alpha-private", 1]),
        ]:
            response = client.get(url)
            assert response.status_code == 404, url
            assert "Nothing here" in _text(response)
            assert "secret" not in _text(response)

        for url in [
            reverse("console:key_revoke", args=[key.pk]),
            reverse("console:key_rotate", args=[key.pk]),
            reverse("console:access_request_approve", args=[filed.pk]),
            reverse("console:access_request_reject", args=[filed.pk]),
            reverse("console:access_request_withdraw", args=[filed.pk]),
            reverse("console:version_publish", args=["alpha-private", 1]),
            reverse("console:member_role", args=[membership.pk]),
            reverse("console:member_remove", args=[membership.pk]),
        ]:
            assert client.post(url, {"role": "owner"}).status_code == 404, url

        key.refresh_from_db()
        filed.refresh_from_db()
        assert key.revoked_at is None
        assert filed.state == AccessRequest.State.PENDING
        assert Membership.objects.filter(pk=membership.pk, role=Role.MEMBER).exists()

    def test_lists_show_nothing_of_other_tenants(self, client, beta, charlie, alphas_things):
        client.force_login(charlie)
        assert "secret" not in _key_page_text(client)
        access_page = _text(client.get(reverse("console:access")))
        assert reverse("console:access_request", args=[alphas_things["request"].pk]) not in (
            access_page
        )
        assert "No requests" in access_page
        assert "alpha-private" not in _text(client.get(reverse("console:prompt_apis")))
        assert "bob" not in _text(client.get(reverse("console:members")))


# --- access -------------------------------------------------------------------------------


class TestAccess:
    def test_a_member_requests_a_model_and_an_admin_approves(
        self, client, alpha, alice, bob, chat_deployment
    ):
        client.force_login(bob)
        form = _text(client.get(reverse("console:access_request_create")))
        assert chat_deployment.slug in form
        response = client.post(
            reverse("console:access_request_create"),
            {
                "kind": "subscribe_deployment",
                "d-deployment": chat_deployment.slug,
                "d-justification": "summaries",
            },
            follow=True,
        )
        assert "It waits for your tenant's owners and admins to review." in _text(response)
        filed = AccessRequest.objects.get()
        assert filed.state == AccessRequest.State.PENDING and filed.requester == bob
        assert "Pending" in _text(client.get(reverse("console:access")))

        client.force_login(alice)
        queue = _text(client.get(reverse("console:reviews")))
        assert "summaries" in queue
        response = client.post(
            reverse("console:access_request_approve", args=[filed.pk]),
            {"note": "go ahead"},
            follow=True,
        )
        assert f"Approved: {chat_deployment.slug}" in _text(response)
        filed.refresh_from_db()
        assert filed.state == AccessRequest.State.APPROVED
        assert filed.review_note == "go ahead"
        assert Subscription.objects.filter(tenant=alpha, deployment=chat_deployment).exists()
        access_page = _text(client.get(reverse("console:access")))
        assert chat_deployment.slug in access_page
        assert "No subscriptions yet" not in access_page

    def test_it_says_when_a_request_was_approved_automatically(
        self, client, alpha, alice, chat_deployment
    ):
        client.force_login(alice)
        response = client.post(
            reverse("console:access_request_create"),
            {"kind": "subscribe_deployment", "d-deployment": chat_deployment.slug},
            follow=True,
        )
        assert "Approved automatically" in _text(response)
        assert Subscription.objects.filter(tenant=alpha, deployment=chat_deployment).exists()

    def test_approving_a_rejected_request_shows_the_services_message(
        self, client, alpha, alice, bob, chat_deployment
    ):
        filed = services.access_request_create(
            tenant=alpha,
            kind="subscribe_deployment",
            deployment=chat_deployment,
            actor=actor(bob),
        )
        client.force_login(alice)
        client.post(reverse("console:access_request_reject", args=[filed.pk]), {"note": "no"})
        response = client.post(
            reverse("console:access_request_approve", args=[filed.pk]), follow=True
        )
        assert response.status_code == 200
        assert "This request is already rejected; only pending requests can be approved." in _text(
            response
        )
        filed.refresh_from_db()
        assert filed.state == AccessRequest.State.REJECTED
        assert not Subscription.objects.exists()

    def test_nobody_reviews_their_own_request_and_members_cannot_review(
        self, client, alpha, bob, chat_deployment
    ):
        filed = services.access_request_create(
            tenant=alpha,
            kind="subscribe_deployment",
            deployment=chat_deployment,
            actor=actor(bob),
        )
        client.force_login(bob)
        detail = _text(client.get(reverse("console:access_request", args=[filed.pk])))
        assert "Approve" not in detail
        response = client.post(reverse("console:access_request_approve", args=[filed.pk]))
        assert response.status_code == 403
        filed.refresh_from_db()
        assert filed.state == AccessRequest.State.PENDING

    def test_a_member_withdraws_their_pending_request(self, client, alpha, bob, chat_deployment):
        filed = services.access_request_create(
            tenant=alpha,
            kind="subscribe_deployment",
            deployment=chat_deployment,
            actor=actor(bob),
        )
        client.force_login(bob)
        response = client.post(
            reverse("console:access_request_withdraw", args=[filed.pk]), follow=True
        )
        assert "Withdrawn" in _text(response)
        filed.refresh_from_db()
        assert filed.state == AccessRequest.State.WITHDRAWN

    def test_quota_requests_go_to_platform_staff(self, client, alpha, alice, root):
        client.force_login(alice)
        too_small = client.post(
            reverse("console:access_request_create"),
            {"kind": "raise_quota", "q-tokens_per_minute": "100"},
        )
        assert too_small.status_code == 200
        assert "tokens_per_minute is already 200,000" in _text(too_small)
        empty = client.post(reverse("console:access_request_create"), {"kind": "raise_quota"})
        assert "Fill in at least one limit to raise." in _text(empty)

        client.post(
            reverse("console:access_request_create"),
            {"kind": "raise_quota", "q-tokens_per_minute": "500000"},
        )
        filed = AccessRequest.objects.get(kind="raise_quota")
        assert filed.state == AccessRequest.State.PENDING, "alice may not approve quotas"
        detail = _text(client.get(reverse("console:access_request", args=[filed.pk])))
        assert "Only platform staff may review this request" in detail

        client.force_login(root)
        client.post(reverse("console:switch_tenant"), {"tenant": "alpha"})
        client.post(reverse("console:access_request_approve", args=[filed.pk]))
        alpha.refresh_from_db()
        assert alpha.limits().tokens_per_minute == 500_000

    def test_a_viewer_cannot_request_access(self, client, alpha, vera, chat_deployment):
        client.force_login(vera)
        response = client.post(
            reverse("console:access_request_create"),
            {"kind": "subscribe_deployment", "d-deployment": chat_deployment.slug},
        )
        assert response.status_code == 403
        assert not AccessRequest.objects.exists()

    def test_a_duplicate_request_is_explained(self, client, alpha, bob, chat_deployment):
        client.force_login(bob)
        data = {"kind": "subscribe_deployment", "d-deployment": chat_deployment.slug}
        client.post(reverse("console:access_request_create"), data)
        again = client.post(reverse("console:access_request_create"), data)
        assert again.status_code == 200
        assert "An identical request is already pending review." in _text(again)
        assert AccessRequest.objects.count() == 1

    def test_a_public_prompt_api_of_another_tenant_can_be_requested(
        self, client, alpha, beta, bob, charlie, chat_deployment
    ):
        gateway_services.prompt_api_create(
            tenant=beta,
            slug="beta-public",
            name="Beta public",
            visibility="public",
            actor=actor(charlie),
        )
        client.force_login(bob)
        assert "beta-public" in _text(client.get(reverse("console:prompt_apis")))
        client.post(
            reverse("console:access_request_create"),
            {"kind": "subscribe_prompt_api", "p-prompt_api": "beta-public"},
        )
        filed = AccessRequest.objects.get()
        assert filed.prompt_api.slug == "beta-public"
        assert filed.tenant == alpha


# --- prompt-APIs --------------------------------------------------------------------------


@pytest.fixture
def subscribed(alpha, alice, chat_deployment):
    """alpha may run prompt-APIs on the chat deployment."""
    services.access_request_create(
        tenant=alpha, kind="subscribe_deployment", deployment=chat_deployment, actor=actor(alice)
    )
    return chat_deployment


def _version_data(deployment, **changes):
    import json

    data = {
        "deployment": deployment.slug,
        "messages": json.dumps(MESSAGES),
        "input_schema": json.dumps(SCHEMA),
        "output_type": "text",
        "output_schema": "",
        "parameters": '{"temperature": 0.2}',
        "changelog": "first",
    }
    data.update(changes)
    return data


class TestPromptApis:
    def test_a_member_creates_a_prompt_api_and_drafts_a_version(
        self, client, alpha, bob, chat_deployment
    ):
        client.force_login(bob)
        response = client.post(
            reverse("console:prompt_api_create"),
            {"name": "Summarize", "slug": "summarize", "visibility": "private"},
            follow=True,
        )
        assert response.redirect_chain[-1][0] == reverse(
            "console:version_create", args=["summarize"]
        )
        response = client.post(
            reverse("console:version_create", args=["summarize"]),
            _version_data(chat_deployment),
            follow=True,
        )
        assert "Saved summarize v1 as a draft." in _text(response)
        version = PromptApiVersion.objects.get()
        assert version.state == "draft" and version.parameters == {"temperature": 0.2}
        detail = _text(client.get(reverse("console:prompt_api", args=["summarize"])))
        assert "/v1/apis/summarize" in detail
        assert "curl" in detail and "$SLUICE_API_KEY" in detail
        assert "Request publication" in detail
        assert 'action="/prompt-apis/summarize/versions/1/publish/"' not in detail

    def test_bad_json_in_the_version_form_is_an_error_not_a_500(
        self, client, alpha, bob, chat_deployment
    ):
        gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(bob)
        )
        client.force_login(bob)
        response = client.post(
            reverse("console:version_create", args=["summarize"]),
            _version_data(
                chat_deployment, messages='[{"role": "user", "content": "x"', parameters="[]"
            ),
        )
        assert response.status_code == 200
        page = _text(response)
        assert "This is not valid JSON: Expecting ',' delimiter (line 1, column 33)." in page
        assert "This must be a JSON object {...}." in page
        assert not PromptApiVersion.objects.exists()

    def test_the_services_refusal_is_shown_on_its_field(self, client, alpha, bob, chat_deployment):
        gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(bob)
        )
        client.force_login(bob)
        response = client.post(
            reverse("console:version_create", args=["summarize"]),
            _version_data(chat_deployment, input_schema='{"type": "object", "properties": {}}'),
        )
        assert response.status_code == 200
        assert "input_schema declares no property" in _text(response)
        response = client.post(
            reverse("console:version_create", args=["summarize"]),
            _version_data(chat_deployment, input_schema='{"type": "nonsense"}'),
        )
        assert "is not a valid JSON Schema" in _text(response)
        assert not PromptApiVersion.objects.exists()

    def test_published_versions_cannot_be_edited(self, client, alpha, alice, subscribed):
        prompt_api = gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(alice)
        )
        version = gateway_services.prompt_api_version_create(
            prompt_api=prompt_api,
            actor=actor(alice),
            messages=MESSAGES,
            input_schema=SCHEMA,
            deployment=subscribed,
        )
        client.force_login(alice)
        client.post(reverse("console:version_publish", args=["summarize", 1]))
        version.refresh_from_db()
        assert version.is_published

        page = client.get(reverse("console:version_edit", args=["summarize", 1]), follow=True)
        assert "is published and can no longer change" in _text(page)
        assert "Published versions are immutable" in _text(page)
        response = client.post(
            reverse("console:version_edit", args=["summarize", 1]),
            _version_data(subscribed, changelog="sneaky"),
            follow=True,
        )
        assert "summarize v1 is published and can no longer change" in _text(response)
        version.refresh_from_db()
        assert version.changelog == "" and version.parameters == {}

    def test_drafts_can_be_edited(self, client, alpha, bob, chat_deployment):
        prompt_api = gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(bob)
        )
        gateway_services.prompt_api_version_create(
            prompt_api=prompt_api,
            actor=actor(bob),
            messages=MESSAGES,
            input_schema=SCHEMA,
            deployment=chat_deployment,
        )
        client.force_login(bob)
        form = _text(client.get(reverse("console:version_edit", args=["summarize", 1])))
        assert "Summarize: {{text}}" in form
        client.post(
            reverse("console:version_edit", args=["summarize", 1]),
            _version_data(chat_deployment, changelog="tuned"),
        )
        assert PromptApiVersion.objects.get().changelog == "tuned"

    def test_a_member_requests_publication_and_an_admin_approves(
        self, client, alpha, alice, bob, subscribed
    ):
        prompt_api = gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(bob)
        )
        gateway_services.prompt_api_version_create(
            prompt_api=prompt_api,
            actor=actor(bob),
            messages=MESSAGES,
            input_schema=SCHEMA,
            deployment=subscribed,
        )
        client.force_login(bob)
        refused = client.post(reverse("console:version_publish", args=["summarize", 1]))
        assert refused.status_code == 403
        response = client.post(
            reverse("console:version_request_publish", args=["summarize", 1]), follow=True
        )
        assert "Publication of summarize v1 requested" in _text(response)
        filed = AccessRequest.objects.get(kind="publish_version")

        client.force_login(alice)
        client.post(reverse("console:access_request_approve", args=[filed.pk]))
        prompt_api.refresh_from_db()
        assert prompt_api.active_version.number == 1
        assert prompt_api.active_version.is_published

    def test_publishing_without_a_subscription_explains_why_not(
        self, client, alpha, alice, chat_deployment
    ):
        prompt_api = gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(alice)
        )
        gateway_services.prompt_api_version_create(
            prompt_api=prompt_api,
            actor=actor(alice),
            messages=MESSAGES,
            input_schema=SCHEMA,
            deployment=chat_deployment,
        )
        client.force_login(alice)
        response = client.post(
            reverse("console:version_publish", args=["summarize", 1]), follow=True
        )
        assert "has no approved subscription to deployment" in _text(response)
        assert PromptApiVersion.objects.get().state == "draft"

    def test_an_older_published_version_can_be_made_active(self, client, alpha, alice, subscribed):
        prompt_api = gateway_services.prompt_api_create(
            tenant=alpha, slug="summarize", name="S", actor=actor(alice)
        )
        for _ in range(2):
            version = gateway_services.prompt_api_version_create(
                prompt_api=prompt_api,
                actor=actor(alice),
                messages=MESSAGES,
                input_schema=SCHEMA,
                deployment=subscribed,
            )
            gateway_services.prompt_api_version_publish(version=version, actor=actor(alice))
        client.force_login(alice)
        detail = _text(client.get(reverse("console:prompt_api", args=["summarize"])))
        assert "Make active" in detail
        response = client.post(
            reverse("console:version_activate", args=["summarize", 1]), follow=True
        )
        assert "/v1/apis/summarize now serves summarize v1" in _text(response)
        prompt_api.refresh_from_db()
        assert prompt_api.active_version.number == 1

    def test_another_tenants_public_prompt_api_is_read_only(
        self, client, alpha, beta, bob, charlie, chat_deployment
    ):
        prompt_api = gateway_services.prompt_api_create(
            tenant=beta,
            slug="beta-public",
            name="Beta public",
            visibility="public",
            actor=actor(charlie),
        )
        gateway_services.prompt_api_version_create(
            prompt_api=prompt_api,
            actor=actor(charlie),
            messages=MESSAGES,
            input_schema=SCHEMA,
            deployment=chat_deployment,
        )
        client.force_login(bob)
        detail = _text(client.get(reverse("console:prompt_api", args=["beta-public"])))
        assert "No versions published" in detail, "drafts of other tenants stay hidden"
        assert "Add version" not in detail
        assert client.get(reverse("console:version", args=["beta-public", 1])).status_code == 404
        refused = client.post(
            reverse("console:version_create", args=["beta-public"]), _version_data(chat_deployment)
        )
        assert refused.status_code == 403
        assert PromptApi.objects.get(slug="beta-public").versions.count() == 1

    def test_a_viewer_cannot_create_prompt_apis(self, client, alpha, vera):
        client.force_login(vera)
        response = client.post(
            reverse("console:prompt_api_create"),
            {"name": "x", "slug": "x", "visibility": "private"},
        )
        assert response.status_code == 403
        assert not PromptApi.objects.exists()

    def test_a_taken_slug_is_a_form_error(self, client, alpha, beta, bob, charlie):
        gateway_services.prompt_api_create(
            tenant=beta, slug="taken", name="T", actor=actor(charlie)
        )
        client.force_login(bob)
        response = client.post(
            reverse("console:prompt_api_create"),
            {"name": "Mine", "slug": "taken", "visibility": "private"},
        )
        assert response.status_code == 200
        assert "The prompt-API slug 'taken' is taken." in _text(response)


# --- members and audit ----------------------------------------------------------------------


class TestMembers:
    def test_everyone_sees_the_members_but_only_admins_manage(self, client, alpha, vera):
        client.force_login(vera)
        page = _text(client.get(reverse("console:members")))
        assert "alice" in page and "bob" in page
        assert "Invite someone" not in page
        response = client.post(reverse("console:member_invite"), {"email": "x@example.com"})
        assert response.status_code == 403

    def test_the_last_owner_can_neither_leave_nor_be_demoted(self, client, alpha, alice):
        owner = Membership.objects.get(tenant=alpha, user=alice)
        client.force_login(alice)
        response = client.post(
            reverse("console:member_role", args=[owner.pk]), {"role": "member"}, follow=True
        )
        assert "A tenant must keep at least one owner" in _text(response)
        response = client.post(reverse("console:member_remove", args=[owner.pk]), follow=True)
        assert "The last owner cannot be removed" in _text(response)
        owner.refresh_from_db()
        assert owner.role == Role.OWNER

    def test_an_admin_changes_roles_but_cannot_make_owners(self, client, alpha, alice, bob, vera):
        Membership.objects.filter(tenant=alpha, user=bob).update(role=Role.ADMIN)
        veras = Membership.objects.get(tenant=alpha, user=vera)
        client.force_login(bob)
        client.post(reverse("console:member_role", args=[veras.pk]), {"role": "member"})
        veras.refresh_from_db()
        assert veras.role == Role.MEMBER
        response = client.post(
            reverse("console:member_role", args=[veras.pk]), {"role": "owner"}, follow=True
        )
        assert "Only the tenant's owners may grant or change the owner role." in _text(response)
        veras.refresh_from_db()
        assert veras.role == Role.MEMBER

    def test_anyone_may_leave(self, client, alpha, vera):
        client.force_login(vera)
        veras = Membership.objects.get(tenant=alpha, user=vera)
        response = client.post(reverse("console:member_remove", args=[veras.pk]), follow=True)
        assert "You left Alpha." in _text(response)
        assert "You are not in any tenant yet" in _text(response)
        assert not Membership.objects.filter(pk=veras.pk).exists()

    def test_a_member_cannot_remove_others(self, client, alpha, bob, vera):
        client.force_login(bob)
        veras = Membership.objects.get(tenant=alpha, user=vera)
        assert client.post(reverse("console:member_remove", args=[veras.pk])).status_code == 403
        assert Membership.objects.filter(pk=veras.pk).exists()

    def test_inviting_an_existing_member_is_a_form_error(self, client, alpha, alice):
        client.force_login(alice)
        response = client.post(
            reverse("console:member_invite"), {"email": "bob@example.com", "role": "member"}
        )
        assert response.status_code == 200
        assert "bob@example.com is already a member of Alpha." in _text(response)


class TestAudit:
    def test_admins_read_the_audit_trail_page_by_page(self, client, alpha, alice):
        for index in range(60):
            services.api_key_issue(tenant=alpha, name=f"k{index}", actor=actor(alice))
        client.force_login(alice)
        first = client.get(reverse("console:audit"))
        assert first.status_code == 200
        assert "apikey.issue" in _text(first)
        assert first.context["page"].paginator.num_pages == 2
        assert client.get(reverse("console:audit") + "?page=2").status_code == 200
        members_only = client.get(reverse("console:audit") + "?action=member")
        assert "apikey.issue" not in _text(members_only)
        assert "member.add" in _text(members_only)

    def test_members_and_viewers_cannot_read_it(self, client, alpha, bob, vera):
        for user in (bob, vera):
            client.force_login(user)
            assert client.get(reverse("console:audit")).status_code == 403

    def test_it_shows_only_this_tenants_events(self, client, alpha, beta, charlie):
        services.api_key_issue(tenant=alpha, name="alpha-only-key", actor=SYSTEM)
        client.force_login(charlie)
        assert "alpha-only-key" not in _text(client.get(reverse("console:audit")))


class TestErrorPages:
    def test_an_unknown_page_is_a_friendly_404(self, client, alpha, alice):
        client.force_login(alice)
        response = client.get("/no-such-page/")
        assert response.status_code == 404
        assert "Nothing here" in _text(response)

    def test_the_500_page_renders_without_a_request(self):
        from django.template.loader import render_to_string

        assert "Something went wrong" in render_to_string("500.html")
