"""Bad input on the data plane: a clear 4xx in the OpenAI error shape, never a 500, and
nothing queued. Each error surfaces as the openai client's matching exception class."""

from __future__ import annotations

import httpx
import openai
import pytest
from django.conf import settings

from gateway.models import ModelDeployment
from sluice.redisconn import get_redis
from tenants import services
from tenants.models import Scope
from tenants.policy import SYSTEM, Actor

from .conftest import fixed_deployment

CHAT = {"model": "fixed-chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def setup(dataplane, alpha, alice, subscribe, issue_key):
    chat = fixed_deployment("fixed-chat")
    embed = fixed_deployment("fixed-embed", task=ModelDeployment.Task.EMBEDDING)
    subscribe(alpha, chat)
    subscribe(alpha, embed)
    return {"base": dataplane, "key": issue_key(alpha, alice)}


def call(setup, path: str, body=None, *, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or setup['key']}", **kwargs.pop("headers", {})}
    if body is not None and "content" not in kwargs:
        kwargs["json"] = body
    return httpx.post(f"{setup['base']}/v1/{path}", headers=headers, **kwargs)


def refused(reply: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["request_id"] == reply.headers["x-request-id"]
    error = body["error"]
    if code:
        assert error["code"] == code, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def nothing_queued() -> bool:
    namespace = settings.DRAMATIQ_NAMESPACE
    return not get_redis().keys(f"{namespace}:*.msgs")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": "0.5"}, "temperature"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "max_tokens": "5"}, "max_tokens"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "messages": "hi"}, "messages"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "user", "content": ""}]}, "messages"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({**CHAT, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": CHAT["messages"]}, "model"),
        ({**CHAT, "model": 7}, "model"),
    ],
)
def test_chat_refuses_wrong_types_and_empty_input(setup, body, param):
    refused(call(setup, "chat/completions", body), 400, "invalid_request", param)
    assert nothing_queued()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_chat_refuses_unsupported_parameters(setup, extra, param):
    error = refused(call(setup, "chat/completions", {**CHAT, **extra}), 400, "", None)
    assert error["code"] in ("unsupported_parameter", "invalid_request")
    assert error["param"] == param


def test_chat_accepts_parameters_sent_as_off(setup):
    # What clients send by default must not be refused: logprobs false, penalties 0.
    body = {**CHAT, "logprobs": False, "presence_penalty": 0, "user": "u1", "n": 1}
    reply = call(setup, "chat/completions", body, headers={"X-Request-Timeout": "0.2"})
    assert reply.status_code == 504  # admitted and queued; no worker runs in this test


def test_it_refuses_unknown_fields_by_name(setup):
    refused(call(setup, "chat/completions", {**CHAT, "tempreature": 1}), 400, "unknown_field")


def test_it_refuses_malformed_json(setup):
    reply = call(
        setup,
        "chat/completions",
        content=b'{"model": "fixed-chat", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    refused(reply, 400, "invalid_json")


def test_it_refuses_a_body_that_is_not_json(setup):
    reply = call(
        setup, "chat/completions", content=b"model=x", headers={"Content-Type": "text/plain"}
    )
    refused(reply, 415, "unsupported_media_type")


def test_it_refuses_a_json_body_that_is_not_an_object(setup):
    refused(call(setup, "chat/completions", [1, 2]), 400, "invalid_request")


def test_it_refuses_an_oversize_body(setup):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    refused(call(setup, "chat/completions", big), 413, "request_too_large")


def test_it_refuses_too_long_input_before_queueing(setup):
    long = {**CHAT, "messages": [{"role": "user", "content": "word " * 50_000}]}
    refused(call(setup, "chat/completions", long), 400, "context_length_exceeded", "messages")
    assert nothing_queued()


def test_it_refuses_max_tokens_over_the_plan_cap(setup):
    error = refused(
        call(setup, "chat/completions", {**CHAT, "max_tokens": 100_000}),
        400,
        "invalid_request",
        "max_tokens",
    )
    assert "cap of 512" in error["message"]


def test_it_says_which_endpoint_serves_the_model(setup):
    error = refused(
        call(setup, "embeddings", {"model": "fixed-chat", "input": "x"}), 400, "invalid_request"
    )
    assert "/v1/chat/completions" in error["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "fixed-embed", "input": []}, 400, "invalid_request"),
        ({"model": "fixed-embed", "input": ""}, 400, "invalid_request"),
        ({"model": "fixed-embed", "input": ["ok", ""]}, 400, "invalid_request"),
        ({"model": "fixed-embed", "input": [[1, 2, 3]]}, 400, "unsupported_parameter"),
        ({"model": "fixed-embed", "input": ["x"] * 1000}, 400, "invalid_request"),
        ({"model": "fixed-embed", "input": "x" * 30_000}, 400, "context_length_exceeded"),
        ({"model": "fixed-embed", "input": "x", "encoding_format": "hex"}, 400, "invalid_request"),
        ({"model": "fixed-embed", "input": "x", "dimensions": 64}, 400, "unsupported_parameter"),
    ],
)
def test_embeddings_refuse_bad_input(setup, body, status, code):
    refused(call(setup, "embeddings", body), status, code)
    assert nothing_queued()


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fixed-chat", "prompt": ["a", "b"]},
        {"model": "fixed-chat", "prompt": ""},
        {"model": "fixed-chat", "prompt": 5},
        {"model": "fixed-chat", "prompt": "x", "echo": True},
        {"model": "fixed-chat", "prompt": "x", "suffix": "y"},
    ],
)
def test_completions_refuse_bad_input(setup, body):
    reply = call(setup, "completions", body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] in ("prompt", "echo", "suffix")


