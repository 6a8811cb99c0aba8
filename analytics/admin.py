"""The platform admins' view of the raw call log: read-only, filterable, cheap on big tables."""

from __future__ import annotations

from django.contrib import admin
from django.utils.html import format_html

from sluice import errors
from sluice.admin_base import SluiceModelAdmin
from tenants.admin import badge, when

from .models import CallLog


class StatusClassFilter(admin.SimpleListFilter):
    title = "outcome"
    parameter_name = "outcome"

    def lookups(self, request, model_admin):
        return [
            ("2xx", "Succeeded (2xx)"),
            ("4xx", "Refused (4xx)"),
            ("429", "Rate or quota limited (429)"),
            ("5xx", "Failed or shed (5xx)"),
        ]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "429":
            return queryset.filter(status_code=429)
        if value in ("2xx", "4xx", "5xx"):
            low = int(value[0]) * 100
            return queryset.filter(status_code__gte=low, status_code__lt=low + 100)
        return queryset


class StatusCodeFilter(admin.SimpleListFilter):
    title = "status code"
    parameter_name = "status_code"

    def lookups(self, request, model_admin):
        statuses = {200} | {entry.status for entry in errors.all_codes().values()}
        return [(str(status), str(status)) for status in sorted(statuses)]

    def queryset(self, request, queryset):
        if self.value() and self.value().isdigit():
            return queryset.filter(status_code=int(self.value()))
        return queryset


class ErrorCodeFilter(admin.SimpleListFilter):
    # The choices come from sluice.errors, not from a DISTINCT over a table of millions
    # (what list_filter = ["error_code"] would run on every page view).

    title = "error code"
    parameter_name = "error_code"

    def lookups(self, request, model_admin):
        return [("none", "No error")] + [
            (code, f"{code} ({entry.status})") for code, entry in sorted(errors.all_codes().items())
        ]

    def queryset(self, request, queryset):
        if self.value() == "none":
            return queryset.filter(error_code="")
        if self.value():
            return queryset.filter(error_code=self.value())
        return queryset


@admin.register(CallLog)
class CallLogAdmin(SluiceModelAdmin):
    list_display = [
        "at_time",
        "request_id",
        "tenant",
        "key",
        "deployment",
        "endpoint",
        "status",
        "error_code",
        "prompt_tokens",
        "completion_tokens",
        "queue_ms_",
        "inference_ms_",
        "total_ms_",
    ]
    list_filter = [
        StatusClassFilter,
        StatusCodeFilter,
        ErrorCodeFilter,
        "deployment",
        "tenant",
    ]
    search_fields = ["=request_id", "error_code", "api_key__prefix", "tenant__slug"]
    list_select_related = ["tenant", "api_key", "deployment", "prompt_api_version__prompt_api"]
    date_hierarchy = "created_at"
    # Counting every row of an unfiltered call log on each page view is the slow part.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    list_per_page = 50
    fields = [
        "request_id",
        "created_at",
        "tenant",
        "key",
        "deployment",
        "version",
        "endpoint",
        "status",
        "error_code",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "queue_ms_",
        "inference_ms_",
        "total_ms_",
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        # The foreign keys have no database constraint (see CallLog): a row may point at
        # a key or deployment deleted since. select_related's outer joins turn those into
        # None instead of a DoesNotExist while rendering.
        return super().get_queryset(request).select_related(*self.list_select_related)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    at_time = when("created_at", "At", seconds=True)

    @admin.display(description="API key", ordering="api_key__prefix")
    def key(self, log: CallLog) -> str:
        if log.api_key is None:
            return "—"
        return format_html('<code class="sluice-nowrap">{}</code>', log.api_key.display_prefix)

    @admin.display(description="Prompt-API version")
    def version(self, log: CallLog) -> str:
        return str(log.prompt_api_version) if log.prompt_api_version else "—"

    @admin.display(description="Status", ordering="status_code")
    def status(self, log: CallLog) -> str:
        code = log.status_code
        tone = "ok" if code < 400 else "warn" if code < 500 else "bad"
        return badge(str(code), tone)

    @admin.display(description="Queue ms", ordering="queue_ms")
    def queue_ms_(self, log: CallLog) -> str:
        return _ms(log.queue_ms)

    @admin.display(description="Inference ms", ordering="inference_ms")
    def inference_ms_(self, log: CallLog) -> str:
        return _ms(log.inference_ms)

    @admin.display(description="Total ms", ordering="total_ms")
    def total_ms_(self, log: CallLog) -> str:
        return _ms(log.total_ms)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"
