"""Management API for deployments (staff write, tenants read) and prompt-APIs."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from sluice import errors
from sluice.api import ManagementView, StrictSerializer
from tenants import policy
from tenants.models import Role, Subscription

from . import selectors, services
from .models import MODEL_NAME, ModelDeployment, PromptApi, PromptApiVersion

# --- deployments ------------------------------------------------------------------------


class DeploymentOut(serializers.Serializer):
    slug = serializers.CharField(help_text="The `model` name clients send.")
    name = serializers.CharField()
    description = serializers.CharField()
    task = serializers.CharField()
    capacity = serializers.IntegerField()
    max_batch_size = serializers.IntegerField()
    max_wait_ms = serializers.IntegerField()
    default_deadline_s = serializers.FloatField()
    enabled = serializers.BooleanField()
    subscribed = serializers.SerializerMethodField()

    def get_subscribed(self, obj: ModelDeployment) -> bool | None:
        subscribed = self.context.get("subscribed")
        return None if subscribed is None else obj.pk in subscribed


class DeploymentStaffOut(DeploymentOut):
    backend = serializers.CharField()
    backend_config = serializers.JSONField()
    queue_name = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class DeploymentInput(StrictSerializer):
    slug = serializers.CharField(max_length=100, validators=[MODEL_NAME])
    name = serializers.CharField(max_length=100)
    description = serializers.CharField(required=False, allow_blank=True)
    task = serializers.ChoiceField(choices=ModelDeployment.Task.choices)
    backend = serializers.RegexField(
        r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$",
        max_length=200,
        error_messages={
            "invalid": "backend must be a dotted Python path such as pkg.module.Class."
        },
    )
    backend_config = serializers.DictField(required=False)
    capacity = serializers.IntegerField(required=False, min_value=1, max_value=100_000)
    max_batch_size = serializers.IntegerField(required=False, min_value=1, max_value=1024)
    max_wait_ms = serializers.IntegerField(required=False, min_value=0, max_value=10_000)
    default_deadline_s = serializers.FloatField(required=False, min_value=0.1, max_value=3600)
    enabled = serializers.BooleanField(required=False)


def _deployment_body(view: ManagementView, deployment_or_list, many: bool = False):
    if view.actor.is_staff:
        return DeploymentStaffOut(deployment_or_list, many=many, context=_context(view)).data
    return DeploymentOut(deployment_or_list, many=many, context=_context(view)).data


def _context(view: ManagementView) -> dict:
    if view.tenant is None:
        return {}
    subscribed = set(
        Subscription.objects.filter(
            tenant=view.tenant, deployment__isnull=False, revoked_at__isnull=True
        ).values_list("deployment_id", flat=True)
    )
    return {"subscribed": subscribed}


class DeploymentListView(ManagementView):
    tenant_required = False

    @extend_schema(summary="List model deployments", responses=DeploymentOut(many=True))
    def get(self, request):
        queryset = selectors.deployments_visible_to(None if self.actor.is_staff else self.tenant)
        page = self.pagination_class()
        rows = page.paginate_queryset(queryset, request, view=self)
        return page.get_paginated_response(_deployment_body(self, rows, many=True))

    @extend_schema(
        summary="Create a deployment (staff)",
        request=DeploymentInput,
        responses={201: DeploymentStaffOut},
    )
    def post(self, request):
        policy.require_staff(self.actor, "create deployments")
        data = DeploymentInput(data=request.data)
        data.is_valid(raise_exception=True)
        deployment = services.deployment_create(actor=self.actor, **data.validated_data)
        return Response(_deployment_body(self, deployment), status=status.HTTP_201_CREATED)


class DeploymentDetailView(ManagementView):
    tenant_required = False

    @extend_schema(summary="One deployment", responses=DeploymentOut)
    def get(self, request, slug: str):
        scope = None if self.actor.is_staff else self.tenant
        return Response(
            _deployment_body(self, selectors.access_deployment(tenant=scope, slug=slug))
        )

    @extend_schema(
        summary="Change a deployment (staff)", request=DeploymentInput, responses=DeploymentStaffOut
    )
    def patch(self, request, slug: str):
        policy.require_staff(self.actor, "change deployments")
        deployment = selectors.access_deployment(tenant=None, slug=slug)
        data = DeploymentInput(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        changed = services.deployment_update(
            deployment=deployment, actor=self.actor, **data.validated_data
        )
        return Response(_deployment_body(self, changed))


# --- prompt-APIs ------------------------------------------------------------------------


class PromptApiOut(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField()
    visibility = serializers.CharField()
    owner = serializers.CharField(
        source="tenant.slug", default=None, help_text="Owning tenant; null for platform-wide."
    )
    active_version = serializers.IntegerField(source="active_version.number", default=None)
    endpoint = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()

    def get_endpoint(self, obj: PromptApi) -> str:
        return f"/v1/apis/{obj.slug}"


class VersionOut(serializers.Serializer):
    number = serializers.IntegerField()
    state = serializers.CharField()
    messages = serializers.JSONField()
    input_schema = serializers.JSONField()
    output_type = serializers.CharField()
    output_schema = serializers.JSONField()
    deployment = serializers.CharField(source="deployment.slug")
    parameters = serializers.JSONField()
    changelog = serializers.CharField()
    published_at = serializers.DateTimeField()
    created_by = serializers.CharField(source="created_by.username", default=None)
    created_at = serializers.DateTimeField()


class _JsonObject(serializers.JSONField):
    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not isinstance(value, dict):
            raise serializers.ValidationError("Expected a JSON object.")
        return value


class VersionInput(StrictSerializer):
    messages = serializers.ListField(child=serializers.DictField(), allow_empty=False)
    input_schema = _JsonObject()
    output_type = serializers.ChoiceField(
        choices=PromptApiVersion.OutputType.choices, required=False
    )
    output_schema = _JsonObject(required=False, allow_null=True)
    deployment = serializers.CharField(help_text="Slug of a chat or completion deployment.")
    parameters = _JsonObject(required=False)
    changelog = serializers.CharField(required=False, allow_blank=True)


def _may_edit(view: ManagementView, prompt_api: PromptApi, role: str, doing: str) -> None:
    if prompt_api.tenant_id is None:
        policy.require_staff(view.actor, f"{doing} platform-wide prompt-APIs")
    elif view.tenant is None or prompt_api.tenant_id != view.tenant.pk:
        if not view.actor.is_staff:
            raise errors.SluiceError(
                errors.PERMISSION_DENIED,
                f"'{prompt_api.slug}' belongs to another tenant; you may call it, not change it.",
            )
    else:
        policy.require_role(view.actor, view.tenant, role, doing)


class PromptApiListView(ManagementView):
    tenant_required = False

    class PromptApiInput(StrictSerializer):
        slug = serializers.SlugField(max_length=80)
        name = serializers.CharField(max_length=100)
        description = serializers.CharField(required=False, allow_blank=True)
        visibility = serializers.ChoiceField(choices=PromptApi.Visibility.choices, required=False)
        platform_wide = serializers.BooleanField(
            required=False, default=False, help_text="Staff only: owned by no tenant."
        )

    @extend_schema(
        summary="Your prompt-APIs and every public one", responses=PromptApiOut(many=True)
    )
    def get(self, request):
        return self.paginated(selectors.prompt_apis_visible_to(self.tenant), PromptApiOut)

    @extend_schema(
        summary="Create a prompt-API (then add a version and publish it)",
        request=PromptApiInput,
        responses={201: PromptApiOut},
    )
    def post(self, request):
        data = self.PromptApiInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        if fields.pop("platform_wide"):
            policy.require_staff(self.actor, "create platform-wide prompt-APIs")
            tenant = None
        elif self.tenant is None:
            raise errors.SluiceError(
                errors.INVALID_REQUEST,
                "Name the owning tenant (?tenant=<slug>) or set platform_wide.",
                param="tenant",
            )
        else:
            policy.require_role(self.actor, self.tenant, Role.MEMBER, "create prompt-APIs")
            tenant = self.tenant
        prompt_api = services.prompt_api_create(tenant=tenant, actor=self.actor, **fields)
        return Response(PromptApiOut(prompt_api).data, status=status.HTTP_201_CREATED)


class PromptApiDetailView(ManagementView):
    tenant_required = False

    @extend_schema(summary="One prompt-API", responses=PromptApiOut)
    def get(self, request, slug: str):
        return Response(
            PromptApiOut(selectors.access_prompt_api(tenant=self.tenant, slug=slug)).data
        )


def _visible_versions(view: ManagementView, prompt_api: PromptApi):
    versions = selectors.versions_of(prompt_api)
    owner = view.actor.is_staff or (
        view.tenant is not None and prompt_api.tenant_id == view.tenant.pk
    )
    return versions if owner else versions.filter(state=PromptApiVersion.State.PUBLISHED)


def _resolve_deployment(slug: str) -> ModelDeployment:
    found = ModelDeployment.objects.filter(slug=slug).first()
    if found is None:
        raise errors.SluiceError(
            errors.INVALID_REQUEST, f"No deployment '{slug}'.", param="deployment"
        )
    return found


class VersionListView(ManagementView):
    tenant_required = False

    @extend_schema(
        summary="A prompt-API's versions (other tenants see published ones)",
        responses=VersionOut(many=True),
    )
    def get(self, request, slug: str):
        prompt_api = selectors.access_prompt_api(tenant=self.tenant, slug=slug)
        return self.paginated(_visible_versions(self, prompt_api), VersionOut)

    @extend_schema(summary="Add a draft version", request=VersionInput, responses={201: VersionOut})
    def post(self, request, slug: str):
        prompt_api = selectors.access_prompt_api(tenant=self.tenant, slug=slug)
        _may_edit(self, prompt_api, Role.MEMBER, "add versions to")
        data = VersionInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        fields["deployment"] = _resolve_deployment(fields["deployment"])
        version = services.prompt_api_version_create(
            prompt_api=prompt_api, actor=self.actor, **fields
        )
        return Response(VersionOut(version).data, status=status.HTTP_201_CREATED)


class VersionDetailView(ManagementView):
    tenant_required = False

    def _version(self, slug: str, number: int) -> PromptApiVersion:
        prompt_api = selectors.access_prompt_api(tenant=self.tenant, slug=slug)
        found = _visible_versions(self, prompt_api).filter(number=number).first()
        if found is None:
            raise errors.SluiceError(errors.NOT_FOUND, f"{slug} has no version {number}.")
        return found

    @extend_schema(summary="One version", responses=VersionOut)
    def get(self, request, slug: str, number: int):
        return Response(VersionOut(self._version(slug, number)).data)

    @extend_schema(
        summary="Change a draft version (published ones are immutable: 409)",
        request=VersionInput,
        responses=VersionOut,
    )
    def patch(self, request, slug: str, number: int):
        version = self._version(slug, number)
        _may_edit(self, version.prompt_api, Role.MEMBER, "edit versions of")
        data = VersionInput(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        if "deployment" in fields:
            fields["deployment"] = _resolve_deployment(fields["deployment"])
        changed = services.prompt_api_version_update(version=version, actor=self.actor, **fields)
        return Response(VersionOut(changed).data)


class VersionPublishView(ManagementView):
    tenant_required = False

    @extend_schema(
        summary="Publish a draft (admins; members file a publish_version access request)",
        request=None,
        responses=VersionOut,
    )
    def post(self, request, slug: str, number: int):
        prompt_api = selectors.access_prompt_api(tenant=self.tenant, slug=slug)
        _may_edit(self, prompt_api, Role.ADMIN, "publish versions of")
        version = selectors.access_version(prompt_api=prompt_api, number=number)
        published = services.prompt_api_version_publish(version=version, actor=self.actor)
        return Response(VersionOut(published).data)


class VersionActivateView(ManagementView):
    tenant_required = False

    @extend_schema(
        summary="Serve this published version again (roll back)",
        request=None,
        responses=PromptApiOut,
    )
    def post(self, request, slug: str, number: int):
        prompt_api = selectors.access_prompt_api(tenant=self.tenant, slug=slug)
        _may_edit(self, prompt_api, Role.ADMIN, "change the active version of")
        version = selectors.access_version(prompt_api=prompt_api, number=number)
        updated = services.prompt_api_activate_version(version=version, actor=self.actor)
        return Response(PromptApiOut(updated).data)
