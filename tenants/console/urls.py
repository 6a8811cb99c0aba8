"""The tenant console, mounted at /."""

from __future__ import annotations

from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import path

from . import access, keys, members, prompt_apis, views

app_name = "console"

version = "prompt-apis/<slug:slug>/versions/<int:number>/"

urlpatterns = [
    path("", views.home, name="home"),
    # Signing in
    path("login/", views.login, name="login"),
    path("logout/", views.logout, name="logout"),
    path("invite/<uidb64>/<token>/", views.invite_accept, name="invite_accept"),
    path("switch/", views.switch_tenant, name="switch_tenant"),
    # API keys
    path("keys/", keys.key_list, name="keys"),
    path("keys/new/", keys.key_create, name="key_create"),
    path("keys/<int:key_id>/", keys.key_detail, name="key"),
    path("keys/<int:key_id>/revoke/", keys.key_revoke, name="key_revoke"),
    path("keys/<int:key_id>/rotate/", keys.key_rotate, name="key_rotate"),
    # Access: subscriptions and requests
    path("access/", access.access, name="access"),
    path("access/new/", access.access_request_create, name="access_request_create"),
    path("access/reviews/", access.reviews, name="reviews"),
    path("access/<int:request_id>/", access.access_request_detail, name="access_request"),
    path(
        "access/<int:request_id>/approve/",
        access.access_request_approve,
        name="access_request_approve",
    ),
    path(
        "access/<int:request_id>/reject/",
        access.access_request_reject,
        name="access_request_reject",
    ),
    path(
        "access/<int:request_id>/withdraw/",
        access.access_request_withdraw,
        name="access_request_withdraw",
    ),
    # Prompt-APIs
    path("prompt-apis/", prompt_apis.prompt_api_list, name="prompt_apis"),
    path("prompt-apis/new/", prompt_apis.prompt_api_create, name="prompt_api_create"),
    path("prompt-apis/<slug:slug>/", prompt_apis.prompt_api_detail, name="prompt_api"),
    path(
        "prompt-apis/<slug:slug>/versions/new/",
        prompt_apis.version_create,
        name="version_create",
    ),
    path(version, prompt_apis.version_detail, name="version"),
    path(version + "edit/", prompt_apis.version_edit, name="version_edit"),
    path(version + "publish/", prompt_apis.version_publish, name="version_publish"),
    path(
        version + "request-publication/",
        prompt_apis.version_request_publish,
        name="version_request_publish",
    ),
    path(version + "activate/", prompt_apis.version_activate, name="version_activate"),
    # Members and audit
    path("members/", members.member_list, name="members"),
    path("members/invite/", members.member_invite, name="member_invite"),
    path("members/<int:membership_id>/role/", members.member_change_role, name="member_role"),
    path("members/<int:membership_id>/remove/", members.member_remove, name="member_remove"),
    path("audit/", members.audit, name="audit"),
]

# With DEBUG on (the demo), serve static/ from here: uvicorn, unlike runserver, does not.
# It adds nothing when DEBUG is off; production serves /static/ from STATIC_ROOT.
urlpatterns += staticfiles_urlpatterns()
