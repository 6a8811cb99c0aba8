"""The platform admins' console for tenants, plans, members, keys, requests and audit.

Every change that matters goes through tenants.services, as it does from the API and the
tenant console, so the admin writes the same audit rows and cache invalidations: bulk
actions call a service per object and report each refusal (SluiceError) as a message
instead of failing the whole batch; change forms route their edits to the services in
save_model / save_formset. Secrets never reach a page: ApiKey.secret_hash is excluded
everywhere, and a raw key exists only in the one response that issues it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.contrib.admin.utils import model_ngettext, unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models as db_models
from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.dateformat import format as date_format
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.timezone import localtime

from sluice.admin_base import SluiceModelAdmin
from sluice.errors import SluiceError
from sluice.redisconn import publish_invalidation_on_commit

from . import services
from .models import (
    KEY_PREFIX,
    QUOTA_FIELDS,
    AccessRequest,
    ApiKey,
    AuditEvent,
    Membership,
    Plan,
    QuotaOverride,
    Role,
    Scope,
    Subscription,
    Tenant,
)
from .policy import Actor

# --- helpers shared by the three admin modules ---------------------------------------------


def actor_for(request: HttpRequest) -> Actor:
    return Actor(user=request.user)


def badge(label: str, tone: str) -> str:
    """A coloured pill; tones are styled in templates/admin/base_site.html."""
    return format_html('<span class="sluice-badge sluice-badge--{}">{}</span>', tone, label)


def pretty_json(value: Any) -> str:
    if value in (None, {}, []):
        return "—"
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return format_html('<pre class="sluice-json">{}</pre>', text)


def when(field: str, description: str, *, seconds: bool = False):
    """A compact, sortable date-time column ("2025-03-01 14:05") for changelists."""
    pattern = "Y-m-d H:i:s" if seconds else "Y-m-d H:i"

    @admin.display(description=description, ordering=field)
    def column(self, obj) -> str:
        value = getattr(obj, field)
        if value is None:
            return "—"
        return format_html(
            '<span class="sluice-nowrap">{}</span>', date_format(localtime(value), pattern)
        )

    return column


def number(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def changelist_link(model: type[db_models.Model], label: object, **filters: object) -> str:
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, urlencode(filters), label)


def change_link(obj: db_models.Model | None, label: object = None) -> str:
    if obj is None:
        return "—"
    opts = obj._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, obj if label is None else label)


def adopt(obj: db_models.Model, saved: db_models.Model) -> None:
    """Make the admin's unsaved instance the row a service created, so the admin's own
    follow-up (inlines, the change message, the redirect) sees its primary key."""
    for field in saved._meta.concrete_fields:
        setattr(obj, field.attname, getattr(saved, field.attname))
    obj._state.adding = False
    obj._state.db = saved._state.db


def run_each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    objects: Iterable[db_models.Model],
    call: Callable[[Any], Any],
    *,
    verb: str,
    skip: Callable[[Any], bool] | None = None,
    skipped_note: str = "",
) -> int:
    """Call a service for each object, report each refusal, then how many succeeded."""
    done = skipped = 0
    for obj in objects:
        if skip is not None and skip(obj):
            skipped += 1
            continue
        try:
            call(obj)
        except SluiceError as exc:
            modeladmin.message_user(request, f"{obj}: {exc.message}", level=messages.ERROR)
        else:
            done += 1
    opts = modeladmin.model._meta
    if done:
        text = f"{verb} {done} {model_ngettext(opts, done)}."
        if skipped:
            text += f" {skipped} {skipped_note}."
        modeladmin.message_user(request, text, level=messages.SUCCESS)
    elif skipped:
        modeladmin.message_user(
            request, f"Nothing to do: {skipped} {skipped_note}.", level=messages.WARNING
        )
    return done


def subquery_count(model: type[db_models.Model], **filters: object) -> Coalesce:
    """A per-row count as a subquery, so several counts never multiply each other's joins."""
    counted = (
        model.objects.filter(tenant=OuterRef("pk"), **filters)
        .order_by()
        .values("tenant")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(counted), 0)


