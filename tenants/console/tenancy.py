"""Which tenant a console page acts in, who is acting, and how errors reach the page.

The current tenant's slug lives in the session (the switcher sets it); without one a
user acts in their first membership. Platform staff may switch to any tenant; staff who
belong to none start on a page that lets them pick one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme

from sluice import errors
from sluice.errors import SluiceError
from tenants import policy, selectors
from tenants.models import Membership, Role, Tenant
from tenants.policy import Actor

SESSION_KEY = "sluice_console_tenant"


class Console:
    """The acting user, their current tenant and role; computed lazily, once per request.

    Lazy on purpose: the context processor hands this object to every template, and a
    page that never mentions the tenant (500.html) must not touch the database.
    """

    def __init__(self, request: HttpRequest) -> None:
        self.request = request

    @cached_property
    def user(self):
        return self.request.user

    @cached_property
    def actor(self) -> Actor:
        return Actor(user=self.user)

    @cached_property
    def is_staff(self) -> bool:
        return self.actor.is_staff

    @cached_property
    def tenant(self) -> Tenant | None:
        if not self.user.is_authenticated:
            return None
        chosen = self.request.session.get(SESSION_KEY)
        if chosen:
            found = selectors.tenants_of(self.user).filter(slug=chosen).first()
            if found is not None:
                return found
        membership = (
            Membership.objects.filter(user=self.user).select_related("tenant__plan").first()
        )
        return membership.tenant if membership else None

    @cached_property
    def tenants(self) -> list[Tenant]:
        """Every tenant the switcher offers."""
        if not self.user.is_authenticated:
            return []
        return list(selectors.tenants_of(self.user).distinct())

    @cached_property
    def membership(self) -> Membership | None:
        if self.tenant is None:
            return None
        return policy.membership(self.actor, self.tenant)

    @cached_property
    def role(self) -> str | None:
        """The role this user holds here; staff without a membership act as owners."""
        if self.tenant is None:
            return None
        return policy.role_in(self.actor, self.tenant)

    @cached_property
    def role_label(self) -> str:
        if self.membership is not None:
            label = self.membership.get_role_display()
            return f"{label} · staff" if self.is_staff else label
        return "Platform staff" if self.is_staff else ""

    def has_role(self, role: str) -> bool:
        return self.tenant is not None and policy.has_role(self.actor, self.tenant, role)

    @cached_property
    def is_member(self) -> bool:
        return self.has_role(Role.MEMBER)

    @cached_property
    def is_admin(self) -> bool:
        return self.has_role(Role.ADMIN)

    @cached_property
    def is_owner(self) -> bool:
        return self.has_role(Role.OWNER)

    @cached_property
    def pending_reviews(self) -> int:
        """How many pending requests of this tenant the user may decide (the nav badge)."""
        if self.tenant is None or not self.is_admin:
            return 0
        pending = selectors.access_requests_for(self.tenant).filter(state="pending")
        return sum(1 for found in pending if policy.can_review(self.actor, found))


def console_of(request: HttpRequest) -> Console:
    state = getattr(request, "_sluice_console", None)
    if state is None:
        state = Console(request)
        request._sluice_console = state
    return state


def switch_to(request: HttpRequest, tenant: Tenant) -> None:
    request.session[SESSION_KEY] = tenant.slug
    request._sluice_console = None


# --- errors -------------------------------------------------------------------------------


def error_page(request: HttpRequest, exc: SluiceError) -> HttpResponse:
    """Render a SluiceError as a page: 404 for NOT_FOUND, 403 for refusals, else its status."""
    if exc.error is errors.NOT_FOUND:
        return render(request, "404.html", {"message": exc.message}, status=404)
    if exc.error.status == 403:
        return render(request, "403.html", {"message": exc.message}, status=403)
    return render(
        request,
        "console/error.html",
        {"message": exc.message, "code": exc.error.code},
        status=exc.error.status,
    )


def back(request: HttpRequest, fallback: str = "console:home", *args: Any) -> HttpResponse:
    """Redirect to the page the form was posted from (same host only), else fallback."""
    target = request.POST.get("next") or request.headers.get("Referer", "")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return redirect(target)
    return redirect(fallback, *args)


def tenant_page(role: str = Role.VIEWER, doing: str = "see this page") -> Callable:
    """A console page that needs a signed-in user with `role` in the current tenant.

    The view gets `request.console` (a Console). A SluiceError that escapes the view is
    rendered as a page (404 for anything not found in this tenant), never as a 500; on a
    POST a business-rule refusal goes back to the previous page as a message.
    """

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @login_required
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            state = console_of(request)
            request.console = state
            if state.tenant is None:
                return render(request, "console/no_tenant.html")
            try:
                policy.require_role(state.actor, state.tenant, role, doing)
                return view(request, *args, **kwargs)
            except SluiceError as exc:
                if request.method == "POST" and exc.error.status not in (403, 404):
                    messages.error(request, exc.message)
                    return back(request)
                return error_page(request, exc)

        return wrapped

    return decorator


def paginate(request: HttpRequest, queryset, per_page: int = 25):
    """One page of queryset for ?page=N; a page out of range gives the last one."""
    from django.core.paginator import Paginator

    return Paginator(queryset, per_page).get_page(request.GET.get("page"))
