"""The platform admin (Django admin): pages, secrets, bulk actions, immutability."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from analytics.models import CallLog
from gateway import services as gateway_services
from gateway.models import ModelDeployment, PromptApi, PromptApiVersion
from tenants import services
from tenants.models import (
    AccessRequest,
    ApiKey,
    AuditEvent,
    Membership,
    Plan,
    QuotaOverride,
    Role,
    Subscription,
    Tenant,
)
from tenants.policy import Actor

RAW_KEY = re.compile(r"sk-sluice-[a-z0-9]{8}_[A-Za-z0-9]{38}")

MESSAGES = [{"role": "user", "content": "Summarise: {{text}}"}]
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def admin_url(model, view: str, *args) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def run_action(client, model, action: str, objects, **extra):
    data = {"action": action, "_selected_action": [str(obj.pk) for obj in objects], **extra}
    return client.post(admin_url(model, "changelist"), data, follow=True)


def message_texts(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def changeform_data(response) -> dict:
    """What a browser would post back from a rendered change form, unchanged."""
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        forms.append(inline.formset.management_form)
        forms.extend(inline.formset.forms)
    data: dict = {}
    for form in forms:
        for bound in form:
            value = bound.value()
            if bound.field.show_hidden_initial:  # fields with a callable default
                data[bound.html_initial_name] = bound.field.prepare_value(bound.initial)
            if value is None or value is False:
                continue
            if value is True:
                data[bound.html_name] = "on"
            elif isinstance(value, list | tuple):
                data[bound.html_name] = [str(item) for item in value]
            else:
                data[bound.html_name] = str(value)
    return data


@pytest.fixture
def staff_client(client, root):
    client.force_login(root)
    return client


@pytest.fixture
def strict_plan(db) -> Plan:
    return Plan.objects.create(
        name="Enterprise", slug="enterprise", requires_platform_approval=True
    )


@pytest.fixture
def world(alpha, beta, alice, bob, root, chat_deployment, embedding_deployment):
    """One of everything the admin shows, made through the services."""
    key, raw = services.api_key_issue(tenant=alpha, name="ci", actor=Actor(user=alice))
    services.access_request_create(
        tenant=alpha,
        kind=AccessRequest.Kind.SUBSCRIBE_DEPLOYMENT,
        deployment=chat_deployment,
        justification="chatbot",
        actor=Actor(user=bob),
    )
    approved = services.access_request_create(
        tenant=beta,
        kind=AccessRequest.Kind.SUBSCRIBE_DEPLOYMENT,
        deployment=embedding_deployment,
        actor=Actor(user=root),
    )
    services.access_request_create(
        tenant=alpha,
        kind=AccessRequest.Kind.RAISE_QUOTA,
        quota={"requests_per_minute": 1000},
        actor=Actor(user=bob),
    )
    QuotaOverride.objects.create(tenant=beta, tokens_per_minute=900_000)
    prompt_api = gateway_services.prompt_api_create(
        tenant=None,
        slug="summarize",
        name="Summarize",
        visibility="public",
        actor=Actor(user=root),
    )
    version = gateway_services.prompt_api_version_create(
        prompt_api=prompt_api,
        messages=MESSAGES,
        input_schema=SCHEMA,
        deployment=chat_deployment,
        actor=Actor(user=root),
    )
    gateway_services.prompt_api_version_publish(version=version, actor=Actor(user=root))
    gateway_services.prompt_api_version_create(
        prompt_api=prompt_api,
        messages=MESSAGES,
        input_schema=SCHEMA,
        deployment=chat_deployment,
        changelog="draft",
        actor=Actor(user=root),
    )
    CallLog.objects.create(
        request_id="req-ok",
        tenant=alpha,
        api_key=key,
        deployment=chat_deployment,
        endpoint="chat",
        status_code=200,
        prompt_tokens=12,
        completion_tokens=30,
        queue_ms=1.5,
        inference_ms=40.0,
        total_ms=45.0,
        created_at=timezone.now(),
    )
    CallLog.objects.create(
        request_id="req-full",
        tenant=alpha,
        api_key=key,
        deployment=chat_deployment,
        endpoint="chat",
        status_code=503,
        error_code="queue_full",
        total_ms=0.8,
        created_at=timezone.now(),
    )
    return {
        "key": key,
        "raw": raw,
        "prompt_api": prompt_api,
        "subscription": Subscription.objects.get(access_request=approved),
    }


class TestAdminPages:
    def test_it_renders_every_changelist_add_and_change_page(self, staff_client, root, world):
        assert len(admin.site._registry) >= 12
        for model, model_admin in admin.site._registry.items():
            name = model._meta.label
            response = staff_client.get(admin_url(model, "changelist"))
            assert response.status_code == 200, name
            if model_admin.search_fields:
                assert (
                    staff_client.get(admin_url(model, "changelist"), {"q": "a"}).status_code == 200
                ), name
            add = staff_client.get(admin_url(model, "add"))
            expected = 200 if model_admin.has_add_permission(response.wsgi_request) else 403
            assert add.status_code == expected, name
            obj = model._default_manager.first()
            if obj is not None:
                change = staff_client.get(admin_url(model, "change", obj.pk))
                assert change.status_code == 200, name

    def test_it_declares_filters_and_search_on_every_domain_admin(self):
        for model, model_admin in admin.site._registry.items():
            if model._meta.app_label not in {"tenants", "gateway", "analytics"}:
                continue
            assert model_admin.list_filter, model._meta.label
            assert model_admin.search_fields, model._meta.label
            assert model_admin.list_display != ("__str__",), model._meta.label

    def test_it_searches_and_filters_tenants(self, staff_client, world, alpha, beta):
        services.tenant_suspend(tenant=beta, actor=Actor(user=None))
        found = staff_client.get(admin_url(Tenant, "changelist"), {"q": "alp"})
        assert list(found.context["cl"].result_list) == [alpha]
        suspended = staff_client.get(
            admin_url(Tenant, "changelist"), {"status__exact": "suspended"}
        )
        assert list(suspended.context["cl"].result_list) == [beta]

    def test_it_filters_keys_by_status_and_finds_them_by_display_prefix(
        self, staff_client, world, alpha, alice
    ):
        revoked, _ = services.api_key_issue(tenant=alpha, name="old", actor=Actor(user=alice))
        services.api_key_revoke(key=revoked, actor=Actor(user=alice))
        url = admin_url(ApiKey, "changelist")
        assert list(staff_client.get(url, {"status": "revoked"}).context["cl"].result_list) == [
            revoked
        ]
        assert list(staff_client.get(url, {"status": "active"}).context["cl"].result_list) == [
            world["key"]
        ]
        pasted = staff_client.get(url, {"q": world["key"].display_prefix})
        assert list(pasted.context["cl"].result_list) == [world["key"]]

    def test_it_filters_access_requests_by_state_kind_and_tenant(self, staff_client, world, alpha):
        url = admin_url(AccessRequest, "changelist")
        pending = staff_client.get(url, {"state__exact": "pending"}).context["cl"].result_list
        assert {r.state for r in pending} == {"pending"} and len(pending) == 2
        quota = staff_client.get(url, {"kind__exact": "raise_quota", "tenant__id__exact": alpha.pk})
        assert [r.kind for r in quota.context["cl"].result_list] == ["raise_quota"]
        assert len(staff_client.get(url, {"q": "chatbot"}).context["cl"].result_list) == 1

    def test_it_filters_call_logs_by_outcome_status_and_error_code(self, staff_client, world):
        url = admin_url(CallLog, "changelist")
        for params in ({"outcome": "5xx"}, {"status_code": "503"}, {"error_code": "queue_full"}):
            rows = staff_client.get(url, params).context["cl"].result_list
            assert [row.request_id for row in rows] == ["req-full"], params
        ok = staff_client.get(url, {"error_code": "none"}).context["cl"].result_list
        assert [row.request_id for row in ok] == ["req-ok"]
        today = timezone.now()
        by_day = staff_client.get(
            url,
            {
                "created_at__year": today.year,
                "created_at__month": today.month,
                "created_at__day": today.day,
            },
        )
        assert by_day.status_code == 200 and len(by_day.context["cl"].result_list) == 2

    @pytest.mark.parametrize(
        "model",
        [
            Tenant,
            Plan,
            Membership,
            ApiKey,
            AccessRequest,
            Subscription,
            AuditEvent,
            ModelDeployment,
            PromptApi,
            PromptApiVersion,
            CallLog,
        ],
        ids=lambda model: model.__name__,
    )
    def test_its_changelists_do_not_query_once_per_row(
        self, staff_client, world, model, plan, root, django_user, chat_deployment
    ):
        url = admin_url(model, "changelist")

        def queries() -> int:
            with CaptureQueriesContext(connection) as captured:
                assert staff_client.get(url).status_code == 200
            return len(captured)

        before = queries()
        staff = Actor(user=root)
        for index in range(3):  # three more rows of every kind, through the services
            member = django_user(f"member{index}")
            tenant = services.tenant_create(
                name=f"T{index}", slug=f"t{index}", plan=plan, owner=member, actor=staff
            )
            key, _ = services.api_key_issue(tenant=tenant, name="k", actor=staff)
            services.access_request_create(
                tenant=tenant,
                kind=AccessRequest.Kind.SUBSCRIBE_DEPLOYMENT,
                deployment=chat_deployment,
                actor=staff,
            )
            services.access_request_create(
                tenant=tenant,
                kind=AccessRequest.Kind.RAISE_QUOTA,
                quota={"requests_per_minute": 5000},
                actor=Actor(user=member),
            )
            gateway_services.deployment_create(
                slug=f"model-{index}", name="m", task="chat", backend="x.Y", actor=staff
            )
            prompt_api = gateway_services.prompt_api_create(
                tenant=tenant, slug=f"p{index}", name="P", actor=staff
            )
            gateway_services.prompt_api_version_create(
                prompt_api=prompt_api,
                messages=MESSAGES,
                input_schema=SCHEMA,
                deployment=chat_deployment,
                actor=staff,
            )
            CallLog.objects.create(
                request_id=f"more-{index}",
                tenant=tenant,
                api_key=key,
                deployment=chat_deployment,
                status_code=200,
                total_ms=1.0,
                created_at=timezone.now(),
            )
        assert model._default_manager.count() >= 3 or model is Plan
        assert queries() == before


class TestSecrets:
    def test_it_never_shows_the_secret_hash_or_the_raw_key(self, staff_client, world):
        key, raw = world["key"], world["raw"]
        secret = raw[len("sk-sluice-") + 9 : -6]
        issue_event = AuditEvent.objects.get(action="apikey.issue", target_id=str(key.pk))
        pages = [
            admin_url(ApiKey, "changelist"),
            admin_url(ApiKey, "change", key.pk),
            admin_url(ApiKey, "history", key.pk),
            admin_url(AuditEvent, "changelist"),
            admin_url(AuditEvent, "change", issue_event.pk),
            admin_url(Tenant, "change", key.tenant_id),
            admin_url(CallLog, "changelist"),
            admin_url(CallLog, "change", CallLog.objects.first().pk),
        ]
        for url in pages:
            html = staff_client.get(url).content.decode()
            assert key.secret_hash not in html, url
            assert raw not in html, url
            assert secret not in html, url
            assert not RAW_KEY.search(html), url
        assert key.display_prefix in staff_client.get(pages[1]).content.decode()

    def test_it_issues_a_key_from_the_add_form_and_shows_it_exactly_once(
        self, staff_client, world, alpha
    ):
        response = staff_client.post(
            admin_url(ApiKey, "add"),
            {"tenant": alpha.pk, "name": "from admin", "scopes": ["inference", "manage.read"]},
        )
        assert response.status_code == 200
        html = response.content.decode()
        found = RAW_KEY.findall(html)
        assert len(found) == 1
        assert "will not be shown again" in html
        assert "no-store" in response["Cache-Control"] or "no-cache" in response["Cache-Control"]
        key = ApiKey.objects.authenticate(found[0])
        assert key is not None and key.name == "from admin" and key.tenant == alpha
        assert key.scopes == ["inference", "manage.read"]
        assert AuditEvent.objects.filter(action="apikey.issue", target_id=str(key.pk)).exists()
        later = staff_client.get(admin_url(ApiKey, "change", key.pk)).content.decode()
        assert found[0] not in later and not RAW_KEY.search(later)

    def test_it_refuses_to_issue_a_key_for_a_suspended_tenant_with_a_form_error(
        self, staff_client, world, beta
    ):
        services.tenant_suspend(tenant=beta, actor=Actor(user=None))
        response = staff_client.post(
            admin_url(ApiKey, "add"), {"tenant": beta.pk, "name": "x", "scopes": ["inference"]}
        )
        assert response.status_code == 200
        assert "suspended tenant cannot issue keys" in response.content.decode()
        assert not ApiKey.objects.filter(tenant=beta).exists()

    def test_it_refuses_an_expiry_at_the_end_of_the_calendar_with_a_form_error(
        self, staff_client, world, alpha
    ):
        response = staff_client.post(
            admin_url(ApiKey, "add"),
            {
                "tenant": alpha.pk,
                "name": "forever",
                "scopes": ["inference"],
                "expires_at_0": "9999-12-31",
                "expires_at_1": "12:00:00",
            },
        )
        assert response.status_code == 200
        assert "The expiry can be at most 9999-12-30" in response.content.decode()
        assert not ApiKey.objects.filter(name="forever").exists()

    def test_it_lets_no_key_field_but_the_name_change(self, staff_client, world):
        key = world["key"]
        url = admin_url(ApiKey, "change", key.pk)
        response = staff_client.post(
            url,
            {
                "name": "renamed",
                "scopes": "manage.write",
                "revoked_at_0": "2020-01-01",
                "secret_hash": "0" * 64,
                "prefix": "zzzzzzzz",
            },
        )
        assert response.status_code == 302
        key.refresh_from_db()
        assert key.name == "renamed"
        assert key.scopes == ["inference"] and key.revoked_at is None
        assert ApiKey.objects.authenticate(world["raw"]) == key
        assert AuditEvent.objects.filter(action="apikey.rename", target_id=str(key.pk)).exists()

    def test_it_does_not_let_keys_be_deleted(self, staff_client, world):
        key = world["key"]
        assert (
            staff_client.post(admin_url(ApiKey, "delete", key.pk), {"post": "yes"}).status_code
            == 403
        )
        assert ApiKey.objects.filter(pk=key.pk).exists()


class TestBulkActions:
    @pytest.fixture
    def pending(self, world, alpha, bob, embedding_deployment):
        second = services.access_request_create(
            tenant=alpha,
            kind=AccessRequest.Kind.SUBSCRIBE_DEPLOYMENT,
            deployment=embedding_deployment,
            actor=Actor(user=bob),
        )
        first = AccessRequest.objects.get(
            tenant=alpha, kind="subscribe_deployment", state="pending", deployment__task="chat"
        )
        return [first, second]

    def test_it_approves_selected_access_requests_through_the_service(
        self, staff_client, pending, root, alpha
    ):
        response = run_action(
            staff_client, AccessRequest, "approve_selected", pending, note="capacity is fine"
        )
        assert "Approved 2 access requests." in message_texts(response)
        for request_ in pending:
            request_.refresh_from_db()
            assert request_.state == "approved" and request_.reviewer == root
            assert request_.review_note == "capacity is fine"
            assert AuditEvent.objects.filter(
                action="access_request.approve", target_id=str(request_.pk), actor=root
            ).exists()
        assert Subscription.objects.filter(tenant=alpha, revoked_at__isnull=True).count() == 2

    def test_it_rejects_selected_access_requests(self, staff_client, pending, root):
        response = run_action(staff_client, AccessRequest, "reject_selected", pending, note="no")
        assert "Rejected 2 access requests." in message_texts(response)
        for request_ in pending:
            request_.refresh_from_db()
            assert request_.state == "rejected" and request_.reviewer == root
        assert AuditEvent.objects.filter(action="access_request.reject").count() == 2
        assert not Subscription.objects.filter(access_request__in=pending).exists()

    def test_it_reports_an_illegal_transition_per_object_and_carries_on(
        self, staff_client, pending, alice
    ):
        rejected, still_pending = pending
        services.access_request_reject(access_request=rejected, actor=Actor(user=alice))
        response = run_action(staff_client, AccessRequest, "approve_selected", pending)
        assert response.status_code == 200
        texts = message_texts(response)
        assert any("already rejected" in text for text in texts)
        assert "Approved 1 access request." in texts
        rejected.refresh_from_db()
        still_pending.refresh_from_db()
        assert rejected.state == "rejected" and still_pending.state == "approved"
        assert not AuditEvent.objects.filter(
            action="access_request.approve", target_id=str(rejected.pk)
        ).exists()

    def test_it_decides_one_request_from_its_page_with_a_note(self, staff_client, pending, root):
        request_ = pending[0]
        url = admin_url(AccessRequest, "change", request_.pk)
        page = staff_client.get(url).content.decode()
        assert 'name="_approve"' in page and 'name="_reject"' in page
        response = staff_client.post(url, {"_reject": "Reject", "decision_note": "not yet"})
        assert response.status_code == 302
        request_.refresh_from_db()
        assert (request_.state, request_.review_note, request_.reviewer) == (
            "rejected",
            "not yet",
            root,
        )
        decided = staff_client.get(url)
        assert decided.status_code == 200 and 'name="_approve"' not in decided.content.decode()
        again = staff_client.post(url, {"_approve": "Approve"}, follow=True)
        assert again.status_code == 200
        assert any("already rejected" in text for text in message_texts(again))
        request_.refresh_from_db()
        assert request_.state == "rejected"

    def test_it_revokes_selected_keys(self, staff_client, world, alpha, bob):
        other, other_raw = services.api_key_issue(tenant=alpha, name="two", actor=Actor(user=bob))
        response = run_action(staff_client, ApiKey, "revoke_selected", [world["key"], other])
        assert "Revoked 2 API keys." in message_texts(response)
        assert ApiKey.objects.authenticate(world["raw"]) is None
        assert ApiKey.objects.authenticate(other_raw) is None
        assert AuditEvent.objects.filter(action="apikey.revoke").count() == 2
        again = run_action(staff_client, ApiKey, "revoke_selected", [other])
        assert any("already revoked" in text for text in message_texts(again))

    def test_it_revokes_one_key_from_its_page(self, staff_client, world):
        key = world["key"]
        url = admin_url(ApiKey, "change", key.pk)
        assert 'name="_revoke"' in staff_client.get(url).content.decode()
        assert staff_client.post(url, {"_revoke": "1"}).status_code == 302
        assert ApiKey.objects.authenticate(world["raw"]) is None
        assert 'name="_revoke"' not in staff_client.get(url).content.decode()

    def test_it_suspends_selected_tenants_and_their_keys_stop_working(
        self, staff_client, world, alpha, beta, charlie
    ):
        _, beta_raw = services.api_key_issue(tenant=beta, name="b", actor=Actor(user=charlie))
        response = run_action(
            staff_client, Tenant, "suspend_selected", [alpha, beta], note="unpaid invoice"
        )
        assert "Suspended 2 tenants." in message_texts(response)
        for tenant in (alpha, beta):
            tenant.refresh_from_db()
            assert tenant.status == "suspended" and tenant.suspended_reason == "unpaid invoice"
        assert ApiKey.objects.authenticate(world["raw"]) is None
        assert ApiKey.objects.authenticate(beta_raw) is None
        assert AuditEvent.objects.filter(action="tenant.suspend").count() == 2

        response = run_action(staff_client, Tenant, "reactivate_selected", [alpha])
        assert "Reactivated 1 tenant." in message_texts(response)
        assert ApiKey.objects.authenticate(world["raw"]) == world["key"]
        assert ApiKey.objects.authenticate(beta_raw) is None

    def test_it_revokes_selected_subscriptions(self, staff_client, world):
        subscription = world["subscription"]
        response = run_action(staff_client, Subscription, "revoke_selected", [subscription])
        assert "Revoked 1 subscription." in message_texts(response)
        subscription.refresh_from_db()
        assert subscription.revoked_at is not None
        assert AuditEvent.objects.filter(action="subscription.revoke").exists()


class TestTenantForm:
    def test_it_suspends_through_the_service_when_the_status_is_changed_by_hand(
        self, staff_client, world, alpha
    ):
        url = admin_url(Tenant, "change", alpha.pk)
        data = changeform_data(staff_client.get(url))
        data |= {"status": "suspended", "suspended_reason": "abuse report"}
        response = staff_client.post(url, data)
        assert response.status_code == 302, response.context["adminform"].form.errors
        alpha.refresh_from_db()
        assert (alpha.status, alpha.suspended_reason) == ("suspended", "abuse report")
        event = AuditEvent.objects.get(action="tenant.suspend", tenant=alpha)
        assert event.after["reason"] == "abuse report"
        assert ApiKey.objects.authenticate(world["raw"]) is None

    def test_it_refuses_to_leave_a_tenant_without_an_owner(self, staff_client, world, alpha):
        url = admin_url(Tenant, "change", alpha.pk)
        response = staff_client.get(url)
        data = changeform_data(response)
        formset = next(
            inline.formset
            for inline in response.context["inline_admin_formsets"]
            if inline.formset.model is Membership
        )
        for index, form in enumerate(formset.forms):
            if form.instance.role == Role.OWNER:
                data[f"{formset.prefix}-{index}-role"] = Role.ADMIN
        refused = staff_client.post(url, data)
        assert refused.status_code == 200
        assert "must keep at least one owner" in refused.content.decode()
        assert Membership.objects.filter(tenant=alpha, role=Role.OWNER).count() == 1

    def test_it_changes_roles_from_the_inline_through_the_service(
        self, staff_client, world, alpha, bob
    ):
        url = admin_url(Tenant, "change", alpha.pk)
        response = staff_client.get(url)
        data = changeform_data(response)
        formset = next(
            inline.formset
            for inline in response.context["inline_admin_formsets"]
            if inline.formset.model is Membership
        )
        index = next(i for i, form in enumerate(formset.forms) if form.instance.user == bob)
        data[f"{formset.prefix}-{index}-role"] = Role.ADMIN
        assert staff_client.post(url, data).status_code == 302
        assert Membership.objects.get(tenant=alpha, user=bob).role == Role.ADMIN
        assert AuditEvent.objects.filter(action="member.change_role", tenant=alpha).exists()

    def test_it_creates_a_tenant_through_the_service(self, staff_client, plan):
        response = staff_client.post(
            admin_url(Tenant, "add"),
            {
                "name": "Gamma",
                "slug": "gamma",
                "plan": plan.pk,
                "status": "active",
                "memberships-TOTAL_FORMS": "0",
                "memberships-INITIAL_FORMS": "0",
                "quota_override-TOTAL_FORMS": "0",
                "quota_override-INITIAL_FORMS": "0",
            },
        )
        assert response.status_code == 302
        tenant = Tenant.objects.get(slug="gamma")
        assert AuditEvent.objects.filter(action="tenant.create", tenant=tenant).exists()

    def test_it_adds_members_with_an_audit_row_and_autocompletes_users(
        self, staff_client, world, beta, bob
    ):
        response = staff_client.post(
            admin_url(Membership, "add"), {"user": bob.pk, "tenant": beta.pk, "role": "viewer"}
        )
        assert response.status_code == 302
        membership = Membership.objects.get(user=bob, tenant=beta)
        assert AuditEvent.objects.filter(action="member.add", target_id=str(membership.pk)).exists()
        assert set(admin.site._registry[Membership].autocomplete_fields) == {"user", "tenant"}
        found = staff_client.get(
            reverse("admin:autocomplete"),
            {
                "app_label": "tenants",
                "model_name": "membership",
                "field_name": "user",
                "term": "bo",
            },
        )
        assert [item["text"] for item in found.json()["results"]] == ["bob"]


class TestAuditEvents:
    def test_it_shows_audit_events_read_only(self, staff_client, world, root):
        event = AuditEvent.objects.filter(action="apikey.issue").first()
        url = admin_url(AuditEvent, "change", event.pk)
        page = staff_client.get(url)
        assert page.status_code == 200
        html = page.content.decode()
        assert 'name="_save"' not in html and "sluice-json" in html
        refused = staff_client.post(url, {"action": "forged", "target_repr": "forged"})
        assert refused.status_code == 403
        assert (
            staff_client.post(
                admin_url(AuditEvent, "delete", event.pk), {"post": "yes"}
            ).status_code
            == 403
        )
        assert staff_client.get(admin_url(AuditEvent, "add")).status_code == 403
        event.refresh_from_db()
        assert event.action == "apikey.issue"
        model_admin = admin.site._registry[AuditEvent]
        request = page.wsgi_request
        assert not model_admin.has_delete_permission(request, event)
        assert not model_admin.has_change_permission(request, event)
        assert "delete_selected" not in model_admin.get_actions(request)

    def test_it_filters_audit_events_by_action_and_tenant(self, staff_client, world, alpha):
        url = admin_url(AuditEvent, "changelist")
        rows = staff_client.get(url, {"action": "apikey.issue", "tenant__id__exact": alpha.pk})
        assert [event.action for event in rows.context["cl"].result_list] == ["apikey.issue"]


class TestPromptApi:
    def _inline(self, response, published: bool):
        label = "published version" if published else "draft version"
        return next(
            inline
            for inline in response.context["inline_admin_formsets"]
            if inline.opts.verbose_name == label
        )

    def test_it_shows_published_versions_read_only_and_undeletable(self, staff_client, world):
        prompt_api = world["prompt_api"]
        url = admin_url(PromptApi, "change", prompt_api.pk)
        response = staff_client.get(url)
        published = self._inline(response, published=True)
        assert not published.has_change_permission and not published.has_delete_permission
        assert not published.has_add_permission
        assert [form.instance.number for form in published.formset.forms] == [1]
        assert all("messages" not in form.fields for form in published.formset.forms)
        drafts = self._inline(response, published=False)
        assert [form.instance.number for form in drafts.formset.forms] == [2]
        assert "messages" in drafts.formset.forms[0].fields

        # A forged post of the published row changes nothing.
        data = changeform_data(response)
        data[f"{published.formset.prefix}-0-messages"] = '[{"role": "user", "content": "evil"}]'
        data[f"{published.formset.prefix}-0-DELETE"] = "on"
        assert staff_client.post(url, data).status_code == 302
        version = prompt_api.versions.get(number=1)
        assert version.messages == MESSAGES

        version_url = admin_url(PromptApiVersion, "change", version.pk)
        assert staff_client.post(version_url, {"changelog": "x"}).status_code == 403
        assert (
            staff_client.post(
                admin_url(PromptApiVersion, "delete", version.pk), {"post": "yes"}
            ).status_code
            == 403
        )
        assert PromptApiVersion.objects.filter(pk=version.pk).exists()

    def test_it_refuses_a_bad_schema_in_the_inline_with_a_form_error(
        self, staff_client, world, chat_deployment
    ):
        prompt_api = world["prompt_api"]
        url = admin_url(PromptApi, "change", prompt_api.pk)
        response = staff_client.get(url)
        data = changeform_data(response)
        prefix = self._inline(response, published=False).formset.prefix
        data[f"{prefix}-TOTAL_FORMS"] = "2"
        data |= {
            f"{prefix}-1-deployment": str(chat_deployment.pk),
            f"{prefix}-1-output_type": "text",
            f"{prefix}-1-messages": '[{"role": "user", "content": "{{text}}"}]',
            f"{prefix}-1-input_schema": '{"type": "object", "properties": {"text": {"type": 5}}}',
            f"{prefix}-1-parameters": "{}",
        }
        refused = staff_client.post(url, data)
        assert refused.status_code == 200
        assert "input_schema is not a valid JSON Schema" in refused.content.decode()
        assert prompt_api.versions.count() == 2

        data[f"{prefix}-1-input_schema"] = '{"type": "object", "properties": {"text": {}}}'
        assert staff_client.post(url, data).status_code == 302
        created = prompt_api.versions.get(number=3)
        assert created.state == "draft" and created.created_by is not None
        assert AuditEvent.objects.filter(
            action="prompt_api.version_create", target_id=str(created.pk)
        ).exists()

    @pytest.mark.parametrize(
        ("field", "text"),
        [
            ("messages", "[" * 5000 + "]" * 5000),
            ("messages", '[{"role": "user", "content": "{{text}}\\u0000"}]'),
            ("input_schema", '{"type": "object", "properties": {"text": {}}, "x": NaN}'),
            ("parameters", '{"temperature": NaN}'),
        ],
        ids=["deep", "nul", "nan-schema", "nan-parameters"],
    )
    def test_it_refuses_json_postgresql_cannot_store_in_a_draft(
        self, staff_client, world, field, text
    ):
        staff_client.raise_request_exception = False
        prompt_api = world["prompt_api"]
        url = admin_url(PromptApi, "change", prompt_api.pk)
        response = staff_client.get(url)
        data = changeform_data(response)
        prefix = self._inline(response, published=False).formset.prefix
        data[f"{prefix}-0-{field}"] = text
        refused = staff_client.post(url, data)
        assert refused.status_code == 200
        assert "cannot be stored" in refused.content.decode() or "Enter a valid JSON" in (
            refused.content.decode()
        )
        draft = prompt_api.versions.get(number=2)
        assert (draft.messages, draft.parameters) == (MESSAGES, {})

    def test_it_publishes_a_draft_from_its_page_through_the_service(self, staff_client, world):
        draft = world["prompt_api"].versions.get(number=2)
        url = admin_url(PromptApiVersion, "change", draft.pk)
        assert 'name="_publish"' in staff_client.get(url).content.decode()
        assert staff_client.post(url, {"_publish": "1"}).status_code == 302
        draft.refresh_from_db()
        assert draft.is_published
        prompt_api = PromptApi.objects.get(pk=draft.prompt_api_id)
        assert prompt_api.active_version == draft
        assert AuditEvent.objects.filter(
            action="prompt_api.version_publish", target_id=str(draft.pk)
        ).exists()
        assert 'name="_publish"' not in staff_client.get(url).content.decode()

    def test_it_publishes_selected_drafts_and_reports_refusals(
        self, staff_client, world, alpha, alice, chat_deployment
    ):
        owned = gateway_services.prompt_api_create(
            tenant=alpha, slug="alpha-bot", name="Alpha bot", actor=Actor(user=alice)
        )
        unsubscribed = gateway_services.prompt_api_version_create(
            prompt_api=owned,
            messages=MESSAGES,
            input_schema=SCHEMA,
            deployment=chat_deployment,
            actor=Actor(user=alice),
        )
        draft = world["prompt_api"].versions.get(number=2)
        response = run_action(
            staff_client, PromptApiVersion, "publish_selected", [draft, unsubscribed]
        )
        texts = message_texts(response)
        assert "Published 1 prompt-API version." in texts
        assert any("no approved subscription" in text for text in texts)
        draft.refresh_from_db()
        unsubscribed.refresh_from_db()
        assert draft.is_published and not unsubscribed.is_published


class TestDeployment:
    def test_it_creates_and_updates_deployments_through_the_services(self, staff_client, root):
        response = staff_client.post(
            admin_url(ModelDeployment, "add"),
            {
                "slug": "qwen-0.5b",
                "name": "Qwen",
                "task": "chat",
                "backend": "workers.backends.fixed.FixedLatencyBackend",
                "backend_config": "",
                "capacity": "4",
                "max_batch_size": "8",
                "max_wait_ms": "10",
                "default_deadline_s": "30",
                "enabled": "on",
            },
        )
        assert response.status_code == 302
        deployment = ModelDeployment.objects.get(slug="qwen-0.5b")
        assert deployment.backend_config == {} and deployment.queue_name == "deploy.qwen-0.5b"
        assert AuditEvent.objects.filter(action="deployment.create", actor=root).exists()

        url = admin_url(ModelDeployment, "change", deployment.pk)
        data = changeform_data(staff_client.get(url)) | {"capacity": "16"}
        assert staff_client.post(url, data).status_code == 302
        deployment.refresh_from_db()
        assert deployment.capacity == 16
        event = AuditEvent.objects.get(action="deployment.update", target_id=str(deployment.pk))
        assert (event.before, event.after) == ({"capacity": 4}, {"capacity": 16})
        assert (
            b"deploy.qwen-0.5b"
            in staff_client.get(admin_url(ModelDeployment, "changelist")).content
        )

    @pytest.mark.parametrize(
        "config",
        [
            '{"x": NaN}',
            '{"x": 1e400}',
            '{"x": "a\\u0000b"}',
            '{"x": "a\\ud800b"}',
            "[" * 70 + "]" * 70,
            "[" * 5000 + "]" * 5000,
            '{"x": ' + "9" * 5000 + "}",
        ],
        ids=["nan", "inf", "nul", "surrogate", "deep", "deeper", "long-number"],
    )
    def test_it_refuses_a_backend_config_postgresql_cannot_store(self, staff_client, config):
        staff_client.raise_request_exception = False
        response = staff_client.post(
            admin_url(ModelDeployment, "add"),
            {
                "slug": "qwen-0.5b",
                "name": "Qwen",
                "task": "chat",
                "backend": "workers.backends.fixed.FixedLatencyBackend",
                "backend_config": config,
                "capacity": "4",
                "max_batch_size": "8",
                "max_wait_ms": "10",
                "default_deadline_s": "30",
            },
        )
        assert response.status_code == 200
        assert response.context["adminform"].form.errors["backend_config"]
        assert not ModelDeployment.objects.exists()

    def test_it_disables_selected_deployments(self, staff_client, chat_deployment):
        response = run_action(staff_client, ModelDeployment, "disable_selected", [chat_deployment])
        assert "Disabled 1 model deployment." in message_texts(response)
        chat_deployment.refresh_from_db()
        assert not chat_deployment.enabled
        assert AuditEvent.objects.filter(action="deployment.update").exists()


class TestCallLog:
    def test_it_shows_call_logs_read_only(self, staff_client, world):
        log = CallLog.objects.get(request_id="req-full")
        url = admin_url(CallLog, "change", log.pk)
        page = staff_client.get(url)
        assert page.status_code == 200 and "queue_full" in page.content.decode()
        assert staff_client.post(url, {"status_code": "200"}).status_code == 403
        assert staff_client.get(admin_url(CallLog, "add")).status_code == 403
        assert (
            staff_client.post(admin_url(CallLog, "delete", log.pk), {"post": "yes"}).status_code
            == 403
        )

    def test_it_renders_a_call_log_whose_key_was_deleted(self, staff_client, world, alpha):
        orphan = CallLog.objects.create(
            request_id="req-orphan",
            tenant=alpha,
            api_key_id=999_999,
            deployment_id=999_999,
            status_code=200,
            total_ms=1.0,
            created_at=timezone.now() - timedelta(hours=1),
        )
        assert staff_client.get(admin_url(CallLog, "changelist")).status_code == 200
        assert staff_client.get(admin_url(CallLog, "change", orphan.pk)).status_code == 200


class TestAdminLookups:
    def test_a_year_too_large_for_a_date_is_a_bad_lookup_not_a_500(self, client, root):
        client.force_login(root)
        response = client.get("/admin/tenants/tenant/?created_at__year=99999999999999999999")
        assert response.status_code == 302
        assert response["Location"].endswith("?e=1")


class TestDeploymentTaskInTheAdmin:
    def test_a_task_a_published_prompt_api_cannot_run_on_is_a_form_error(
        self, staff_client, alpha, alice, chat_deployment, subscribe
    ):
        from tests.conftest import published_text_prompt_api

        subscribe(alpha, chat_deployment)
        published_text_prompt_api(tenant=alpha, user=alice, deployment=chat_deployment)
        url = admin_url(ModelDeployment, "change", chat_deployment.pk)
        data = changeform_data(staff_client.get(url)) | {"task": "embedding"}
        response = staff_client.post(url, data)
        assert response.status_code == 200  # the form again, with its error
        assert "wrap" in response.content.decode()
        chat_deployment.refresh_from_db()
        assert chat_deployment.task == "chat"