def titled(title: str) -> type[admin.RelatedFieldListFilter]:
    """A related-object filter with a readable title ("prompt-API", not "prompt api")."""

    class Filter(admin.RelatedFieldListFilter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.title = title

    return Filter


class NoteActionForm(ActionForm):
    """The action bar with a free-text box, passed to actions that take a reason or note."""

    note = forms.CharField(
        required=False,
        label="Note (optional):",
        widget=forms.TextInput(attrs={"size": 40, "placeholder": "Reason, shown in the audit log"}),
    )


def action_note(request: HttpRequest) -> str:
    return request.POST.get("note", "").strip()


# --- plans ------------------------------------------------------------------------------


@admin.register(Plan)
class PlanAdmin(SluiceModelAdmin):
    list_display = [
        "name",
        "slug",
        "rpm",
        "tpm",
        "budget",
        "cap",
        "priority",
        "fair_share_weight",
        "requires_platform_approval",
        "tenant_count",
    ]
    list_filter = ["priority", "requires_platform_approval"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    date_hierarchy = "created_at"
    readonly_fields = ["created_at"]
    fieldsets = [
        (None, {"fields": ["name", "slug", "description"]}),
        (
            "Limits",
            {
                "fields": [
                    "requests_per_minute",
                    "tokens_per_minute",
                    "monthly_token_budget",
                    "max_tokens_cap",
                ],
                "description": "A tenant's approved quota override wins over these.",
            },
        ),
        ("Scheduling", {"fields": ["priority", "fair_share_weight"]}),
        ("Review", {"fields": ["requires_platform_approval", "created_at"]}),
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_tenants=Count("tenants"))

    @admin.display(description="Req/min per key", ordering="requests_per_minute")
    def rpm(self, plan: Plan) -> str:
        return number(plan.requests_per_minute)

    @admin.display(description="Tokens/min", ordering="tokens_per_minute")
    def tpm(self, plan: Plan) -> str:
        return number(plan.tokens_per_minute)

    @admin.display(description="Monthly tokens", ordering="monthly_token_budget")
    def budget(self, plan: Plan) -> str:
        return number(plan.monthly_token_budget)

    @admin.display(description="max_tokens cap", ordering="max_tokens_cap")
    def cap(self, plan: Plan) -> str:
        return number(plan.max_tokens_cap)

    @admin.display(description="Tenants", ordering="n_tenants")
    def tenant_count(self, plan: Plan) -> str:
        return changelist_link(Tenant, plan.n_tenants, plan__id__exact=plan.pk)

    def save_model(self, request, obj, form, change):
        # No plan service exists; the admin is the only writer, so it audits here and
        # tells the gateways that every tenant on the plan has new limits.
        actor = actor_for(request)
        if not change:
            obj.save()
            services.audit_record(
                actor=actor,
                action="plan.create",
                target=obj,
                after={name: form.cleaned_data[name] for name in form.changed_data},
            )
            return
        changed = list(form.changed_data)
        if not changed:
            return
        before = {name: form.initial.get(name) for name in changed}
        obj.save(update_fields=changed)
        services.audit_record(
            actor=actor,
            action="plan.update",
            target=obj,
            before=before,
            after={name: getattr(obj, name) for name in changed},
        )
        for tenant_id in obj.tenants.values_list("pk", flat=True):
            publish_invalidation_on_commit("tenant", tenant_id)


# --- tenants ----------------------------------------------------------------------------


class MembershipInlineForm(forms.ModelForm):
    class Meta:
        model = Membership
        fields = ["user", "role"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            # Moving a membership to another user is not a thing: remove and add instead.
            self.fields["user"].disabled = True
            widget = self.fields["user"].widget
            widget.can_add_related = widget.can_change_related = False
            widget.can_delete_related = False


class MembershipInlineFormSet(forms.BaseInlineFormSet):
    def clean(self):
        super().clean()
        if any(self.errors):
            return
        had_owner = any(form.initial.get("role") == Role.OWNER for form in self.initial_forms)
        keeps_owner = any(
            form.cleaned_data.get("role") == Role.OWNER
            for form in self.forms
            if form.cleaned_data and not self._should_delete_form(form)
        )
        if had_owner and not keeps_owner:
            raise ValidationError(
                "A tenant must keep at least one owner: make someone else an owner before "
                "removing or demoting the last one."
            )


class MembershipInline(admin.TabularInline):
    model = Membership
    form = MembershipInlineForm
    formset = MembershipInlineFormSet
    autocomplete_fields = ["user"]
    readonly_fields = ["created_at"]
    fields = ["user", "role", "created_at"]
    extra = 0
    verbose_name = "member"
    verbose_name_plural = "Members"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user")


class QuotaOverrideInline(admin.StackedInline):
    model = QuotaOverride
    fields = [*QUOTA_FIELDS, "updated_at"]
    readonly_fields = ["updated_at"]
    max_num = 1
    extra = 0
    verbose_name_plural = "Quota override (empty fields use the plan's limits)"


@admin.register(Tenant)
class TenantAdmin(SluiceModelAdmin):
    list_display = [
        "name",
        "slug",
        "plan",
        "status_badge",
        "members",
        "live_keys",
        "pending_requests",
        "created",
    ]
    list_filter = ["status", "plan"]
    search_fields = ["name", "slug", "plan__name", "suspended_reason"]
    list_select_related = ["plan"]
    date_hierarchy = "created_at"
    inlines = [MembershipInline, QuotaOverrideInline]
    action_form = NoteActionForm
    actions = ["suspend_selected", "reactivate_selected"]
    autocomplete_fields = ["plan"]

    def has_delete_permission(self, request, obj=None):
        # Suspend instead: deleting would cascade to keys, requests and prompt-APIs and
        # cut the audit history loose from the tenant, and no service exists for it.
        return False

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("plan", "quota_override")  # list_select_related is skipped once set
            .annotate(
                n_members=subquery_count(Membership),
                n_live_keys=subquery_count(ApiKey, revoked_at__isnull=True),
                n_pending=subquery_count(AccessRequest, state=AccessRequest.State.PENDING),
            )
        )

    def get_fieldsets(self, request, obj=None):
        fieldsets = [
            (None, {"fields": ["name", "slug", "plan"]}),
            (
                "Status",
                {
                    "fields": ["status", "suspended_reason"],
                    "description": (
                        "Suspending a tenant disables all of its API keys at once, "
                        "everywhere; reactivating restores them."
                    ),
                },
            ),
        ]
        if obj is not None:
            fieldsets.append(("Limits in force", {"fields": ["limits_in_force", "created_at"]}))
        return fieldsets

    def get_readonly_fields(self, request, obj=None):
        # The slug is in URLs and API clients' configuration: fixed once created.
        return ["slug", "limits_in_force", "created_at"] if obj else []

    def get_prepopulated_fields(self, request, obj=None):
        return {} if obj else {"slug": ["name"]}

    created = when("created_at", "Created")

    @admin.display(description="Status", ordering="status")
    def status_badge(self, tenant: Tenant) -> str:
        if tenant.is_active:
            return badge("active", "ok")
        return badge("suspended", "bad")

    @admin.display(description="Members", ordering="n_members")
    def members(self, tenant: Tenant) -> str:
        return changelist_link(Membership, tenant.n_members, tenant__id__exact=tenant.pk)

    @admin.display(description="Live keys", ordering="n_live_keys")
    def live_keys(self, tenant: Tenant) -> str:
        return changelist_link(
            ApiKey, tenant.n_live_keys, tenant__id__exact=tenant.pk, status="active"
        )

    @admin.display(description="Pending requests", ordering="n_pending")
    def pending_requests(self, tenant: Tenant) -> str:
        if not tenant.n_pending:
            return "0"
        return changelist_link(
            AccessRequest,
            badge(str(tenant.n_pending), "warn"),
            tenant__id__exact=tenant.pk,
            state__exact=AccessRequest.State.PENDING,
        )

    @admin.display(description="Effective limits")
    def limits_in_force(self, tenant: Tenant) -> str:
        limits = tenant.limits()
        rows = [
            ("Requests/min per key", number(limits.requests_per_minute)),
            ("Tokens/min", number(limits.tokens_per_minute)),
            ("Monthly tokens", number(limits.monthly_token_budget)),
            ("max_tokens cap", number(limits.max_tokens_cap)),
            ("Priority", limits.priority),
            ("Fair-share weight", str(limits.fair_share_weight)),
        ]
        return format_html(
            '<table class="sluice-kv">{}</table>',
            format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
        )

    # Changes go through the services: suspension disables keys everywhere on commit.

    def save_model(self, request, obj, form, change):
        actor = actor_for(request)
        data = form.cleaned_data
        if not change:
            created = services.tenant_create(
                name=data["name"], slug=data["slug"], plan=data["plan"], actor=actor
            )
            adopt(obj, created)
            if data["status"] == Tenant.Status.SUSPENDED:
                adopt(
                    obj,
                    services.tenant_suspend(
                        tenant=obj, reason=data.get("suspended_reason", ""), actor=actor
                    ),
                )
            return
        plain = [name for name in ("name", "plan") if name in form.changed_data]
        status_changed = "status" in form.changed_data
        if "suspended_reason" in form.changed_data and not status_changed:
            plain.append("suspended_reason")
        if plain:
            before = {name: form.initial.get(name) for name in plain}
            if "plan" in before:
                before["plan"] = str(Plan.objects.get(pk=before["plan"]))
            obj.save(update_fields=plain)
            services.audit_record(
                actor=actor,
                action="tenant.update",
                target=obj,
                tenant=obj,
                before=before,
                after={name: getattr(obj, name) for name in plain},
            )
            publish_invalidation_on_commit("tenant", obj.pk)
        if status_changed:
            if data["status"] == Tenant.Status.SUSPENDED:
                saved = services.tenant_suspend(
                    tenant=obj, reason=data.get("suspended_reason", ""), actor=actor
                )
            else:
                saved = services.tenant_reactivate(tenant=obj, actor=actor)
            adopt(obj, saved)

    def save_formset(self, request, form, formset, change):
        if formset.model is Membership:
            self._save_memberships(request, form.instance, formset)
        elif formset.model is QuotaOverride:
            self._save_quota(request, form.instance, formset)
        else:
            super().save_formset(request, form, formset, change)

    def _save_memberships(self, request, tenant: Tenant, formset) -> None:
        actor = actor_for(request)
        # commit=False fills new/changed/deleted_objects (the admin's change message
        # reads them) without writing anything; the services do the writing.
        formset.save(commit=False)
        for membership in formset.new_objects:
            membership.tenant = tenant
            membership.save()
            services.audit_record(
                actor=actor,
                action="member.add",
                target=membership,
                tenant=tenant,
                after={"user": membership.user.get_username(), "role": membership.role},
            )
        # Promotions before demotions before removals: the tenant never passes through
        # a state without an owner, which member_change_role/member_remove refuse.
        changed = sorted(formset.changed_objects, key=lambda pair: pair[0].role != Role.OWNER)
        for membership, _fields in changed:
            self._call(
                request,
                services.member_change_role,
                membership=membership,
                role=membership.role,
                actor=actor,
            )
        for membership in formset.deleted_objects:
            self._call(request, services.member_remove, membership=membership, actor=actor)

    def _save_quota(self, request, tenant: Tenant, formset) -> None:
        actor = actor_for(request)
        removed, saved = 0, []
        for quota_form in formset.forms:
            existing = quota_form.instance.pk is not None
            before = {name: quota_form.initial.get(name) for name in QUOTA_FIELDS}
            if formset._should_delete_form(quota_form):
                if existing:  # recorded while the row still has its primary key
                    services.audit_record(
                        actor=actor,
                        action="quota.override_remove",
                        target=quota_form.instance,
                        tenant=tenant,
                        before=before,
                    )
                    removed += 1
            elif quota_form.has_changed():
                saved.append((quota_form, before if existing else {}))
        formset.save()  # also fills the lists the admin's change message reads
        for quota_form, before in saved:
            services.audit_record(
                actor=actor,
                action="quota.override_set",
                target=quota_form.instance,
                tenant=tenant,
                before=before,
                after={name: getattr(quota_form.instance, name) for name in QUOTA_FIELDS},
            )
        if removed or saved:
            publish_invalidation_on_commit("tenant", tenant.pk)

    def _call(self, request, service, **kwargs) -> None:
        try:
            service(**kwargs)
        except SluiceError as exc:
            self.message_user(request, exc.message, level=messages.ERROR)

    @admin.action(
        description="Suspend selected tenants (disables their keys)", permissions=["change"]
    )
    def suspend_selected(self, request, queryset):
        actor, reason = actor_for(request), action_note(request)
        run_each(
            self,
            request,
            queryset,
            lambda tenant: services.tenant_suspend(tenant=tenant, reason=reason, actor=actor),
            verb="Suspended",
            skip=lambda tenant: not tenant.is_active,
            skipped_note="already suspended",
        )

    @admin.action(description="Reactivate selected tenants", permissions=["change"])
    def reactivate_selected(self, request, queryset):
        actor = actor_for(request)
        run_each(
            self,
            request,
            queryset,
            lambda tenant: services.tenant_reactivate(tenant=tenant, actor=actor),
            verb="Reactivated",
            skip=lambda tenant: tenant.is_active,
            skipped_note="already active",
        )


# --- memberships ------------------------------------------------------------------------


class MembershipForm(forms.ModelForm):
    class Meta:
        model = Membership
        fields = ["user", "tenant", "role"]

    def clean_role(self):
        role = self.cleaned_data["role"]
        instance = self.instance
        if (
            instance.pk
            and instance.role == Role.OWNER
            and role != Role.OWNER
            and Membership.objects.filter(tenant_id=instance.tenant_id, role=Role.OWNER).count()
            == 1
        ):
            raise ValidationError(
                "A tenant must keep at least one owner: make someone else an owner first."
            )
        return role


@admin.register(Membership)
class MembershipAdmin(SluiceModelAdmin):
    form = MembershipForm
    list_display = ["user", "user_email", "tenant", "role", "created"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "user__email", "tenant__name", "tenant__slug"]
    list_select_related = ["user", "tenant"]
    autocomplete_fields = ["user", "tenant"]
    date_hierarchy = "created_at"
    actions = ["remove_selected"]

    def get_readonly_fields(self, request, obj=None):
        return ["user", "tenant", "created_at"] if obj else []

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # removal goes through member_remove
        return actions

    created = when("created_at", "Since")

    @admin.display(description="E-mail", ordering="user__email")
    def user_email(self, membership: Membership) -> str:
        return membership.user.email

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.role == Role.OWNER:
            owners = Membership.objects.filter(tenant_id=obj.tenant_id, role=Role.OWNER)
            if owners.count() == 1:
                return False  # the last owner: the service would refuse
        return super().has_delete_permission(request, obj)

    def save_model(self, request, obj, form, change):
        actor = actor_for(request)
        if not change:
            obj.save()
            services.audit_record(
                actor=actor,
                action="member.add",
                target=obj,
                tenant=obj.tenant,
                after={"user": obj.user.get_username(), "role": obj.role},
            )
        elif "role" in form.changed_data:
            adopt(obj, services.member_change_role(membership=obj, role=obj.role, actor=actor))

    def delete_model(self, request, obj):
        services.member_remove(membership=obj, actor=actor_for(request))

    @admin.action(description="Remove selected members from their tenants", permissions=["delete"])
    def remove_selected(self, request, queryset):
        actor = actor_for(request)
        run_each(
            self,
            request,
            queryset,
            lambda membership: services.member_remove(membership=membership, actor=actor),
            verb="Removed",
        )


# --- API keys ---------------------------------------------------------------------------


class KeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "active":
            return queryset.filter(
                Q(expires_at__isnull=True) | Q(expires_at__gt=now), revoked_at__isnull=True
            )
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


class ScopeFilter(admin.SimpleListFilter):
    title = "scope"
    parameter_name = "scope"

    def lookups(self, request, model_admin):
        return Scope.choices

    def queryset(self, request, queryset):
        if self.value() in Scope.values:
            return queryset.filter(scopes__contains=[self.value()])
        return queryset


class ApiKeyIssueForm(forms.ModelForm):
    """The add form: what api_key_issue takes. The secret is generated, never chosen."""

    scopes = forms.MultipleChoiceField(
        choices=Scope.choices,
        initial=[Scope.INFERENCE],
        widget=forms.CheckboxSelectMultiple,
    )

    class Meta:
        model = ApiKey
        fields = ["tenant", "name", "scopes", "expires_at"]

    # The same rules api_key_issue enforces, checked here so they show as form errors.
    def clean_tenant(self):
        tenant = self.cleaned_data["tenant"]
        if not tenant.is_active:
            raise ValidationError("A suspended tenant cannot issue keys; reactivate it first.")
        return tenant

    def clean_expires_at(self):
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise ValidationError("The expiry must be in the future.")
        if expires_at is not None and expires_at > services.LATEST_KEY_EXPIRY:
            raise ValidationError(
                f"The expiry can be at most {services.LATEST_KEY_EXPIRY:%Y-%m-%d %H:%M} UTC."
            )
        return expires_at


@admin.register(ApiKey)
class ApiKeyAdmin(SluiceModelAdmin):
    list_display = [
        "name",
        "key_prefix",
        "tenant",
        "status_badge",
        "scope_list",
        "created_by",
        "last_used",
        "expires",
        "created",
    ]
    list_filter = [
        KeyStatusFilter,
        ScopeFilter,
        "tenant",
        ("last_used_at", admin.EmptyFieldListFilter),
    ]
    search_fields = ["name", "prefix", "tenant__name", "tenant__slug", "created_by__username"]
    list_select_related = ["tenant", "created_by"]
    autocomplete_fields = ["tenant"]
    date_hierarchy = "created_at"
    exclude = ["secret_hash"]  # never rendered, not even read-only
    actions = ["revoke_selected"]

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyIssueForm
        return super().get_form(request, obj, **kwargs)

    def get_fieldsets(self, request, obj=None):
        if obj is not None:
            return super().get_fieldsets(request, obj)
        return [
            (
                None,
                {
                    "fields": self.get_fields(request),
                    "description": (
                        "Sluice generates the secret. The key is shown once, on the next page; "
                        "only a hash of it is stored."
                    ),
                },
            )
        ]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["tenant", "name", "scopes", "expires_at"]
        return [
            "name",
            "key_prefix",
            "tenant",
            "status_badge",
            "scope_list",
            "expires_at",
            "created_by",
            "created_at",
            "last_used_at",
            "revoked_at",
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        # Only the name is editable: scopes, expiry and revocation are cached by the
        # gateways, and only the services invalidate those caches.
        return [name for name in self.get_fields(request, obj) if name != "name"]

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: a deleted key leaves no trace and no invalidation

    def get_search_results(self, request, queryset, search_term):
        # Accept a pasted display prefix ("sk-sluice-abcd1234_…") as well as the bare prefix.
        term = search_term.strip()
        if term.startswith(KEY_PREFIX):
            term = term[len(KEY_PREFIX) :].split("_", 1)[0]
        return super().get_search_results(request, queryset, term)

    last_used = when("last_used_at", "Last used")
    expires = when("expires_at", "Expires")
    created = when("created_at", "Created")

    @admin.display(description="Key", ordering="prefix")
    def key_prefix(self, key: ApiKey) -> str:
        return format_html('<code class="sluice-nowrap">{}</code>', key.display_prefix)

    @admin.display(description="Status")
    def status_badge(self, key: ApiKey) -> str:
        status = key.status
        if status == "revoked":
            return badge("revoked", "bad")
        if status == "expired":
            return badge("expired", "muted")
        if not key.tenant.is_active:
            return badge("tenant suspended", "warn")
        return badge("active", "ok")

    @admin.display(description="Scopes")
    def scope_list(self, key: ApiKey) -> str:
        return ", ".join(key.scopes)

    def save_model(self, request, obj, form, change):
        actor = actor_for(request)
        if not change:
            data = form.cleaned_data
            key, raw = services.api_key_issue(
                tenant=data["tenant"],
                name=data["name"],
                scopes=list(data["scopes"]),
                expires_at=data.get("expires_at"),
                actor=actor,
            )
            adopt(obj, key)
            # Held on this request only, for response_add; never in the session or a message.
            request._sluice_raw_key = raw
            return
        if "name" in form.changed_data:
            obj.save(update_fields=["name"])
            services.audit_record(
                actor=actor,
                action="apikey.rename",
                target=obj,
                tenant=obj.tenant,
                before={"name": form.initial.get("name")},
                after={"name": obj.name},
            )

    def response_add(self, request, obj, post_url_continue=None):
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "API key issued",
            "key": obj,
            "raw_key": request._sluice_raw_key,
            "change_url": reverse("admin:tenants_apikey_change", args=[obj.pk]),
            "add_url": reverse("admin:tenants_apikey_add"),
        }
        response = TemplateResponse(request, "admin/tenants/apikey/issued.html", context)
        add_never_cache_headers(response)
        return response

    def change_view(self, request, object_id, form_url="", extra_context=None):
        key = self.get_object(request, unquote(object_id))
        if request.method == "POST" and "_revoke" in request.POST and key is not None:
            if not self.has_change_permission(request, key):
                raise PermissionDenied
            services.api_key_revoke(key=key, actor=actor_for(request))
            self.message_user(
                request,
                f"Revoked {key}; it stops working everywhere within seconds.",
                level=messages.SUCCESS,
            )
            return HttpResponseRedirect(request.path)
        extra_context = {
            **(extra_context or {}),
            "sluice_can_revoke": key is not None
            and key.revoked_at is None
            and self.has_change_permission(request, key),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke_selected(self, request, queryset):
        actor = actor_for(request)
        run_each(
            self,
            request,
            queryset,
            lambda key: services.api_key_revoke(key=key, actor=actor),
            verb="Revoked",
            skip=lambda key: key.revoked_at is not None,
            skipped_note="already revoked",
        )


# --- access requests --------------------------------------------------------------------


class AccessRequestReviewForm(forms.ModelForm):
    """Nothing of the request is editable; a pending one takes a note for the decision."""

    decision_note = forms.CharField(
        required=False,
        label="Review note",
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Sent with your decision and kept in the audit log.",
    )

    class Meta:
        model = AccessRequest
        fields: list[str] = []


@admin.register(AccessRequest)
class AccessRequestAdmin(SluiceModelAdmin):
    form = AccessRequestReviewForm
    list_display = [
        "state_badge",
        "kind",
        "tenant",
        "target",
        "requester",
        "created",
        "reviewer",
        "decided",
    ]
    list_filter = ["state", "kind", "tenant", "tenant__plan__requires_platform_approval"]
    search_fields = [
        "tenant__name",
        "tenant__slug",
        "requester__username",
        "requester__email",
        "deployment__slug",
        "prompt_api__slug",
        "prompt_api_version__prompt_api__slug",
        "justification",
        "review_note",
    ]
    list_select_related = [
        "tenant",
        "requester",
        "reviewer",
        "deployment",
        "prompt_api",
        "prompt_api_version__prompt_api",
    ]
    date_hierarchy = "created_at"
    action_form = NoteActionForm
    actions = ["approve_selected", "reject_selected"]
    readonly_fields = [
        "kind",
        "tenant",
        "target",
        "quota_asked",
        "requester",
        "justification",
        "state_badge",
        "reviewer",
        "review_note",
        "decided_at",
        "created_at",
    ]

    created = when("created_at", "Filed")
    decided = when("decided_at", "Decided")

    def get_fields(self, request, obj=None):
        fields = list(self.readonly_fields)
        if obj is not None and obj.kind != AccessRequest.Kind.RAISE_QUOTA:
            fields.remove("quota_asked")
        if obj is not None and obj.state == AccessRequest.State.PENDING:
            for undecided in ("reviewer", "review_note", "decided_at"):
                fields.remove(undecided)
        if obj is not None and self._can_decide(request, obj):
            fields.append("decision_note")
        return fields

    def _can_decide(self, request, obj: AccessRequest) -> bool:
        return obj.state == AccessRequest.State.PENDING and super().has_change_permission(
            request, obj
        )

    def has_add_permission(self, request):
        return False  # tenants file requests; staff decide them

    def has_change_permission(self, request, obj=None):
        # A decided request is history: its page is read-only.
        if obj is not None and obj.state != AccessRequest.State.PENDING:
            return False
        return super().has_change_permission(request, obj)

    @admin.display(description="Target")
    def target(self, request_: AccessRequest) -> str:
        return request_.target_label

    @admin.display(description="Limits asked for")
    def quota_asked(self, request_: AccessRequest) -> str:
        return pretty_json(request_.quota)

    @admin.display(description="State", ordering="state")
    def state_badge(self, request_: AccessRequest) -> str:
        tone = {"pending": "warn", "approved": "ok", "rejected": "bad"}.get(request_.state, "muted")
        return badge(request_.get_state_display(), tone)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        if request.method == "POST" and ("_approve" in request.POST or "_reject" in request.POST):
            return self._decide_one(request, object_id)
        obj = self.get_object(request, unquote(object_id))
        extra_context = {
            **(extra_context or {}),
            "sluice_can_decide": obj is not None and self._can_decide(request, obj),
        }
        if extra_context["sluice_can_decide"]:
            # The decision buttons replace Save: nothing else on the page is editable.
            extra_context |= {"show_save": False, "show_save_and_continue": False}
        return super().change_view(request, object_id, form_url, extra_context)

    def _decide_one(self, request, object_id):
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not super().has_change_permission(request, obj):
            raise PermissionDenied
        approve = "_approve" in request.POST
        service = services.access_request_approve if approve else services.access_request_reject
        note = request.POST.get("decision_note", "").strip()
        try:
            service(access_request=obj, actor=actor_for(request), note=note)
        except SluiceError as exc:
            self.message_user(request, f"{obj}: {exc.message}", level=messages.ERROR)
            return HttpResponseRedirect(request.path)
        self.message_user(
            request,
            f"{'Approved' if approve else 'Rejected'}: {obj.get_kind_display()} for "
            f"{obj.tenant} ({obj.target_label}).",
            level=messages.SUCCESS,
        )
        return HttpResponseRedirect(reverse("admin:tenants_accessrequest_changelist"))

    @admin.action(description="Approve selected access requests", permissions=["change"])
    def approve_selected(self, request, queryset):
        actor, note = actor_for(request), action_note(request)
        run_each(
            self,
            request,
            queryset,
            lambda obj: services.access_request_approve(access_request=obj, actor=actor, note=note),
            verb="Approved",
        )

    @admin.action(description="Reject selected access requests", permissions=["change"])
    def reject_selected(self, request, queryset):
        actor, note = actor_for(request), action_note(request)
        run_each(
            self,
            request,
            queryset,
            lambda obj: services.access_request_reject(access_request=obj, actor=actor, note=note),
            verb="Rejected",
        )


# --- subscriptions ----------------------------------------------------------------------


class SubscriptionStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("live", "Live"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        if self.value() == "live":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(Subscription)
class SubscriptionAdmin(SluiceModelAdmin):
    list_display = [
        "tenant",
        "target_link",
        "target_kind",
        "status_badge",
        "approved_by_request",
        "created",
        "revoked",
    ]
    list_filter = [
        SubscriptionStatusFilter,
        "tenant",
        "deployment",
        ("prompt_api", titled("prompt-API")),
    ]
    search_fields = ["tenant__name", "tenant__slug", "deployment__slug", "prompt_api__slug"]
    list_select_related = ["tenant", "deployment", "prompt_api"]
    date_hierarchy = "created_at"
    actions = ["revoke_selected"]
    fields = [
        "tenant",
        "target_link",
        "target_kind",
        "status_badge",
        "approved_by_request",
        "created_at",
        "revoked_at",
    ]
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # subscriptions come from approved access requests

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead, so the gateways hear of it

    created = when("created_at", "Since")
    revoked = when("revoked_at", "Revoked")

    def has_revoke_permission(self, request) -> bool:
        return request.user.has_perm("tenants.change_subscription")

    @admin.display(description="Deployment or prompt-API")
    def target_link(self, subscription: Subscription) -> str:
        return change_link(subscription.target)

    @admin.display(description="Kind")
    def target_kind(self, subscription: Subscription) -> str:
        return "model deployment" if subscription.deployment_id else "prompt-API"

    @admin.display(description="Status", ordering="revoked_at")
    def status_badge(self, subscription: Subscription) -> str:
        return badge("revoked", "bad") if subscription.revoked_at else badge("live", "ok")

    @admin.display(description="Access request")
    def approved_by_request(self, subscription: Subscription) -> str:
        if subscription.access_request_id is None:
            return "—"
        url = reverse("admin:tenants_accessrequest_change", args=[subscription.access_request_id])
        return format_html('<a href="{}">#{}</a>', url, subscription.access_request_id)

    @admin.action(description="Revoke selected subscriptions", permissions=["revoke"])
    def revoke_selected(self, request, queryset):
        actor = actor_for(request)
        run_each(
            self,
            request,
            queryset,
            lambda obj: services.subscription_revoke(subscription=obj, actor=actor),
            verb="Revoked",
            skip=lambda obj: obj.revoked_at is not None,
            skipped_note="already revoked",
        )


# --- audit ------------------------------------------------------------------------------


@admin.register(AuditEvent)
class AuditEventAdmin(SluiceModelAdmin):
    list_display = ["at_time", "action", "actor_label", "tenant", "target"]
    list_filter = ["action", "target_type", "tenant"]
    search_fields = [
        "action",
        "target_repr",
        "target_id",
        "actor__username",
        "actor__email",
        "actor_key__prefix",
        "tenant__slug",
        "tenant__name",
    ]
    list_select_related = ["actor", "actor_key", "tenant"]
    date_hierarchy = "at"
    fields = [
        "at",
        "action",
        "actor_label",
        "tenant",
        "target_type",
        "target_id",
        "target_repr",
        "before_json",
        "after_json",
    ]
    readonly_fields = fields

    # Append-only: nobody edits or deletes history, not even a superuser.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    at_time = when("at", "At", seconds=True)

    @admin.display(description="Target", ordering="target_repr")
    def target(self, event: AuditEvent) -> str:
        return format_html(
            '{} <span class="sluice-quiet">{} #{}</span>',
            event.target_repr,
            event.target_type,
            event.target_id,
        )

    @admin.display(description="Actor", ordering="actor__username")
    def actor_label(self, event: AuditEvent) -> str:
        who = event.actor.get_username() if event.actor else "system"
        if event.actor_key is not None:
            return format_html("{} <code>{}</code>", who, event.actor_key.display_prefix)
        return who

    @admin.display(description="Before")
    def before_json(self, event: AuditEvent) -> str:
        return pretty_json(event.before)

    @admin.display(description="After")
    def after_json(self, event: AuditEvent) -> str:
        return pretty_json(event.after)
