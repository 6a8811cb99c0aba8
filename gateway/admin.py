"""The platform admins' console for model deployments and prompt-APIs.

Writes go through gateway.services (audited, with cache invalidation on commit). Published
prompt-API versions are immutable: they are listed under their prompt-API in a read-only
inline of their own, apart from the editable drafts, and can be neither changed nor deleted.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, F, Q
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html

from sluice.admin_base import SluiceModelAdmin
from sluice.errors import SluiceError
from sluice.parsers import problem_in
from sluice.redisconn import publish_invalidation_on_commit
from tenants.admin import (
    actor_for,
    adopt,
    badge,
    change_link,
    pretty_json,
    run_each,
    titled,
    when,
)
from tenants.services import audit_record

from . import prompts, services
from .models import ModelDeployment, PromptApi, PromptApiVersion


class PrettyJSONField(forms.JSONField):
    """JSON edited as indented text, with an empty box (not "null") for no value.

    Django's JSONField lets through what PostgreSQL's JSONB refuses (NaN, NUL characters,
    unpaired surrogates) and fails outright on very deep nesting or very long integers;
    this one refuses all of them with a form error.
    """

    def to_python(self, value):
        try:
            converted = super().to_python(value)
        except (RecursionError, ValueError):  # too deep; an integer of over 4300 digits
            raise ValidationError(
                self.error_messages["invalid"], code="invalid", params={"value": value}
            ) from None
        problem = problem_in(converted, allow_nul=False)
        if problem:
            raise ValidationError(f"This JSON cannot be stored: {problem}.", code="invalid")
        return converted

    def bound_data(self, data, initial):
        # Refused text is shown again as typed: parsed, a surrogate could not be put on the page.
        try:
            bound = super().bound_data(data, initial)
        except (RecursionError, ValueError):
            return forms.fields.InvalidJSONInput(data)
        if problem_in(bound, allow_nul=False):
            return forms.fields.InvalidJSONInput(data)
        return bound

    def prepare_value(self, value):
        if value is None:
            return ""
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        return json.dumps(value, indent=2, ensure_ascii=False, cls=self.encoder)


# --- deployments ------------------------------------------------------------------------


class DeploymentForm(forms.ModelForm):
    class Meta:
        model = ModelDeployment
        fields = list(services.DEPLOYMENT_FIELDS)
        field_classes = {"backend_config": PrettyJSONField}
        widgets = {"backend_config": forms.Textarea(attrs={"rows": 4, "cols": 80})}

    def clean_backend_config(self):
        # An emptied JSON box means "no configuration", not SQL NULL.
        return self.cleaned_data.get("backend_config") or {}

    def clean_task(self):
        task = self.cleaned_data.get("task")
        try:
            services.check_task_change(self.instance, task)
        except SluiceError as exc:
            raise ValidationError(exc.message, code="conflict") from None
        return task


@admin.register(ModelDeployment)
class ModelDeploymentAdmin(SluiceModelAdmin):
    form = DeploymentForm
    list_display = [
        "slug",
        "name",
        "task",
        "enabled",
        "capacity",
        "batch",
        "wait",
        "deadline",
        "queue",
        "live_subscriptions",
        "updated",
    ]
    list_filter = ["task", "enabled"]
    search_fields = ["slug", "name", "description", "backend"]
    date_hierarchy = "created_at"
    actions = ["enable_selected", "disable_selected"]
    fieldsets = [
        (None, {"fields": ["slug", "name", "description", "task", "enabled"]}),
        ("Backend", {"fields": ["backend", "backend_config"]}),
        (
            "Capacity and batching",
            {"fields": ["capacity", "max_batch_size", "max_wait_ms", "default_deadline_s"]},
        ),
        ("Runtime", {"fields": ["queue", "created_at", "updated_at"]}),
    ]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_subscriptions=Count(
                    "subscriptions", filter=Q(subscriptions__revoked_at__isnull=True)
                )
            )
        )

    def get_readonly_fields(self, request, obj=None):
        # The slug is the `model` name clients send: deployment_update refuses renames.
        fixed = ["queue", "created_at", "updated_at"]
        return ["slug", *fixed] if obj else fixed

    updated = when("updated_at", "Updated")

    @admin.display(description="Max batch", ordering="max_batch_size")
    def batch(self, deployment: ModelDeployment) -> int:
        return deployment.max_batch_size

    @admin.display(description="Batch wait (ms)", ordering="max_wait_ms")
    def wait(self, deployment: ModelDeployment) -> int:
        return deployment.max_wait_ms

    @admin.display(description="Deadline (s)", ordering="default_deadline_s")
    def deadline(self, deployment: ModelDeployment) -> str:
        return f"{deployment.default_deadline_s:g}"

    @admin.display(description="Dramatiq queue")
    def queue(self, deployment: ModelDeployment) -> str:
        if not deployment.slug:
            return "—"
        return format_html("<code>{}</code>", deployment.queue_name)

    @admin.display(description="Live subscriptions", ordering="n_subscriptions")
    def live_subscriptions(self, deployment: ModelDeployment) -> str:
        url = reverse("admin:tenants_subscription_changelist")
        return format_html(
            '<a href="{}?deployment__id__exact={}&status=live">{}</a>',
            url,
            deployment.pk,
            deployment.n_subscriptions,
        )

    def save_model(self, request, obj, form, change):
        actor = actor_for(request)
        data = form.cleaned_data
        if not change:
            fields = {name: data[name] for name in services.DEPLOYMENT_FIELDS if name in data}
            adopt(obj, services.deployment_create(actor=actor, **fields))
            return
        changes = {name: data[name] for name in form.changed_data if name != "slug"}
        if changes:
            adopt(obj, services.deployment_update(deployment=obj, actor=actor, **changes))

    def delete_model(self, request, obj):
        audit_record(
            actor=actor_for(request),
            action="deployment.delete",
            target=obj,
            before={name: getattr(obj, name) for name in services.DEPLOYMENT_FIELDS},
        )
        publish_invalidation_on_commit("deployment", obj.slug)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for deployment in queryset:
            self.delete_model(request, deployment)

    def _set_enabled(self, request, queryset, enabled: bool) -> None:
        actor = actor_for(request)
        run_each(
            self,
            request,
            queryset,
            lambda deployment: services.deployment_update(
                deployment=deployment, enabled=enabled, actor=actor
            ),
            verb="Enabled" if enabled else "Disabled",
            skip=lambda deployment: deployment.enabled == enabled,
            skipped_note="already " + ("enabled" if enabled else "disabled"),
        )

    @admin.action(description="Enable selected deployments", permissions=["change"])
    def enable_selected(self, request, queryset):
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable selected deployments", permissions=["change"])
    def disable_selected(self, request, queryset):
        self._set_enabled(request, queryset, False)


# --- prompt-API versions ----------------------------------------------------------------

MESSAGES_PLACEHOLDER = (
    '[{"role": "system", "content": "..."}, {"role": "user", "content": "{{text}}"}]'
)
SCHEMA_PLACEHOLDER = (
    '{"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}'
)


JSON_FIELDS = ("messages", "input_schema", "output_schema", "parameters")


class VersionForm(forms.ModelForm):
    """A draft's definition, checked by the same rules the services apply before storing."""

    class Meta:
        model = PromptApiVersion
        fields = list(services.VERSION_FIELDS)
        field_classes = dict.fromkeys(JSON_FIELDS, PrettyJSONField)
        widgets = {
            "messages": forms.Textarea(
                attrs={"rows": 9, "cols": 80, "placeholder": MESSAGES_PLACEHOLDER}
            ),
            "input_schema": forms.Textarea(
                attrs={"rows": 9, "cols": 80, "placeholder": SCHEMA_PLACEHOLDER}
            ),
            "output_schema": forms.Textarea(attrs={"rows": 4, "cols": 80}),
            "parameters": forms.Textarea(
                attrs={
                    "rows": 2,
                    "cols": 80,
                    "placeholder": '{"temperature": 0.2, "max_tokens": 256}',
                }
            ),
            "changelog": forms.Textarea(attrs={"rows": 2, "cols": 80}),
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "deployment" in self.fields:
            self.fields["deployment"].queryset = ModelDeployment.objects.filter(
                task__in=services.PROMPT_TASKS
            )

    def clean(self):
        data = super().clean()
        data["parameters"] = data.get("parameters") or {}
        # A JSON box that did not parse has its own error already; check the rest only
        # when every part of the definition is there.
        needed = ("messages", "input_schema", "deployment")
        if self.errors or any(data.get(name) is None for name in needed):
            return data
        try:
            prompts.check_version_definition(
                messages=data["messages"],
                input_schema=data["input_schema"],
                output_type=data.get("output_type") or PromptApiVersion.OutputType.TEXT,
                output_schema=data.get("output_schema"),
                parameters=data["parameters"],
            )
        except SluiceError as exc:
            # "input_schema", "messages[0].content", "parameters.top_p" -> the form field
            field = (exc.param or "").split(".")[0].split("[")[0]
            self.add_error(field if field in self.fields else None, exc.message)
        return data


def _version_changes(form: forms.ModelForm) -> dict[str, Any]:
    return {
        name: form.cleaned_data[name]
        for name in form.changed_data
        if name in services.VERSION_FIELDS
    }


class PublishedVersionInline(admin.StackedInline):
    """Published versions: shown in full, changed and deleted never."""

    model = PromptApiVersion
    fk_name = "prompt_api"
    verbose_name = "published version"
    verbose_name_plural = "Published versions (immutable)"
    fields = [
        ("number", "published_at", "serving"),
        ("deployment", "output_type"),
        "messages_json",
        "input_schema_json",
        "output_schema_json",
        "parameters_json",
        "changelog",
    ]
    readonly_fields = [
        "number",
        "published_at",
        "serving",
        "deployment",
        "output_type",
        "messages_json",
        "input_schema_json",
        "output_schema_json",
        "parameters_json",
        "changelog",
    ]
    extra = 0
    can_delete = False
    classes = ["collapse"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .filter(state=PromptApiVersion.State.PUBLISHED)
            .select_related("deployment", "prompt_api")
        )

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="Serving")
    def serving(self, version: PromptApiVersion) -> str:
        if version.pk and version.prompt_api.active_version_id == version.pk:
            return badge("active version", "ok")
        return "—"

    @admin.display(description="Messages")
    def messages_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.messages)

    @admin.display(description="Input schema")
    def input_schema_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.input_schema)

    @admin.display(description="Output schema")
    def output_schema_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.output_schema)

    @admin.display(description="Parameters")
    def parameters_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.parameters)


