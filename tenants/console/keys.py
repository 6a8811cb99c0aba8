"""API key pages: list, issue, revoke, rotate.

The raw key exists only in the response to the POST that issued it: it is rendered
straight into that page and goes nowhere else (no session, cookie, message, log or
redirect), and the page is marked no-store so the browser does not keep a copy.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from analytics.selectors import call_logs_for
from sluice.errors import SluiceError
from tenants import policy, selectors, services
from tenants.models import ApiKey, Role

from .forms import ApiKeyForm, add_service_error
from .tenancy import paginate, tenant_page

STATUS_FILTERS = ("active", "all")


def _require_key_control(request: HttpRequest, key: ApiKey) -> None:
    """Members manage the keys they issued; admins manage everyone's (as the API does)."""
    console = request.console
    own = key.created_by_id == console.user.pk
    role = Role.MEMBER if own else Role.ADMIN
    doing = "manage your keys" if own else "manage other people's keys"
    policy.require_role(console.actor, console.tenant, role, doing)


def _may_control(request: HttpRequest, key: ApiKey) -> bool:
    console = request.console
    return console.is_admin or (console.is_member and key.created_by_id == console.user.pk)


@tenant_page()
def key_list(request: HttpRequest) -> HttpResponse:
    shown = request.GET.get("status", "active")
    if shown not in STATUS_FILTERS:
        shown = "active"
    keys = selectors.api_keys_for(request.console.tenant)
    if shown == "active":
        keys = keys.usable()
    page = paginate(request, keys)
    for key in page:
        key.may_control = _may_control(request, key)
    return render(request, "console/keys/list.html", {"page": page, "shown": shown})


def _created(request: HttpRequest, key: ApiKey, raw: str, *, rotated_from: ApiKey | None = None):
    # The views are also never_cache; no-store is the part that keeps the key off disk.
    context = {"key": key, "raw": raw, "rotated_from": rotated_from}
    return render(request, "console/keys/created.html", context)


@never_cache
@tenant_page(Role.MEMBER, "issue API keys")
def key_create(request: HttpRequest) -> HttpResponse:
    form = ApiKeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            key, raw = services.api_key_issue(
                tenant=request.console.tenant,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                expires_at=form.expires_at(),
                actor=request.console.actor,
            )
        except SluiceError as exc:
            add_service_error(form, exc)
        else:
            return _created(request, key, raw)
    return render(request, "console/keys/create.html", {"form": form})


@tenant_page()
def key_detail(request: HttpRequest, key_id: int) -> HttpResponse:
    key = selectors.access_api_key(tenant=request.console.tenant, key_id=key_id)
    recent = (
        call_logs_for(request.console.tenant)
        .filter(api_key=key)
        .select_related("prompt_api_version__prompt_api")[:20]
    )
    context = {"key": key, "recent": recent, "may_control": _may_control(request, key)}
    return render(request, "console/keys/detail.html", context)


@require_POST
@tenant_page(Role.MEMBER, "manage API keys")
def key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    key = selectors.access_api_key(tenant=request.console.tenant, key_id=key_id)
    _require_key_control(request, key)
    if key.revoked_at is not None:
        messages.info(request, f"{key.name} was already revoked.")
    else:
        services.api_key_revoke(key=key, actor=request.console.actor)
        messages.success(
            request, f"Revoked {key.name} ({key.display_prefix}); it stops working within seconds."
        )
    return redirect("console:keys")


@never_cache
@require_POST
@tenant_page(Role.MEMBER, "manage API keys")
def key_rotate(request: HttpRequest, key_id: int) -> HttpResponse:
    key = selectors.access_api_key(tenant=request.console.tenant, key_id=key_id)
    _require_key_control(request, key)
    try:
        new_key, raw = services.api_key_rotate(key=key, actor=request.console.actor)
    except SluiceError as exc:
        messages.error(request, exc.message)
        return redirect("console:key", key_id=key.pk)
    return _created(request, new_key, raw, rotated_from=key)
