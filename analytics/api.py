"""Management API: the call log, read-only, filtered and cursor-paginated."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers

from sluice.api import ManagementView, NewestFirstPagination, StrictSerializer
from tenants import policy
from tenants.models import Role

from .selectors import call_logs_for


class CallLogOut(serializers.Serializer):
    request_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    endpoint = serializers.CharField()
    tenant_id = serializers.IntegerField()
    api_key = serializers.CharField(source="api_key.display_prefix", default=None)
    deployment = serializers.CharField(source="deployment.slug", default=None)
    prompt_api_version = serializers.CharField(default=None)
    status_code = serializers.IntegerField()
    error_code = serializers.CharField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    queue_ms = serializers.FloatField()
    inference_ms = serializers.FloatField()
    total_ms = serializers.FloatField()


class CallLogFilter(StrictSerializer):
    since = serializers.DateTimeField(required=False, help_text="Only calls at or after this.")
    until = serializers.DateTimeField(required=False, help_text="Only calls before this.")
    status = serializers.IntegerField(
        required=False, min_value=100, max_value=599, help_text="Exact HTTP status."
    )
    status_class = serializers.ChoiceField(
        choices=["2xx", "4xx", "5xx"], required=False, help_text="A family of statuses."
    )
    error_code = serializers.CharField(required=False)
    key = serializers.IntegerField(required=False, help_text="API key id.")
    deployment = serializers.CharField(required=False, help_text="Deployment slug.")
    # Pagination parameters pass through.
    cursor = serializers.CharField(required=False)
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=500)
    tenant = serializers.CharField(required=False)

    def validate(self, attrs):
        since, until = attrs.get("since"), attrs.get("until")
        if since and until and since >= until:
            raise serializers.ValidationError({"until": ["until must be after since."]})
        return attrs


class CallLogListView(ManagementView):
    tenant_required = False
    pagination_class = NewestFirstPagination

    @extend_schema(
        summary="Call logs, newest first",
        parameters=[CallLogFilter],
        responses=CallLogOut(many=True),
    )
    def get(self, request):
        if self.tenant is not None:
            policy.require_role(self.actor, self.tenant, Role.VIEWER, "read call logs")
        filters = CallLogFilter(data=request.query_params.dict())
        filters.is_valid(raise_exception=True)
        wanted = filters.validated_data
        queryset = call_logs_for(self.tenant)
        if "since" in wanted:
            queryset = queryset.filter(created_at__gte=wanted["since"])
        if "until" in wanted:
            queryset = queryset.filter(created_at__lt=wanted["until"])
        if "status" in wanted:
            queryset = queryset.filter(status_code=wanted["status"])
        if "status_class" in wanted:
            low = int(wanted["status_class"][0]) * 100
            queryset = queryset.filter(status_code__gte=low, status_code__lt=low + 100)
        if "error_code" in wanted:
            queryset = queryset.filter(error_code=wanted["error_code"])
        if "key" in wanted:
            queryset = queryset.filter(api_key_id=wanted["key"])
        if "deployment" in wanted:
            queryset = queryset.filter(deployment__slug=wanted["deployment"])
        return self.paginated(queryset, CallLogOut)