class DraftVersionFormSet(forms.BaseInlineFormSet):
    """Marks the drafts' formset, which PromptApiAdmin saves through the services."""


class DraftVersionInline(admin.StackedInline):
    """Drafts: editable until published; new ones are numbered by the service."""

    model = PromptApiVersion
    fk_name = "prompt_api"
    form = VersionForm
    verbose_name = "draft version"
    verbose_name_plural = "Draft versions"
    fields = [
        ("number", "publish_link"),
        ("deployment", "output_type"),
        "messages",
        "input_schema",
        "output_schema",
        "parameters",
        "changelog",
    ]
    readonly_fields = ["number", "publish_link"]
    formset = DraftVersionFormSet
    extra = 0

    def get_queryset(self, request):
        return super().get_queryset(request).filter(state=PromptApiVersion.State.DRAFT)

    @admin.display(description="Publish")
    def publish_link(self, version: PromptApiVersion) -> str:
        if not version.pk:
            return "Save the draft first, then publish it from its own page."
        url = reverse("admin:gateway_promptapiversion_change", args=[version.pk])
        return format_html('<a href="{}">Review and publish v{} →</a>', url, version.number)


# --- prompt-APIs ------------------------------------------------------------------------


class PromptApiForm(forms.ModelForm):
    class Meta:
        model = PromptApi
        fields = ["tenant", "slug", "name", "description", "visibility", "active_version"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "active_version" in self.fields:
            # Only this prompt-API's published versions can be served.
            self.fields["active_version"].queryset = PromptApiVersion.objects.filter(
                prompt_api=self.instance, state=PromptApiVersion.State.PUBLISHED
            ).select_related("prompt_api")


class OwnerFilter(admin.SimpleListFilter):
    title = "owner"
    parameter_name = "owner"

    def lookups(self, request, model_admin):
        return [("platform", "Platform-wide"), ("tenant", "Tenant-owned")]

    def queryset(self, request, queryset):
        if self.value() == "platform":
            return queryset.filter(tenant__isnull=True)
        if self.value() == "tenant":
            return queryset.filter(tenant__isnull=False)
        return queryset


@admin.register(PromptApi)
class PromptApiAdmin(SluiceModelAdmin):
    form = PromptApiForm
    list_display = [
        "slug",
        "name",
        "owner",
        "visibility_badge",
        "serving",
        "version_count",
        "draft_count",
        "created",
    ]
    list_filter = [OwnerFilter, "visibility", "tenant"]
    search_fields = ["slug", "name", "description", "tenant__slug", "tenant__name"]
    list_select_related = ["tenant", "active_version"]
    autocomplete_fields = ["tenant"]
    date_hierarchy = "created_at"
    inlines = [PublishedVersionInline, DraftVersionInline]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_versions=Count("versions"),
                n_drafts=Count("versions", filter=Q(versions__state="draft")),
            )
        )

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        formfield = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "active_version" and formfield is not None:
            # Pick among published versions; adding or editing one from here makes no sense.
            widget = formfield.widget
            widget.can_add_related = widget.can_change_related = False
            widget.can_delete_related = False
        return formfield

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["tenant", "slug", "name", "description", "visibility"]
        return [
            "tenant",
            "slug",
            "name",
            "description",
            "visibility",
            "active_version",
            "created_by",
            "created_at",
        ]

    def get_readonly_fields(self, request, obj=None):
        # The slug is the endpoint (/v1/apis/<slug>) and the owner decides who pays:
        # both fixed once created.
        return ["tenant", "slug", "created_by", "created_at"] if obj else []

    def get_prepopulated_fields(self, request, obj=None):
        return {} if obj else {"slug": ["name"]}

    created = when("created_at", "Created")

    @admin.display(description="Visibility", ordering="visibility")
    def visibility_badge(self, prompt_api: PromptApi) -> str:
        if prompt_api.visibility == PromptApi.Visibility.PUBLIC:
            return badge("public", "info")
        return badge("private", "muted")

    @admin.display(description="Owner", ordering="tenant__name")
    def owner(self, prompt_api: PromptApi) -> str:
        return str(prompt_api.tenant) if prompt_api.tenant_id else "Platform-wide"

    @admin.display(description="Serving")
    def serving(self, prompt_api: PromptApi) -> str:
        if prompt_api.active_version is None:
            return badge("nothing published", "muted")
        return badge(f"v{prompt_api.active_version.number}", "ok")

    @admin.display(description="Versions", ordering="n_versions")
    def version_count(self, prompt_api: PromptApi) -> int:
        return prompt_api.n_versions

    @admin.display(description="Drafts", ordering="n_drafts")
    def draft_count(self, prompt_api: PromptApi) -> int:
        return prompt_api.n_drafts

    def save_model(self, request, obj, form, change):
        actor = actor_for(request)
        data = form.cleaned_data
        if not change:
            created = services.prompt_api_create(
                tenant=data.get("tenant"),
                slug=data["slug"],
                name=data["name"],
                description=data.get("description", ""),
                visibility=data["visibility"],
                actor=actor,
            )
            adopt(obj, created)
            return
        plain = [n for n in ("name", "description", "visibility") if n in form.changed_data]
        if plain:
            obj.save(update_fields=plain)
            audit_record(
                actor=actor,
                action="prompt_api.update",
                target=obj,
                tenant=obj.tenant,
                before={name: form.initial.get(name) for name in plain},
                after={name: getattr(obj, name) for name in plain},
            )
            publish_invalidation_on_commit("prompt_api", obj.slug)
        if "active_version" in form.changed_data and data.get("active_version") is not None:
            services.prompt_api_activate_version(version=data["active_version"], actor=actor)
        elif "active_version" in form.changed_data:
            self.message_user(
                request,
                "A prompt-API keeps serving a version once one is published; pick another "
                "published version to roll back instead of clearing it.",
                level=messages.WARNING,
            )

    def delete_model(self, request, obj):
        audit_record(
            actor=actor_for(request),
            action="prompt_api.delete",
            target=obj,
            tenant=obj.tenant,
            before={"slug": obj.slug, "name": obj.name},
        )
        publish_invalidation_on_commit("prompt_api", obj.slug)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for prompt_api in queryset:
            self.delete_model(request, prompt_api)

    def save_formset(self, request, form, formset, change):
        if not isinstance(formset, DraftVersionFormSet):
            formset.save()  # the published versions' inline: view-only, saves nothing
            return
        actor = actor_for(request)
        prompt_api = form.instance
        formset.save(commit=False)  # fills the lists the change message reads; writes nothing
        created = []
        for draft_form in formset.extra_forms:
            if draft_form in formset.deleted_forms or not draft_form.has_changed():
                continue
            fields = {name: draft_form.cleaned_data[name] for name in services.VERSION_FIELDS}
            version = self._call(
                request,
                services.prompt_api_version_create,
                prompt_api=prompt_api,
                actor=actor,
                **fields,
            )
            if version is not None:
                created.append(version)
        formset.new_objects = created  # numbered by the service, for the change message
        for draft_form in formset.initial_forms:
            if draft_form in formset.deleted_forms:
                continue
            changes = _version_changes(draft_form)
            if changes:
                self._call(
                    request,
                    services.prompt_api_version_update,
                    version=draft_form.instance,
                    actor=actor,
                    **changes,
                )
        for version in formset.deleted_objects:
            _delete_draft(version, actor)

    def _call(self, request, service, **kwargs):
        try:
            return service(**kwargs)
        except SluiceError as exc:
            self.message_user(request, exc.message, level=messages.ERROR)
            return None


