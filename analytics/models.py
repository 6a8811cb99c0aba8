"""The raw record of every call the gateway answered, admitted or refused."""

from __future__ import annotations

from django.db import models


class CallLog(models.Model):
    """One row per request, written in batches by the call-log flusher.

    The foreign keys carry no database constraint: rows arrive in bulk from the Redis
    stream long after the request, and a key or deployment deleted in between must not
    make a batch fail. ``request_id`` is unique, so replaying a batch changes nothing.
    """

    request_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey(
        "tenants.Tenant",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="+",
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="+",
    )
    deployment = models.ForeignKey(
        "gateway.ModelDeployment",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="+",
    )
    prompt_api_version = models.ForeignKey(
        "gateway.PromptApiVersion",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="+",
    )
    endpoint = models.CharField(max_length=40, blank=True)
    status_code = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=40, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    queue_ms = models.FloatField(null=True, blank=True)
    inference_ms = models.FloatField(null=True, blank=True)
    total_ms = models.FloatField()
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="calllog_tenant_time"),
            models.Index(fields=["tenant", "api_key", "-created_at"], name="calllog_key_time"),
            models.Index(fields=["deployment", "-created_at"], name="calllog_deployment_time"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.status_code}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
