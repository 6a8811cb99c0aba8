"""Member pages (viewers read, admins manage, anyone may leave) and the audit trail."""

from __future__ import annotations

import json

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from sluice.errors import SluiceError
from tenants import policy, selectors, services
from tenants.models import Role

from .forms import InviteForm, RoleForm, add_service_error, role_choices
from .tenancy import SESSION_KEY, paginate, tenant_page


def _members_page(request: HttpRequest, invite_form: InviteForm | None = None) -> HttpResponse:
    console = request.console
    context = {
        "members": selectors.members_of(console.tenant),
        "invite_form": invite_form or InviteForm(include_owner=console.is_owner),
        "role_choices": role_choices(include_owner=console.is_owner),
    }
    return render(request, "console/members.html", context)


@tenant_page()
def member_list(request: HttpRequest) -> HttpResponse:
    return _members_page(request)


@require_POST
@tenant_page(Role.ADMIN, "invite members")
def member_invite(request: HttpRequest) -> HttpResponse:
    console = request.console
    form = InviteForm(request.POST, include_owner=console.is_owner)
    if form.is_valid():
        try:
            membership, created = services.member_invite(
                tenant=console.tenant,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                actor=console.actor,
            )
        except SluiceError as exc:
            add_service_error(form, exc)
        else:
            how = (
                "We e-mailed them a link to choose a password."
                if created
                else "They already have an account and were told by e-mail."
            )
            messages.success(
                request, f"Added {membership.user.email} as {membership.get_role_display()}. {how}"
            )
            return redirect("console:members")
    return _members_page(request, invite_form=form)


@require_POST
@tenant_page(Role.ADMIN, "change roles")
def member_change_role(request: HttpRequest, membership_id: int) -> HttpResponse:
    console = request.console
    membership = selectors.access_membership(tenant=console.tenant, membership_id=membership_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the roles offered.")
        return redirect("console:members")
    try:
        changed = services.member_change_role(
            membership=membership, role=form.cleaned_data["role"], actor=console.actor
        )
    except SluiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(
            request, f"{changed.user.get_username()} is now {changed.get_role_display()}."
        )
    return redirect("console:members")


@require_POST
@tenant_page(Role.VIEWER, "leave the tenant")
def member_remove(request: HttpRequest, membership_id: int) -> HttpResponse:
    console = request.console
    membership = selectors.access_membership(tenant=console.tenant, membership_id=membership_id)
    leaving = membership.user_id == console.user.pk
    if not leaving:
        policy.require_role(console.actor, console.tenant, Role.ADMIN, "remove members")
    try:
        services.member_remove(membership=membership, actor=console.actor)
    except SluiceError as exc:
        messages.error(request, exc.message)
        return redirect("console:members")
    if leaving:
        request.session.pop(SESSION_KEY, None)
        messages.success(request, f"You left {console.tenant.name}.")
        return redirect("console:home")
    who = membership.user.get_username()
    messages.success(request, f"Removed {who} from {console.tenant.name}.")
    return redirect("console:members")


# --- audit --------------------------------------------------------------------------------

AUDIT_FAMILIES = {
    "apikey": "API keys",
    "access_request": "Access requests",
    "subscription": "Subscriptions",
    "quota": "Quotas",
    "member": "Members",
    "prompt_api": "Prompt-APIs",
    "tenant": "Tenant",
}


@tenant_page(Role.ADMIN, "read the audit trail")
def audit(request: HttpRequest) -> HttpResponse:
    events = selectors.audit_events_for(request.console.tenant)
    family = request.GET.get("action", "")
    if family in AUDIT_FAMILIES:
        events = events.filter(action__startswith=f"{family}.")
    else:
        family = ""
    page = paginate(request, events, per_page=50)
    for event in page:
        event.changes = _changes(event.before, event.after)
    context = {"page": page, "family": family, "families": AUDIT_FAMILIES.items()}
    return render(request, "console/audit.html", context)


def _changes(before: dict, after: dict) -> list[tuple[str, str, str]]:
    """(field, before, after) rows; a field only in one side shows a dash on the other."""
    names = list(dict.fromkeys([*before, *after]))
    return [
        (
            name,
            _shown(before[name]) if name in before else "—",
            _shown(after[name]) if name in after else "—",
        )
        for name in names
    ]


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
