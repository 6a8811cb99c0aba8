"""API keys: issuing, secrecy, refusal of revoked/expired/suspended keys, the role matrix."""

from __future__ import annotations

import io
import logging
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from tenants import services
from tenants.models import ApiKey, AuditEvent, key_checksum, parse_raw_key
from tests.conftest import actor
from tests.support import assert_error

pytestmark = pytest.mark.django_db


class TestKeyFormat:
    def test_it_issues_keys_a_scanner_can_validate_offline(self, alpha, alice):
        _, raw = services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
        assert raw.startswith("sk-sluice-")
        body, checksum = raw[:-6], raw[-6:]
        assert key_checksum(body) == checksum
        assert parse_raw_key(raw) is not None

    def test_it_rejects_a_key_with_a_wrong_checksum_without_a_lookup(self, alpha, alice):
        _, raw = services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
        tampered = raw[:-1] + ("A" if raw[-1] != "A" else "B")
        assert parse_raw_key(tampered) is None
        assert ApiKey.objects.authenticate(tampered) is None

    def test_it_rejects_a_right_prefix_with_a_wrong_secret(self, alpha, alice):
        key, raw = services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
        _, _, secret = ApiKey.objects.generate()
        forged_body = f"sk-sluice-{key.prefix}_{secret}"
        forged = forged_body + key_checksum(forged_body)
        assert ApiKey.objects.authenticate(forged) is None
        assert ApiKey.objects.authenticate(raw) == key


class TestKeySecrecy:
    def test_the_raw_key_is_nowhere_in_the_database_or_logs(self, api, alpha, bob, caplog):
        caplog.set_level(logging.DEBUG)
        response = api.as_user(bob).post(
            "/api/keys/", {"name": "ci", "scopes": ["inference", "manage.read"]}, format="json"
        )
        assert response.status_code == 201
        raw = response.json()["key"]
        secret = parse_raw_key(raw)[1]
        # Use it, list it, rotate nothing: every path that touches it.
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        assert api.get("/api/keys/").status_code == 200

        dump = io.StringIO()
        call_command("dumpdata", stdout=dump)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT string_agg(t::text, ' ') FROM ("
                " SELECT row_to_json(a)::text AS t FROM tenants_auditevent a"
                " UNION ALL SELECT row_to_json(k)::text FROM tenants_apikey k"
                " UNION ALL SELECT row_to_json(s)::text FROM django_session s) rows"
            )
            raw_rows = cursor.fetchone()[0]
        everything = dump.getvalue() + raw_rows + caplog.text
        assert raw not in everything
        assert secret not in everything
        assert ApiKey.objects.get(name="ci").secret_hash not in response.content.decode()

    def test_the_list_never_shows_the_key_or_its_hash(self, api, alpha, alice):
        key, raw = services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
        content = api.as_user(alice).get("/api/keys/").content.decode()
        assert raw not in content
        assert key.secret_hash not in content
        assert key.display_prefix in content


