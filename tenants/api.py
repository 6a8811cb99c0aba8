"""Management API for the tenant's own things: keys, access requests, members, audit."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response

from gateway import selectors as gateway_selectors
from sluice import errors
from sluice.api import ManagementView, StrictSerializer

from . import policy, selectors, services
from .models import QUOTA_FIELDS, AccessRequest, Role, Scope

# --- output shapes ----------------------------------------------------------------------


class ApiKeyOut(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField(source="display_prefix")
    scopes = serializers.ListField(child=serializers.CharField())
    status = serializers.CharField()
    created_by = serializers.CharField(source="created_by.username", default=None)
    expires_at = serializers.DateTimeField()
    revoked_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()


class ApiKeyCreatedOut(ApiKeyOut):
    key = serializers.CharField(help_text="The raw key. It is shown this once and never again.")
    warning = serializers.CharField()


class AccessRequestOut(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    tenant = serializers.CharField(source="tenant.slug")
    state = serializers.CharField()
    target = serializers.CharField(source="target_label")
    deployment = serializers.CharField(source="deployment.slug", default=None)
    prompt_api = serializers.CharField(source="prompt_api.slug", default=None)
    prompt_api_version = serializers.SerializerMethodField()
    quota = serializers.JSONField()
    justification = serializers.CharField()
    requester = serializers.CharField(source="requester.username", default=None)
    reviewer = serializers.CharField(source="reviewer.username", default=None)
    review_note = serializers.CharField()
    decided_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()

    def get_prompt_api_version(self, obj: AccessRequest) -> dict | None:
        version = obj.prompt_api_version
        if version is None:
            return None
        return {"prompt_api": version.prompt_api.slug, "number": version.number}


class MemberOut(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField(source="user.username")
    email = serializers.CharField(source="user.email")
    role = serializers.CharField()
    created_at = serializers.DateTimeField()


class SubscriptionOut(serializers.Serializer):
    id = serializers.IntegerField()
    deployment = serializers.CharField(source="deployment.slug", default=None)
    prompt_api = serializers.CharField(source="prompt_api.slug", default=None)
    created_at = serializers.DateTimeField()
    revoked_at = serializers.DateTimeField()


class AuditEventOut(serializers.Serializer):
    id = serializers.IntegerField()
    at = serializers.DateTimeField()
    actor = serializers.CharField(source="actor.username", default=None)
    actor_key = serializers.CharField(source="actor_key.display_prefix", default=None)
    action = serializers.CharField()
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    target = serializers.CharField(source="target_repr")
    before = serializers.JSONField()
    after = serializers.JSONField()


# --- tenant -----------------------------------------------------------------------------


class TenantView(ManagementView):
    @extend_schema(
        summary="The tenant this request acts in, its plan, effective limits and your role",
        responses=inline_serializer(
            "Tenant",
            {
                "slug": serializers.CharField(),
                "name": serializers.CharField(),
                "status": serializers.CharField(),
                "plan": serializers.CharField(),
                "role": serializers.CharField(),
                "limits": serializers.DictField(),
            },
        ),
    )
    def get(self, request):
        limits = self.tenant.limits()
        return Response(
            {
                "slug": self.tenant.slug,
                "name": self.tenant.name,
                "status": self.tenant.status,
                "plan": self.tenant.plan.slug,
                "role": policy.role_in(self.actor, self.tenant),
                "limits": limits.__dict__,
                "requires_platform_approval": self.tenant.plan.requires_platform_approval,
            }
        )


# --- API keys ---------------------------------------------------------------------------


class ApiKeyListView(ManagementView):
    class KeyInput(StrictSerializer):
        name = serializers.CharField(max_length=100)
        scopes = serializers.ListField(
            child=serializers.ChoiceField(choices=Scope.choices),
            required=False,
            help_text="Defaults to ['inference'].",
        )
        expires_at = serializers.DateTimeField(required=False, allow_null=True)

    @extend_schema(summary="List the tenant's API keys", responses=ApiKeyOut(many=True))
    def get(self, request):
        policy.require_role(self.actor, self.tenant, Role.VIEWER, "list API keys")
        return self.paginated(selectors.api_keys_for(self.tenant), ApiKeyOut)

    @extend_schema(
        summary="Issue an API key (the raw key is in this response only)",
        request=KeyInput,
        responses={201: ApiKeyCreatedOut},
    )
    def post(self, request):
        policy.require_role(self.actor, self.tenant, Role.MEMBER, "issue API keys")
        data = self.KeyInput(data=request.data)
        data.is_valid(raise_exception=True)
        key, raw = services.api_key_issue(
            tenant=self.tenant, actor=self.actor, **data.validated_data
        )
        return Response(_created(key, raw), status=status.HTTP_201_CREATED)


def _created(key, raw: str) -> dict:
    body = dict(ApiKeyOut(key).data)
    body["key"] = raw
    body["warning"] = "Copy this key now: Sluice stores only its hash and cannot show it again."
    return body


class ApiKeyDetailView(ManagementView):
    @extend_schema(summary="One API key", responses=ApiKeyOut)
    def get(self, request, key_id: int):
        policy.require_role(self.actor, self.tenant, Role.VIEWER, "read API keys")
        return Response(ApiKeyOut(selectors.access_api_key(tenant=self.tenant, key_id=key_id)).data)


def _require_key_control(view: ManagementView, key) -> None:
    own = view.actor.user is not None and key.created_by_id == view.actor.user.pk
    role = Role.MEMBER if own else Role.ADMIN
    doing = "manage your keys" if own else "manage other people's keys"
    policy.require_role(view.actor, view.tenant, role, doing)


class ApiKeyRevokeView(ManagementView):
    @extend_schema(
        summary="Revoke an API key (refused everywhere within seconds)",
        request=None,
        responses=ApiKeyOut,
    )
    def post(self, request, key_id: int):
        key = selectors.access_api_key(tenant=self.tenant, key_id=key_id)
        _require_key_control(self, key)
        return Response(ApiKeyOut(services.api_key_revoke(key=key, actor=self.actor)).data)


class ApiKeyRotateView(ManagementView):
    @extend_schema(
        summary="Replace a key with a new one (same name, scopes, expiry); the old one is revoked",
        request=None,
        responses={201: ApiKeyCreatedOut},
    )
    def post(self, request, key_id: int):
        key = selectors.access_api_key(tenant=self.tenant, key_id=key_id)
        _require_key_control(self, key)
        new_key, raw = services.api_key_rotate(key=key, actor=self.actor)
        return Response(_created(new_key, raw), status=status.HTTP_201_CREATED)


# --- access requests --------------------------------------------------------------------


class QuotaInput(StrictSerializer):
    """The limits a raise_quota request asks for: each at most what the database can hold."""

    requests_per_minute = serializers.IntegerField(
        required=False, min_value=1, max_value=services.quota_maximum("requests_per_minute")
    )
    tokens_per_minute = serializers.IntegerField(
        required=False, min_value=1, max_value=services.quota_maximum("tokens_per_minute")
    )
    monthly_token_budget = serializers.IntegerField(
        required=False, min_value=1, max_value=services.quota_maximum("monthly_token_budget")
    )
    max_tokens_cap = serializers.IntegerField(
        required=False, min_value=1, max_value=services.quota_maximum("max_tokens_cap")
    )


class AccessRequestListView(ManagementView):
    tenant_required = False  # staff without a tenant see every tenant's queue

    class AccessRequestInput(StrictSerializer):
        kind = serializers.ChoiceField(choices=AccessRequest.Kind.choices)
        deployment = serializers.CharField(required=False, help_text="Deployment slug.")
        prompt_api = serializers.CharField(required=False, help_text="Prompt-API slug.")
        version = serializers.IntegerField(
            required=False,
            min_value=1,
            help_text="For publish_version: the version number of `prompt_api`.",
        )
        quota = QuotaInput(
            required=False, help_text=f"For raise_quota: any of {', '.join(QUOTA_FIELDS)}."
        )
        justification = serializers.CharField(required=False, allow_blank=True, max_length=2000)

    @extend_schema(
        summary="List access requests",
        parameters=[OpenApiParameter("state", enum=AccessRequest.State.values)],
        responses=AccessRequestOut(many=True),
    )
    def get(self, request):
        if self.tenant is not None:
            policy.require_role(self.actor, self.tenant, Role.VIEWER, "list access requests")
        queryset = selectors.access_requests_for(self.tenant)
        state = request.query_params.get("state")
        if state:
            if state not in AccessRequest.State.values:
                raise errors.SluiceError(
                    errors.INVALID_REQUEST,
                    f"state must be one of {', '.join(AccessRequest.State.values)}.",
                    param="state",
                )
            queryset = queryset.filter(state=state)
        return self.paginated(queryset, AccessRequestOut)

    @extend_schema(
        summary="Request access to a deployment or prompt-API, a higher quota, or publication",
        request=AccessRequestInput,
        responses={201: AccessRequestOut},
    )
    def post(self, request):
        if self.tenant is None:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                "Name the tenant the request is for (?tenant=<slug>).",
                param="tenant",
            )
        policy.require_role(self.actor, self.tenant, Role.MEMBER, "request access")
        data = self.AccessRequestInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        kind = fields.pop("kind")
        target = _request_target(self, kind, fields)
        created = services.access_request_create(
            tenant=self.tenant,
            kind=kind,
            actor=self.actor,
            justification=fields.get("justification", ""),
            **target,
        )
        return Response(AccessRequestOut(created).data, status=status.HTTP_201_CREATED)


def _request_target(view: ManagementView, kind: str, fields: dict) -> dict:
    Kind = AccessRequest.Kind

    def need(name: str):
        if not fields.get(name):
            raise errors.SluiceError(
                errors.INVALID_REQUEST, f"A {kind} request needs '{name}'.", param=name
            )
        return fields[name]

    if kind == Kind.SUBSCRIBE_DEPLOYMENT:
        slug = need("deployment")
        return {"deployment": gateway_selectors.access_deployment(tenant=view.tenant, slug=slug)}
    if kind == Kind.SUBSCRIBE_PROMPT_API:
        slug = need("prompt_api")
        return {"prompt_api": gateway_selectors.access_prompt_api(tenant=view.tenant, slug=slug)}
    if kind == Kind.RAISE_QUOTA:
        return {"quota": need("quota")}
    prompt_api = gateway_selectors.access_prompt_api(tenant=view.tenant, slug=need("prompt_api"))
    if prompt_api.tenant_id != view.tenant.pk:
        raise errors.SluiceError(errors.NOT_FOUND, f"No prompt-API '{prompt_api.slug}' of yours.")
    version = gateway_selectors.access_version(prompt_api=prompt_api, number=need("version"))
    return {"prompt_api_version": version}


class AccessRequestDetailView(ManagementView):
    tenant_required = False

    @extend_schema(summary="One access request", responses=AccessRequestOut)
    def get(self, request, request_id: int):
        found = selectors.access_access_request(tenant=self.tenant, request_id=request_id)
        return Response(AccessRequestOut(found).data)


class _ReviewInput(StrictSerializer):
    note = serializers.CharField(required=False, allow_blank=True, max_length=2000)


class AccessRequestApproveView(ManagementView):
    tenant_required = False

    @extend_schema(
        summary="Approve a pending request", request=_ReviewInput, responses=AccessRequestOut
    )
    def post(self, request, request_id: int):
        found = selectors.access_access_request(tenant=self.tenant, request_id=request_id)
        data = _ReviewInput(data=request.data)
        data.is_valid(raise_exception=True)
        decided = services.access_request_approve(
            access_request=found, actor=self.actor, note=data.validated_data.get("note", "")
        )
        return Response(AccessRequestOut(decided).data)


class AccessRequestRejectView(ManagementView):
    tenant_required = False

    @extend_schema(
        summary="Reject a pending request", request=_ReviewInput, responses=AccessRequestOut
    )
    def post(self, request, request_id: int):
        found = selectors.access_access_request(tenant=self.tenant, request_id=request_id)
        data = _ReviewInput(data=request.data)
        data.is_valid(raise_exception=True)
        decided = services.access_request_reject(
            access_request=found, actor=self.actor, note=data.validated_data.get("note", "")
        )
        return Response(AccessRequestOut(decided).data)


class AccessRequestWithdrawView(ManagementView):
    @extend_schema(
        summary="Withdraw your own pending request", request=None, responses=AccessRequestOut
    )
    def post(self, request, request_id: int):
        found = selectors.access_access_request(tenant=self.tenant, request_id=request_id)
        return Response(
            AccessRequestOut(
                services.access_request_withdraw(access_request=found, actor=self.actor)
            ).data
        )


# --- subscriptions ----------------------------------------------------------------------


class SubscriptionListView(ManagementView):
    @extend_schema(
        summary="The deployments and prompt-APIs this tenant may call",
        responses=SubscriptionOut(many=True),
    )
    def get(self, request):
        policy.require_role(self.actor, self.tenant, Role.VIEWER, "list subscriptions")
        return self.paginated(selectors.subscriptions_of(self.tenant), SubscriptionOut)


# --- members ----------------------------------------------------------------------------


class MemberListView(ManagementView):
    class InviteInput(StrictSerializer):
        email = serializers.EmailField(max_length=services.INVITE_EMAIL_MAX_LENGTH)
        role = serializers.ChoiceField(choices=Role.choices, default=Role.MEMBER)

    @extend_schema(summary="List the tenant's members", responses=MemberOut(many=True))
    def get(self, request):
        policy.require_role(self.actor, self.tenant, Role.VIEWER, "list members")
        return self.paginated(selectors.members_of(self.tenant), MemberOut)

    @extend_schema(
        summary="Invite someone by e-mail (an account is created if they have none)",
        request=InviteInput,
        responses={201: MemberOut},
    )
    def post(self, request):
        policy.require_role(self.actor, self.tenant, Role.ADMIN, "invite members")
        data = self.InviteInput(data=request.data)
        data.is_valid(raise_exception=True)
        membership, _ = services.member_invite(
            tenant=self.tenant, actor=self.actor, **data.validated_data
        )
        return Response(MemberOut(membership).data, status=status.HTTP_201_CREATED)


class MemberDetailView(ManagementView):
    class RoleInput(StrictSerializer):
        role = serializers.ChoiceField(choices=Role.choices)

    @extend_schema(summary="One member", responses=MemberOut)
    def get(self, request, membership_id: int):
        policy.require_role(self.actor, self.tenant, Role.VIEWER, "read members")
        found = selectors.access_membership(tenant=self.tenant, membership_id=membership_id)
        return Response(MemberOut(found).data)

    @extend_schema(summary="Change a member's role", request=RoleInput, responses=MemberOut)
    def patch(self, request, membership_id: int):
        found = selectors.access_membership(tenant=self.tenant, membership_id=membership_id)
        policy.require_role(self.actor, self.tenant, Role.ADMIN, "change roles")
        data = self.RoleInput(data=request.data)
        data.is_valid(raise_exception=True)
        changed = services.member_change_role(
            membership=found, role=data.validated_data["role"], actor=self.actor
        )
        return Response(MemberOut(changed).data)

    @extend_schema(summary="Remove a member (anyone may remove themselves)", responses={204: None})
    def delete(self, request, membership_id: int):
        found = selectors.access_membership(tenant=self.tenant, membership_id=membership_id)
        if self.actor.user is None or found.user_id != self.actor.user.pk:
            policy.require_role(self.actor, self.tenant, Role.ADMIN, "remove members")
        services.member_remove(membership=found, actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- audit ------------------------------------------------------------------------------


class AuditEventListView(ManagementView):
    @extend_schema(
        summary="The tenant's audit trail (admins and owners)", responses=AuditEventOut(many=True)
    )
    def get(self, request):
        policy.require_role(self.actor, self.tenant, Role.ADMIN, "read the audit trail")
        return self.paginated(selectors.audit_events_for(self.tenant), AuditEventOut)
