"""Access pages: subscriptions, access requests, the forms that file them, the review queue."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from gateway import selectors as gateway_selectors
from sluice.errors import SluiceError
from tenants import policy, selectors, services
from tenants.models import AccessRequest, Role

from .forms import (
    DeploymentRequestForm,
    PromptApiRequestForm,
    QuotaRequestForm,
    ReviewForm,
    add_service_error,
)
from .tenancy import paginate, tenant_page

Kind = AccessRequest.Kind
State = AccessRequest.State


def _annotate(request: HttpRequest, access_request: AccessRequest) -> AccessRequest:
    """Attach what this user may do with the request, for the templates."""
    console = request.console
    pending = access_request.state == State.PENDING
    access_request.may_review = pending and policy.can_review(console.actor, access_request)
    access_request.may_withdraw = pending and (
        access_request.requester_id == console.user.pk or console.is_staff
    )
    access_request.reviewed_by_tenant = policy.tenant_admins_review(access_request)
    access_request.refusal = (
        policy.review_refusal(console.actor, access_request) if pending else None
    )
    return access_request


@tenant_page()
def access(request: HttpRequest) -> HttpResponse:
    tenant = request.console.tenant
    state = request.GET.get("state", "")
    requests = selectors.access_requests_for(tenant)
    if state in State.values:
        requests = requests.filter(state=state)
    else:
        state = ""
    page = paginate(request, requests)
    for found in page:
        _annotate(request, found)
    context = {
        "subscriptions": selectors.subscriptions_of(tenant).select_related("access_request"),
        "page": page,
        "state": state,
        "states": State.choices,
    }
    return render(request, "console/access/index.html", context)


def _request_forms(request: HttpRequest, bound: dict | None = None) -> dict:
    """The three request forms; `bound` replaces one of them with a submitted copy."""
    tenant = request.console.tenant
    subscribed = selectors.subscriptions_of(tenant)
    deployments = gateway_selectors.deployments_visible_to(tenant).exclude(
        pk__in=subscribed.filter(deployment__isnull=False).values("deployment_id")
    )
    prompt_apis = (
        gateway_selectors.prompt_apis_visible_to(tenant)
        .exclude(tenant=tenant)
        .exclude(pk__in=subscribed.filter(prompt_api__isnull=False).values("prompt_api_id"))
    )
    initial_deployment = {"deployment": request.GET.get("deployment")}
    initial_prompt_api = {"prompt_api": request.GET.get("prompt_api")}
    forms = {
        Kind.SUBSCRIBE_DEPLOYMENT: DeploymentRequestForm(
            deployments=deployments, initial=initial_deployment, prefix="d"
        ),
        Kind.SUBSCRIBE_PROMPT_API: PromptApiRequestForm(
            prompt_apis=prompt_apis, initial=initial_prompt_api, prefix="p"
        ),
        Kind.RAISE_QUOTA: QuotaRequestForm(limits=tenant.limits(), prefix="q"),
    }
    if bound:
        forms.update(bound)
    return {
        "deployment_form": forms[Kind.SUBSCRIBE_DEPLOYMENT],
        "prompt_api_form": forms[Kind.SUBSCRIBE_PROMPT_API],
        "quota_form": forms[Kind.RAISE_QUOTA],
        "deployments": deployments,
        "prompt_apis": prompt_apis,
        "active": next(iter(bound)) if bound else request.GET.get("kind", ""),
    }


def _bind(request: HttpRequest, kind: str):
    tenant = request.console.tenant
    empty = _request_forms(request)
    if kind == Kind.SUBSCRIBE_DEPLOYMENT:
        return DeploymentRequestForm(request.POST, deployments=empty["deployments"], prefix="d")
    if kind == Kind.SUBSCRIBE_PROMPT_API:
        return PromptApiRequestForm(request.POST, prompt_apis=empty["prompt_apis"], prefix="p")
    if kind == Kind.RAISE_QUOTA:
        return QuotaRequestForm(request.POST, limits=tenant.limits(), prefix="q")
    return None


def _filed_message(request: HttpRequest, filed: AccessRequest) -> None:
    if filed.state == State.APPROVED:
        messages.success(
            request,
            f"Approved automatically, because you may approve such requests yourself: "
            f"{filed.get_kind_display().lower()} — {filed.target_label}.",
        )
        return
    who = (
        "your tenant's owners and admins"
        if policy.tenant_admins_review(filed)
        else "the platform staff"
    )
    messages.success(request, f"Request filed: {filed.target_label}. It waits for {who} to review.")


@tenant_page(Role.MEMBER, "request access")
def access_request_create(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return render(request, "console/access/new.html", _request_forms(request))
    kind = request.POST.get("kind", "")
    form = _bind(request, kind)
    if form is None:
        messages.error(request, "Choose what to request.")
        return redirect("console:access_request_create")
    if form.is_valid():
        target: dict = {}
        if kind == Kind.SUBSCRIBE_DEPLOYMENT:
            target = {"deployment": form.cleaned_data["deployment"]}
        elif kind == Kind.SUBSCRIBE_PROMPT_API:
            target = {"prompt_api": form.cleaned_data["prompt_api"]}
        else:
            target = {"quota": form.quota()}
        try:
            filed = services.access_request_create(
                tenant=request.console.tenant,
                kind=kind,
                actor=request.console.actor,
                justification=form.cleaned_data.get("justification", ""),
                **target,
            )
        except SluiceError as exc:
            add_service_error(form, exc)
        else:
            _filed_message(request, filed)
            return redirect("console:access_request", request_id=filed.pk)
    return render(request, "console/access/new.html", _request_forms(request, {kind: form}))


@tenant_page()
def access_request_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    found = selectors.access_access_request(tenant=request.console.tenant, request_id=request_id)
    _annotate(request, found)
    context = {
        "r": found,
        "review_form": ReviewForm(),
        "refusal": policy.review_refusal(request.console.actor, found),
    }
    return render(request, "console/access/detail.html", context)


def _decide(request: HttpRequest, request_id: int, verb: str) -> HttpResponse:
    found = selectors.access_access_request(tenant=request.console.tenant, request_id=request_id)
    form = ReviewForm(request.POST)
    note = form.cleaned_data["note"] if form.is_valid() else ""
    decide = (
        services.access_request_approve if verb == "approve" else services.access_request_reject
    )
    try:
        decided = decide(access_request=found, actor=request.console.actor, note=note)
    except SluiceError as exc:
        messages.error(request, exc.message)
    else:
        done = "Approved" if verb == "approve" else "Rejected"
        messages.success(request, f"{done}: {decided.target_label}.")
    if request.POST.get("next") == "reviews":
        return redirect("console:reviews")
    return redirect("console:access_request", request_id=found.pk)


@require_POST
@tenant_page(Role.ADMIN, "review access requests")
def access_request_approve(request: HttpRequest, request_id: int) -> HttpResponse:
    return _decide(request, request_id, "approve")


@require_POST
@tenant_page(Role.ADMIN, "review access requests")
def access_request_reject(request: HttpRequest, request_id: int) -> HttpResponse:
    return _decide(request, request_id, "reject")


@require_POST
@tenant_page(Role.MEMBER, "withdraw access requests")
def access_request_withdraw(request: HttpRequest, request_id: int) -> HttpResponse:
    found = selectors.access_access_request(tenant=request.console.tenant, request_id=request_id)
    try:
        services.access_request_withdraw(access_request=found, actor=request.console.actor)
    except SluiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Withdrawn: {found.target_label}.")
    return redirect("console:access_request", request_id=found.pk)


@tenant_page(Role.ADMIN, "review access requests")
def reviews(request: HttpRequest) -> HttpResponse:
    pending = [
        _annotate(request, found)
        for found in selectors.access_requests_for(request.console.tenant).filter(
            state=State.PENDING
        )
    ]
    context = {
        "yours": [found for found in pending if found.may_review],
        "others": [found for found in pending if not found.may_review],
        "review_form": ReviewForm(),
    }
    return render(request, "console/access/reviews.html", context)