class OpenAIExceptionsTestCase:
    """Our errors arrive as the client's own exception classes, with our codes."""

    def client(self, setup, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{setup['base']}/v1", api_key=key or setup["key"], max_retries=0
        )

    def test_unknown_model_is_not_found(self, setup):
        with pytest.raises(openai.NotFoundError) as raised:
            self.client(setup).chat.completions.create(
                model="no-such-model", messages=CHAT["messages"]
            )
        assert raised.value.code == "model_not_found"
        assert "GET /v1/models" in raised.value.message

    def test_a_wrong_key_is_an_authentication_error(self, setup):
        with pytest.raises(openai.AuthenticationError) as raised:
            self.client(setup, "sk-sluice-wrong").models.list()
        assert raised.value.code == "invalid_api_key"
        assert raised.value.response.headers["x-should-retry"] == "false"

    def test_a_missing_key_is_an_authentication_error(self, setup):
        reply = httpx.get(f"{setup['base']}/v1/models")
        refused(reply, 401, "not_authenticated")

    def test_a_forged_key_with_a_valid_checksum_is_refused(self, setup):
        from tenants.models import key_checksum

        body = "sk-sluice-abcdefgh_" + "A" * 32
        with pytest.raises(openai.AuthenticationError):
            self.client(setup, body + key_checksum(body)).models.list()

    def test_no_subscription_is_permission_denied_with_how_to_ask(self, setup):
        fixed_deployment("unsubscribed")
        with pytest.raises(openai.PermissionDeniedError) as raised:
            self.client(setup).chat.completions.create(
                model="unsubscribed", messages=CHAT["messages"]
            )
        assert raised.value.code == "access_not_approved"
        assert "/api/access-requests/" in raised.value.message

    def test_a_key_without_the_inference_scope_is_refused(self, setup, alpha, alice, issue_key):
        raw = issue_key(alpha, alice, scopes=[Scope.MANAGE_READ])
        with pytest.raises(openai.PermissionDeniedError) as raised:
            self.client(setup, raw).models.list()
        assert raised.value.code == "insufficient_scope"

    def test_a_suspended_tenant_is_refused(self, setup, alpha):
        services.tenant_suspend(tenant=alpha, reason="unpaid", actor=SYSTEM)
        with pytest.raises(openai.PermissionDeniedError) as raised:
            self.client(setup).models.list()
        assert raised.value.code == "tenant_suspended"

    def test_a_bad_request_is_a_bad_request_error(self, setup):
        with pytest.raises(openai.BadRequestError) as raised:
            self.client(setup).chat.completions.create(
                model="fixed-chat", messages=CHAT["messages"], temperature=5
            )
        assert raised.value.code == "invalid_request"
        assert raised.value.param == "temperature"

    def test_a_revoked_key_is_refused(self, setup, alpha, alice):
        from tenants.models import ApiKey

        key = ApiKey.objects.get(tenant=alpha)
        services.api_key_revoke(key=key, actor=Actor(user=alice))
        with pytest.raises(openai.AuthenticationError) as raised:
            self.client(setup).models.list()
        assert "revoked" in raised.value.message


def test_validation_keeps_no_state_between_requests():
    # The data plane's serializers share their fields between instances (SharedFields).
    from gateway.openai_schema import ChatCompletionRequest

    bad = ChatCompletionRequest(data={**CHAT, "temperature": 9, "messages": "x"})
    assert not bad.is_valid()
    good = ChatCompletionRequest(data={**CHAT, "max_tokens": 3})
    assert good.is_valid(), good.errors
    assert good.validated_data["messages"] == [{"role": "user", "content": "hi"}]
    assert good.validated_data["max_tokens"] == 3
    assert bad.fields is good.fields
    assert set(bad.errors) == {"temperature", "messages"}
