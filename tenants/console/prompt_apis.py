"""Prompt-API pages: the catalogue, one prompt-API and its versions, drafting and publishing.

Who may change what mirrors gateway/api.py: a tenant's own prompt-APIs are drafted by
members and published by admins; another tenant's public ones may be called (with a
subscription), never changed; platform-wide ones belong to staff.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from gateway import selectors as gateway_selectors
from gateway import services as gateway_services
from gateway.models import PromptApi, PromptApiVersion
from gateway.services import PROMPT_TASKS
from sluice import errors
from sluice.errors import SluiceError
from tenants import policy, selectors, services
from tenants.models import AccessRequest, Role

from .forms import (
    INPUT_SCHEMA_EXAMPLE,
    MESSAGES_EXAMPLE,
    PromptApiForm,
    VersionForm,
    add_service_error,
)
from .tenancy import tenant_page


def _owned(request: HttpRequest, prompt_api: PromptApi) -> bool:
    return prompt_api.tenant_id == request.console.tenant.pk


def _may_edit(request: HttpRequest, prompt_api: PromptApi, role: str, doing: str) -> None:
    console = request.console
    if prompt_api.tenant_id is None:
        policy.require_staff(console.actor, f"{doing} platform-wide prompt-APIs")
    elif not _owned(request, prompt_api):
        if not console.is_staff:
            raise SluiceError(
                errors.PERMISSION_DENIED,
                f"'{prompt_api.slug}' belongs to another tenant; you may call it, not change it.",
            )
    else:
        policy.require_role(console.actor, console.tenant, role, doing)


def _can(request: HttpRequest, prompt_api: PromptApi, role: str) -> bool:
    try:
        _may_edit(request, prompt_api, role, "change")
    except SluiceError:
        return False
    return True


def _prompt_api(request: HttpRequest, slug: str) -> PromptApi:
    return gateway_selectors.access_prompt_api(tenant=request.console.tenant, slug=slug)


def _versions(request: HttpRequest, prompt_api: PromptApi):
    """Owners (and staff) see drafts; everyone else sees published versions only."""
    versions = gateway_selectors.versions_of(prompt_api)
    if request.console.is_staff or _owned(request, prompt_api):
        return versions
    return versions.filter(state=PromptApiVersion.State.PUBLISHED)


def _version(request: HttpRequest, prompt_api: PromptApi, number: int) -> PromptApiVersion:
    found = _versions(request, prompt_api).filter(number=number).first()
    if found is None:
        raise SluiceError(errors.NOT_FOUND, f"{prompt_api.slug} has no version {number}.")
    return found


def _deployments(request: HttpRequest):
    return gateway_selectors.deployments_visible_to(request.console.tenant).filter(
        task__in=PROMPT_TASKS
    )


def _subscribed_prompt_api_ids(request: HttpRequest) -> set[int]:
    return set(
        selectors.subscriptions_of(request.console.tenant)
        .filter(prompt_api__isnull=False)
        .values_list("prompt_api_id", flat=True)
    )


# --- list and create ----------------------------------------------------------------------


@tenant_page()
def prompt_api_list(request: HttpRequest) -> HttpResponse:
    tenant = request.console.tenant
    visible = gateway_selectors.prompt_apis_visible_to(tenant)
    subscribed = _subscribed_prompt_api_ids(request)
    catalogue = list(visible.exclude(tenant=tenant))
    for prompt_api in catalogue:
        prompt_api.subscribed = prompt_api.pk in subscribed
    context = {"own": visible.filter(tenant=tenant), "catalogue": catalogue}
    return render(request, "console/prompt_apis/list.html", context)


@tenant_page(Role.MEMBER, "create prompt-APIs")
def prompt_api_create(request: HttpRequest) -> HttpResponse:
    form = PromptApiForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            created = gateway_services.prompt_api_create(
                tenant=request.console.tenant, actor=request.console.actor, **form.cleaned_data
            )
        except SluiceError as exc:
            add_service_error(form, exc)
        else:
            messages.success(request, f"Created {created.slug}. Add its first version next.")
            return redirect("console:version_create", slug=created.slug)
    return render(request, "console/prompt_apis/create.html", {"form": form})


# --- one prompt-API -----------------------------------------------------------------------

_EXAMPLE_VALUES = {"string": "...", "integer": 1, "number": 1.5, "boolean": True, "array": []}


def _example_inputs(schema: dict[str, Any] | None) -> dict[str, Any]:
    """Plausible inputs for the curl example, from the schema's properties."""
    example: dict[str, Any] = {}
    for name, spec in ((schema or {}).get("properties") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        if "examples" in spec and isinstance(spec["examples"], list) and spec["examples"]:
            example[name] = spec["examples"][0]
        elif "default" in spec:
            example[name] = spec["default"]
        elif isinstance(spec.get("enum"), list) and spec["enum"]:
            example[name] = spec["enum"][0]
        else:
            kind = spec.get("type")
            kind = kind[0] if isinstance(kind, list) and kind else kind
            example[name] = _EXAMPLE_VALUES.get(kind, {}) if isinstance(kind, str) else "..."
    return example


def _curl(request: HttpRequest, prompt_api: PromptApi, version: PromptApiVersion | None) -> str:
    base = request.build_absolute_uri("/").rstrip("/")
    body = json.dumps({"inputs": _example_inputs(version.input_schema if version else None)})
    return (
        f"curl {base}/v1/apis/{prompt_api.slug} \\\n"
        '  -H "Authorization: Bearer $SLUICE_API_KEY" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d '{body}'"
    )


@tenant_page()
def prompt_api_detail(request: HttpRequest, slug: str) -> HttpResponse:
    prompt_api = _prompt_api(request, slug)
    versions = list(_versions(request, prompt_api))
    may_draft = _can(request, prompt_api, Role.MEMBER)
    may_publish = _can(request, prompt_api, Role.ADMIN)
    pending_publication = set(
        selectors.access_requests_for(request.console.tenant)
        .filter(kind=AccessRequest.Kind.PUBLISH_VERSION, state=AccessRequest.State.PENDING)
        .values_list("prompt_api_version_id", flat=True)
    )
    for version in versions:
        version.is_active = version.pk == prompt_api.active_version_id
        version.publication_pending = version.pk in pending_publication
    shown = prompt_api.active_version or (versions[0] if versions else None)
    context = {
        "prompt_api": prompt_api,
        "versions": versions,
        "owned": _owned(request, prompt_api),
        "may_draft": may_draft,
        "may_publish": may_publish,
        "subscribed": prompt_api.pk in _subscribed_prompt_api_ids(request),
        "curl": _curl(request, prompt_api, shown),
    }
    return render(request, "console/prompt_apis/detail.html", context)


# --- versions -----------------------------------------------------------------------------


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


@tenant_page()
def version_detail(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    prompt_api = _prompt_api(request, slug)
    version = _version(request, prompt_api, number)
    version.is_active = version.pk == prompt_api.active_version_id
    publication_pending = (
        selectors.access_requests_for(request.console.tenant)
        .filter(prompt_api_version=version, state=AccessRequest.State.PENDING)
        .first()
    )
    context = {
        "prompt_api": prompt_api,
        "version": version,
        "input_schema": _pretty(version.input_schema),
        "output_schema": _pretty(version.output_schema) if version.output_schema else "",
        "parameters": _pretty(version.parameters) if version.parameters else "",
        "variables": sorted(version.template_variables()),
        "may_draft": _can(request, prompt_api, Role.MEMBER),
        "may_publish": _can(request, prompt_api, Role.ADMIN),
        "owned": _owned(request, prompt_api),
        "publication_pending": publication_pending,
    }
    return render(request, "console/prompt_apis/version.html", context)


def _version_initial(prompt_api: PromptApi) -> dict[str, Any]:
    """Start a new version from the newest one, so an iteration is a small edit."""
    latest = prompt_api.versions.order_by("-number").first()
    if latest is None:
        return {"messages": MESSAGES_EXAMPLE, "input_schema": INPUT_SCHEMA_EXAMPLE}
    return {
        "deployment": latest.deployment.slug,
        "messages": latest.messages,
        "input_schema": latest.input_schema,
        "output_type": latest.output_type,
        "output_schema": latest.output_schema,
        "parameters": latest.parameters or None,
    }


@tenant_page(Role.MEMBER, "add versions")
def version_create(request: HttpRequest, slug: str) -> HttpResponse:
    prompt_api = _prompt_api(request, slug)
    _may_edit(request, prompt_api, Role.MEMBER, "add versions to")
    initial = _version_initial(prompt_api)
    form = VersionForm(request.POST or None, deployments=_deployments(request), initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            version = gateway_services.prompt_api_version_create(
                prompt_api=prompt_api, actor=request.console.actor, **form.fields_for_service()
            )
        except SluiceError as exc:
            add_service_error(form, exc)
        else:
            messages.success(request, f"Saved {version} as a draft.")
            return redirect("console:version", slug=slug, number=version.number)
    context = {"prompt_api": prompt_api, "form": form, "editing": None}
    return render(request, "console/prompt_apis/version_form.html", context)


@tenant_page(Role.MEMBER, "edit versions")
def version_edit(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    prompt_api = _prompt_api(request, slug)
    version = _version(request, prompt_api, number)
    _may_edit(request, prompt_api, Role.MEMBER, "edit versions of")
    if version.is_published:
        if request.method == "POST":
            # The service is the one that refuses: published versions are immutable.
            try:
                gateway_services.prompt_api_version_update(
                    version=version, actor=request.console.actor
                )
            except SluiceError as exc:
                messages.error(request, exc.message)
        else:
            messages.info(
                request,
                f"{version} is published and can no longer change; add a new version instead.",
            )
        return redirect("console:version", slug=slug, number=number)
    initial = {
        "deployment": version.deployment.slug,
        "messages": version.messages,
        "input_schema": version.input_schema,
        "output_type": version.output_type,
        "output_schema": version.output_schema,
        "parameters": version.parameters or None,
        "changelog": version.changelog,
    }
    form = VersionForm(request.POST or None, deployments=_deployments(request), initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            gateway_services.prompt_api_version_update(
                version=version, actor=request.console.actor, **form.fields_for_service()
            )
        except SluiceError as exc:
            add_service_error(form, exc)
        else:
            messages.success(request, f"Saved the changes to {version}.")
            return redirect("console:version", slug=slug, number=number)
    context = {"prompt_api": prompt_api, "form": form, "editing": version}
    return render(request, "console/prompt_apis/version_form.html", context)


@require_POST
@tenant_page(Role.MEMBER, "publish versions")
def version_publish(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    prompt_api = _prompt_api(request, slug)
    version = _version(request, prompt_api, number)
    _may_edit(request, prompt_api, Role.ADMIN, "publish versions of")
    try:
        gateway_services.prompt_api_version_publish(version=version, actor=request.console.actor)
    except SluiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Published {version}; /v1/apis/{slug} now serves it.")
    return redirect("console:version", slug=slug, number=number)


@require_POST
@tenant_page(Role.MEMBER, "request publication")
def version_request_publish(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    prompt_api = _prompt_api(request, slug)
    version = _version(request, prompt_api, number)
    _may_edit(request, prompt_api, Role.MEMBER, "request publication of")
    try:
        filed = services.access_request_create(
            tenant=request.console.tenant,
            kind=AccessRequest.Kind.PUBLISH_VERSION,
            prompt_api_version=version,
            actor=request.console.actor,
            justification=request.POST.get("justification", "")[:2000],
        )
    except SluiceError as exc:
        messages.error(request, exc.message)
        return redirect("console:version", slug=slug, number=number)
    if filed.state == AccessRequest.State.APPROVED:
        messages.success(
            request, f"Approved automatically, because you may publish yourself: {version} is live."
        )
        return redirect("console:version", slug=slug, number=number)
    messages.success(request, f"Publication of {version} requested; a reviewer will decide.")
    return redirect("console:access_request", request_id=filed.pk)


@require_POST
@tenant_page(Role.MEMBER, "change the active version")
def version_activate(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    prompt_api = _prompt_api(request, slug)
    version = _version(request, prompt_api, number)
    _may_edit(request, prompt_api, Role.ADMIN, "change the active version of")
    try:
        gateway_services.prompt_api_activate_version(version=version, actor=request.console.actor)
    except SluiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"/v1/apis/{slug} now serves {version}.")
    return redirect("console:prompt_api", slug=slug)
