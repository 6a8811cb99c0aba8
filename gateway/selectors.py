"""Reads of deployments and prompt-APIs, scoped to what a tenant may see."""

from __future__ import annotations

from django.db.models import Q, QuerySet

from sluice import errors
from tenants.models import Tenant

from .models import ModelDeployment, PromptApi, PromptApiVersion


def deployments_visible_to(tenant: Tenant | None) -> QuerySet[ModelDeployment]:
    """Enabled deployments for tenants (so they can request access); all of them for staff."""
    queryset = ModelDeployment.objects.all()
    return queryset if tenant is None else queryset.filter(enabled=True)


def access_deployment(*, tenant: Tenant | None, slug: str) -> ModelDeployment:
    found = deployments_visible_to(tenant).filter(slug=slug).first()
    if found is None:
        raise errors.SluiceError(errors.NOT_FOUND, f"No deployment '{slug}'.")
    return found


def prompt_apis_visible_to(tenant: Tenant | None) -> QuerySet[PromptApi]:
    """The tenant's own prompt-APIs and every public one; everything for staff (None)."""
    queryset = PromptApi.objects.select_related("tenant", "active_version__deployment")
    if tenant is None:
        return queryset
    return queryset.filter(Q(tenant=tenant) | Q(visibility=PromptApi.Visibility.PUBLIC))


def access_prompt_api(*, tenant: Tenant | None, slug: str) -> PromptApi:
    found = prompt_apis_visible_to(tenant).filter(slug=slug).first()
    if found is None:
        raise errors.SluiceError(errors.NOT_FOUND, f"No prompt-API '{slug}'.")
    return found


def versions_of(prompt_api: PromptApi) -> QuerySet[PromptApiVersion]:
    return prompt_api.versions.select_related("deployment", "created_by").order_by("-number")


def access_version(*, prompt_api: PromptApi, number: int) -> PromptApiVersion:
    found = versions_of(prompt_api).filter(number=number).first()
    if found is None:
        raise errors.SluiceError(errors.NOT_FOUND, f"{prompt_api.slug} has no version {number}.")
    return found