class TestKeyRefusal:
    def test_a_revoked_key_is_refused(self, api, alpha, alice):
        key, raw = services.api_key_issue(
            tenant=alpha, name="k", scopes=["manage.read"], actor=actor(alice)
        )
        services.api_key_revoke(key=key, actor=actor(alice))
        error = assert_error(api.with_key(raw).get("/api/keys/"), 401, "invalid_api_key")
        assert "revoked" in error["message"]

    def test_an_expired_key_is_refused(self, api, alpha, alice):
        key, raw = services.api_key_issue(
            tenant=alpha,
            name="k",
            scopes=["manage.read"],
            actor=actor(alice),
            expires_at=timezone.now() + timedelta(minutes=5),
        )
        ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        error = assert_error(api.with_key(raw).get("/api/keys/"), 401, "invalid_api_key")
        assert "expired" in error["message"]
        assert ApiKey.objects.authenticate(raw) is None

    def test_a_suspended_tenants_keys_are_refused_and_work_again_after(
        self, api, alpha, alice, root
    ):
        _, raw = services.api_key_issue(
            tenant=alpha, name="k", scopes=["manage.read"], actor=actor(alice)
        )
        services.tenant_suspend(tenant=alpha, reason="unpaid", actor=actor(root))
        response = api.with_key(raw).get("/api/keys/")
        assert_error(response, 403, "tenant_suspended")
        assert response["x-should-retry"] == "false"
        assert ApiKey.objects.authenticate(raw) is None
        services.tenant_reactivate(tenant=alpha, actor=actor(root))
        assert api.with_key(raw).get("/api/keys/").status_code == 200

    def test_reactivating_an_active_tenant_clears_a_stale_deny_flag(
        self, alpha, root, django_capture_on_commit_callbacks
    ):
        # A Redis error when the flag was cleared must not lock the tenant out for good.
        from sluice.redisconn import get_redis
        from workers import protocol

        get_redis().set(protocol.deny_tenant(alpha.pk), 1)
        with django_capture_on_commit_callbacks(execute=True):
            services.tenant_reactivate(tenant=alpha, actor=actor(root))
        assert not get_redis().exists(protocol.deny_tenant(alpha.pk))

    def test_a_garbage_bearer_is_a_clear_401(self, api, alpha):
        error = assert_error(api.with_key("hello").get("/api/keys/"), 401, "invalid_api_key")
        assert "sk-sluice-" in error["message"]
        response = api.with_key("sk-sluice-nonsense").get("/api/keys/")
        assert_error(response, 401, "invalid_api_key")
        assert response["WWW-Authenticate"].startswith("Bearer")

    def test_no_credentials_is_a_401_not_a_403(self, api, alpha):
        assert_error(api.get("/api/keys/"), 401, "not_authenticated")

    def test_a_key_without_management_scope_cannot_manage(self, api, alpha, alice):
        _, raw = services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
        assert_error(api.with_key(raw).get("/api/keys/"), 403, "insufficient_scope")

    def test_a_read_key_cannot_write(self, api, alpha, alice):
        _, raw = services.api_key_issue(
            tenant=alpha, name="k", scopes=["manage.read"], actor=actor(alice)
        )
        response = api.with_key(raw).post("/api/keys/", {"name": "x"}, format="json")
        assert_error(response, 403, "insufficient_scope")

    def test_a_write_key_acts_with_its_creators_role(self, api, alpha, vera, alice):
        # vera is a viewer: even with manage.write her key cannot issue keys.
        _, raw = services.api_key_issue(
            tenant=alpha, name="k", scopes=["manage.write"], actor=actor(vera)
        )
        response = api.with_key(raw).post("/api/keys/", {"name": "x"}, format="json")
        assert_error(response, 403, "permission_denied")
        _, owner_raw = services.api_key_issue(
            tenant=alpha, name="k2", scopes=["manage.write"], actor=actor(alice)
        )
        response = api.with_key(owner_raw).post("/api/keys/", {"name": "x"}, format="json")
        assert response.status_code == 201
        event = AuditEvent.objects.filter(action="apikey.issue").first()
        assert event.actor == alice
        assert event.actor_key is not None


class TestKeyLifecycle:
    def test_it_records_who_issued_revoked_and_rotated(self, api, alpha, bob):
        client = api.as_user(bob)
        created = client.post("/api/keys/", {"name": "ci"}, format="json").json()
        assert created["scopes"] == ["inference"]
        assert "not" in created["warning"]
        rotated = client.post(f"/api/keys/{created['id']}/rotate/").json()
        assert rotated["key"] != created["key"]
        assert rotated["name"] == "ci"
        old = client.get(f"/api/keys/{created['id']}/").json()
        assert old["status"] == "revoked"
        revoked = client.post(f"/api/keys/{rotated['id']}/revoke/").json()
        assert revoked["status"] == "revoked"
        actions = list(
            AuditEvent.objects.filter(tenant=alpha, action__startswith="apikey.")
            .order_by("id")
            .values_list("action", flat=True)
        )
        assert actions == [
            "apikey.issue",
            "apikey.issue",
            "apikey.revoke",
            "apikey.rotate",
            "apikey.revoke",
        ]

    def test_a_revoked_key_cannot_be_rotated(self, api, alpha, bob):
        client = api.as_user(bob)
        created = client.post("/api/keys/", {"name": "ci"}, format="json").json()
        client.post(f"/api/keys/{created['id']}/revoke/")
        assert_error(client.post(f"/api/keys/{created['id']}/rotate/"), 409, "conflict")

    def test_expiry_must_be_in_the_future(self, api, alpha, bob):
        response = api.as_user(bob).post(
            "/api/keys/", {"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, format="json"
        )
        assert assert_error(response, 400, "invalid_request")["param"] == "expires_at"


class TestKeyRoles:
    def test_a_viewer_reads_but_cannot_issue(self, api, alpha, vera, alice):
        services.api_key_issue(tenant=alpha, name="k", actor=actor(alice))
        client = api.as_user(vera)
        assert client.get("/api/keys/").json()["count"] == 1
        assert_error(
            client.post("/api/keys/", {"name": "x"}, format="json"), 403, "permission_denied"
        )

    def test_a_member_revokes_own_keys_but_not_others(self, api, alpha, bob, alice):
        theirs, _ = services.api_key_issue(tenant=alpha, name="alice's", actor=actor(alice))
        mine, _ = services.api_key_issue(tenant=alpha, name="bob's", actor=actor(bob))
        client = api.as_user(bob)
        assert client.post(f"/api/keys/{mine.pk}/revoke/").status_code == 200
        assert_error(client.post(f"/api/keys/{theirs.pk}/revoke/"), 403, "permission_denied")

    def test_an_admin_revokes_anyones_key(self, api, alpha, bob, alice):
        theirs, _ = services.api_key_issue(tenant=alpha, name="bob's", actor=actor(bob))
        assert api.as_user(alice).post(f"/api/keys/{theirs.pk}/revoke/").status_code == 200
