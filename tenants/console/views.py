"""Console pages for signing in, choosing a tenant, and the tenant's overview.

The other pages live beside this module: keys.py, access.py, prompt_apis.py, members.py.
"""

from __future__ import annotations

from datetime import timedelta
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.db.models import Count, F, Q, Sum
from django.db.models.functions import TruncDate
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.utils import timezone
from django.views.decorators.http import require_POST
from django_ratelimit.decorators import ratelimit
from django_ratelimit.exceptions import Ratelimited

from analytics.selectors import call_logs_for
from sluice import errors
from tenants import selectors
from tenants.models import AccessRequest

from .tenancy import error_page, switch_to, tenant_page

# --- signing in ---------------------------------------------------------------------------


def _ratelimited_as_429(view):
    """Answer django-ratelimit's refusal with the 429 page.

    Ratelimited is a PermissionDenied, so without this (or RatelimitMiddleware, which
    the settings do not install) a blocked login would be a bare 403.
    """

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except Ratelimited as exc:
            return errors.ratelimited_view(request, exc)

    return wrapped


class LoginView(auth_views.LoginView):
    template_name = "console/login.html"
    redirect_authenticated_user = True


# Counted per client address and per username tried, so neither one machine guessing many
# accounts nor many machines guessing one account get more than LOGIN_RATE_LIMIT tries.
login = _ratelimited_as_429(
    ratelimit(
        group="console.login.ip",
        key="ip",
        rate=settings.LOGIN_RATE_LIMIT,
        method="POST",
        block=True,
    )(
        ratelimit(
            group="console.login.username",
            key="post:username",
            rate=settings.LOGIN_RATE_LIMIT,
            method="POST",
            block=True,
        )(LoginView.as_view())
    )
)

logout = auth_views.LogoutView.as_view()


class InviteAcceptView(auth_views.PasswordResetConfirmView):
    """The link in the invitation e-mail: choose a password, then you are signed in."""

    template_name = "console/invite_accept.html"
    post_reset_login = True
    success_url = reverse_lazy("console:home")

    def form_valid(self, form):
        response = super().form_valid(form)
        messages.success(self.request, "Your password is set and you are signed in. Welcome!")
        return response


invite_accept = InviteAcceptView.as_view()


# --- tenant switcher ----------------------------------------------------------------------


@login_required
@require_POST
def switch_tenant(request: HttpRequest) -> HttpResponse:
    slug = request.POST.get("tenant", "")
    # PostgreSQL cannot even compare text holding NUL, and no slug holds one.
    tenant = (
        None if "\x00" in slug else selectors.tenants_of(request.user).filter(slug=slug).first()
    )
    if tenant is None:
        return error_page(
            request, errors.SluiceError(errors.NOT_FOUND, f"No tenant '{slug}' that you belong to.")
        )
    switch_to(request, tenant)
    messages.info(request, f"You are now working in {tenant.name}.")
    return redirect("console:home")


# --- overview -----------------------------------------------------------------------------


def _usage(logs, since) -> dict:
    totals = logs.filter(created_at__gte=since).aggregate(
        requests=Count("id"),
        tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
        failed=Count("id", filter=Q(status_code__gte=400)),
    )
    requests = totals["requests"] or 0
    return {
        "requests": requests,
        "tokens": totals["tokens"] or 0,
        "failed": totals["failed"] or 0,
        "error_share": (totals["failed"] / requests * 100) if requests else None,
    }


def _daily(logs, now) -> list[dict]:
    """Requests per day for the last 7 days (oldest first), with bar heights in percent."""
    first = (now - timedelta(days=6)).date()
    counted = {
        row["day"]: row
        for row in logs.filter(created_at__date__gte=first)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(requests=Count("id"), failed=Count("id", filter=Q(status_code__gte=400)))
    }
    days = []
    for offset in range(7):
        day = first + timedelta(days=offset)
        row = counted.get(day, {})
        days.append(
            {"day": day, "requests": row.get("requests", 0), "failed": row.get("failed", 0)}
        )
    top = max(day["requests"] for day in days) or 1
    for day in days:
        day["height"] = round(day["requests"] / top * 100)
    return days


@tenant_page()
def home(request: HttpRequest) -> HttpResponse:
    tenant = request.console.tenant
    now = timezone.now()
    logs = call_logs_for(tenant)
    context = {
        "limits": tenant.limits(),
        "counts": {
            "keys": selectors.api_keys_for(tenant).usable().count(),
            "subscriptions": selectors.subscriptions_of(tenant).count(),
            "pending": selectors.access_requests_for(tenant)
            .filter(state=AccessRequest.State.PENDING)
            .count(),
            "members": selectors.members_of(tenant).count(),
        },
        "day": _usage(logs, now - timedelta(hours=24)),
        "week": _usage(logs, now - timedelta(days=7)),
        "daily": _daily(logs, now),
        "recent": logs.select_related("prompt_api_version__prompt_api")[:10],
    }
    return render(request, "console/home.html", context)