def _delete_draft(version: PromptApiVersion, actor) -> None:
    if version.is_published:  # the inline never offers it; refuse a forged POST anyway
        raise PermissionDenied
    audit_record(
        actor=actor,
        action="prompt_api.version_delete",
        target=version,
        tenant=version.prompt_api.tenant,
        before={"number": version.number},
    )
    version.delete()


class ServingFilter(admin.SimpleListFilter):
    title = "serving"
    parameter_name = "serving"

    def lookups(self, request, model_admin):
        return [("yes", "Active version"), ("no", "Not serving")]

    def queryset(self, request, queryset):
        serving = Q(prompt_api__active_version=F("pk"))
        if self.value() == "yes":
            return queryset.filter(serving)
        if self.value() == "no":
            return queryset.exclude(serving)
        return queryset


@admin.register(PromptApiVersion)
class PromptApiVersionAdmin(SluiceModelAdmin):
    form = VersionForm
    list_display = [
        "__str__",
        "state_badge",
        "serving",
        "deployment",
        "output_type",
        "published",
        "created_by",
        "created",
    ]
    list_filter = [
        "state",
        ServingFilter,
        "output_type",
        "deployment",
        ("prompt_api", titled("prompt-API")),
    ]
    search_fields = ["prompt_api__slug", "prompt_api__name", "changelog"]
    list_select_related = ["prompt_api", "deployment", "created_by"]
    autocomplete_fields = ["prompt_api"]
    date_hierarchy = "created_at"
    actions = ["publish_selected"]

    def get_fields(self, request, obj=None):
        definition = ["deployment", "output_type", *self.json_fields(obj), "changelog"]
        if obj is None:
            return ["prompt_api", *definition]
        return [
            "prompt_api_link",
            "number",
            "state_badge",
            "serving",
            "published_at",
            *definition,
            "created_by",
            "created_at",
        ]

    @staticmethod
    def json_fields(obj: PromptApiVersion | None) -> list[str]:
        names = ["messages", "input_schema", "output_schema", "parameters"]
        # A read-only page shows JSON pretty-printed instead of in edit boxes.
        return [f"{name}_json" for name in names] if obj and obj.is_published else names

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        fixed = ["prompt_api_link", "number", "state_badge", "serving", "published_at"]
        return [*fixed, "created_by", "created_at"]

    def get_actions(self, request):
        actions = super().get_actions(request)
        # Bulk delete would skip the per-object check that protects published versions.
        actions.pop("delete_selected", None)
        return actions

    def has_change_permission(self, request, obj=None):
        if obj is not None and obj.is_published:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.is_published:
            return False
        return super().has_delete_permission(request, obj)

    published = when("published_at", "Published")
    created = when("created_at", "Created")

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "prompt_api":
            kwargs["label"] = "Prompt-API"
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.display(description="Prompt-API")
    def prompt_api_link(self, version: PromptApiVersion) -> str:
        return change_link(version.prompt_api)

    @admin.display(description="State", ordering="state")
    def state_badge(self, version: PromptApiVersion) -> str:
        if version.is_published:
            return badge("published", "ok")
        return badge("draft", "info")

    @admin.display(description="Serving")
    def serving(self, version: PromptApiVersion) -> str:
        if version.prompt_api.active_version_id == version.pk:
            return badge("active", "ok")
        return "—"

    @admin.display(description="Messages")
    def messages_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.messages)

    @admin.display(description="Input schema")
    def input_schema_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.input_schema)

    @admin.display(description="Output schema")
    def output_schema_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.output_schema)

    @admin.display(description="Parameters")
    def parameters_json(self, version: PromptApiVersion) -> str:
        return pretty_json(version.parameters)

    def save_model(self, request, obj, form, change):
        actor = actor_for(request)
        if not change:
            fields = {name: form.cleaned_data[name] for name in services.VERSION_FIELDS}
            created = services.prompt_api_version_create(
                prompt_api=form.cleaned_data["prompt_api"], actor=actor, **fields
            )
            adopt(obj, created)
            return
        changes = _version_changes(form)
        if changes:
            adopt(obj, services.prompt_api_version_update(version=obj, actor=actor, **changes))

    def delete_model(self, request, obj):
        _delete_draft(obj, actor_for(request))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        version = self.get_object(request, unquote(object_id))
        if request.method == "POST" and "_publish" in request.POST and version is not None:
            if not self.has_change_permission(request, version):
                raise PermissionDenied
            try:
                services.prompt_api_version_publish(version=version, actor=actor_for(request))
            except SluiceError as exc:
                self.message_user(request, exc.message, level=messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"Published {version}; /v1/apis/{version.prompt_api.slug} now serves it.",
                    level=messages.SUCCESS,
                )
            return HttpResponseRedirect(request.path)
        extra_context = {
            **(extra_context or {}),
            "sluice_can_publish": version is not None
            and not version.is_published
            and self.has_change_permission(request, version),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.action(description="Publish selected drafts", permissions=["change"])
    def publish_selected(self, request, queryset):
        actor = actor_for(request)
        run_each(
            self,
            request,
            queryset.select_related("prompt_api"),
            lambda version: services.prompt_api_version_publish(version=version, actor=actor),
            verb="Published",
            skip=lambda version: version.is_published,
            skipped_note="already published",
        )
