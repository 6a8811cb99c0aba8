"""URL map: console at /, platform admin at /admin/, management API at /api/, data plane at /v1/."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import include, is_valid_path, path, re_path
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from analytics import api as analytics_api
from gateway import api as gateway_api
from gateway import v1
from sluice import errors
from sluice.health import healthz
from sluice.middleware import is_api_path
from tenants import api as tenants_api

admin.site.site_header = "Sluice platform admin"
admin.site.site_title = "Sluice admin"
admin.site.index_title = "Platform"


class ApiDocsView(SpectacularSwaggerView):
    """Swagger UI. It is a page: OPTIONS gets Django's answer (Allow, no body), because
    DRF's would render its metadata into the page's template, which cannot show it."""

    def options(self, request, *args, **kwargs):
        return View.options(self, request, *args, **kwargs)


@csrf_exempt  # as DRF's views are; nothing here changes anything
def api_path_without_slash(request: HttpRequest, path: str) -> JsonResponse:
    """Every management-API path ends with a slash.

    Without this, Django's APPEND_SLASH would answer a 301 with an empty body, which
    clients follow with a GET (so a POST's body is lost), or, with DEBUG on, a 500.
    """
    message = f"No endpoint at {request.path}."
    with_slash = is_valid_path(f"{request.path_info}/")
    if with_slash and with_slash.func is not no_endpoint:
        message = f"{message} Management API paths end with a slash: {request.path}/"
    return errors.json_error(request, errors.NOT_FOUND, message)


@csrf_exempt
def no_endpoint(request: HttpRequest, **_: str) -> JsonResponse:
    """Any other path under /v1/ or /api/: the API's own 404, in DEBUG too (where Django
    would show its HTML technical 404 page instead of handler404)."""
    return errors.json_error(request, errors.NOT_FOUND, f"No endpoint at {request.path}.")


api_patterns = [
    path("tenant/", tenants_api.TenantView.as_view(), name="tenant"),
    path("keys/", tenants_api.ApiKeyListView.as_view(), name="keys"),
    path("keys/<int:key_id>/", tenants_api.ApiKeyDetailView.as_view(), name="key"),
    path("keys/<int:key_id>/revoke/", tenants_api.ApiKeyRevokeView.as_view(), name="key-revoke"),
    path("keys/<int:key_id>/rotate/", tenants_api.ApiKeyRotateView.as_view(), name="key-rotate"),
    path("access-requests/", tenants_api.AccessRequestListView.as_view(), name="access-requests"),
    path(
        "access-requests/<int:request_id>/",
        tenants_api.AccessRequestDetailView.as_view(),
        name="access-request",
    ),
    path(
        "access-requests/<int:request_id>/approve/",
        tenants_api.AccessRequestApproveView.as_view(),
        name="access-request-approve",
    ),
    path(
        "access-requests/<int:request_id>/reject/",
        tenants_api.AccessRequestRejectView.as_view(),
        name="access-request-reject",
    ),
    path(
        "access-requests/<int:request_id>/withdraw/",
        tenants_api.AccessRequestWithdrawView.as_view(),
        name="access-request-withdraw",
    ),
    path("subscriptions/", tenants_api.SubscriptionListView.as_view(), name="subscriptions"),
    path("members/", tenants_api.MemberListView.as_view(), name="members"),
    path("members/<int:membership_id>/", tenants_api.MemberDetailView.as_view(), name="member"),
    path("audit-events/", tenants_api.AuditEventListView.as_view(), name="audit-events"),
    path("deployments/", gateway_api.DeploymentListView.as_view(), name="deployments"),
    path("deployments/<str:slug>/", gateway_api.DeploymentDetailView.as_view(), name="deployment"),
    path("prompt-apis/", gateway_api.PromptApiListView.as_view(), name="prompt-apis"),
    path("prompt-apis/<slug:slug>/", gateway_api.PromptApiDetailView.as_view(), name="prompt-api"),
    path(
        "prompt-apis/<slug:slug>/versions/",
        gateway_api.VersionListView.as_view(),
        name="versions",
    ),
    path(
        "prompt-apis/<slug:slug>/versions/<int:number>/",
        gateway_api.VersionDetailView.as_view(),
        name="version",
    ),
    path(
        "prompt-apis/<slug:slug>/versions/<int:number>/publish/",
        gateway_api.VersionPublishView.as_view(),
        name="version-publish",
    ),
    path(
        "prompt-apis/<slug:slug>/versions/<int:number>/activate/",
        gateway_api.VersionActivateView.as_view(),
        name="version-activate",
    ),
    path("call-logs/", analytics_api.CallLogListView.as_view(), name="call-logs"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", ApiDocsView.as_view(url_name="api:schema"), name="docs"),
    re_path(r"^(?P<path>.*[^/])$", api_path_without_slash),
    re_path(r"^", no_endpoint),
]

v1_patterns = [
    path("chat/completions", v1.ChatCompletionsView.as_view(), name="chat-completions"),
    path("completions", v1.CompletionsView.as_view(), name="completions"),
    path("embeddings", v1.EmbeddingsView.as_view(), name="embeddings"),
    path("models", v1.ModelListView.as_view(), name="models"),
    path("models/<str:model>", v1.ModelDetailView.as_view(), name="model"),
    path("apis/<slug:slug>", v1.PromptApiView.as_view(), name="prompt-api"),
    re_path(r"^", no_endpoint),
]

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("v1/", include((v1_patterns, "v1"))),
    re_path(r"^v1$", no_endpoint),
    path("admin/", admin.site.urls),
    path("api/", include((api_patterns, "api"))),
    path("", include("tenants.console.urls")),
]


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if is_api_path(request.path):
        return errors.json_error(request, errors.NOT_FOUND, f"No endpoint at {request.path}.")
    return render(request, "404.html", status=404)


def handler500(request: HttpRequest) -> HttpResponse:
    if is_api_path(request.path):
        return errors.json_error(
            request,
            errors.INTERNAL_ERROR,
            "Internal server error; it has been logged. Quote the request_id if you report it.",
        )
    return render(request, "500.html", status=500)


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return errors.json_error(request, errors.INVALID_REQUEST, "Bad request.")
