"""Reads of call logs, scoped by tenant."""

from __future__ import annotations

from django.db.models import QuerySet

from tenants.models import Tenant

from .models import CallLog


def call_logs_for(tenant: Tenant | None) -> QuerySet[CallLog]:
    """A tenant's call logs; None (staff only) means every tenant's."""
    queryset = CallLog.objects.select_related("api_key", "deployment", "prompt_api_version")
    return queryset if tenant is None else queryset.filter(tenant=tenant)
