"""The /v1 endpoints through the official openai client, against a live gateway and a real
Dramatiq worker serving the deterministic fixed-latency backend.

(The same endpoints with the real models are in test_v1_models.py.)
"""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.models import ModelDeployment

from .conftest import fixed_deployment, published_prompt_api
from .support import assert_error


@pytest.fixture
def chat(dataplane, alpha, subscribe):
    deployment = fixed_deployment("fixed-chat", task="chat")
    subscribe(alpha, deployment)
    return deployment


@pytest.fixture
def embedder(dataplane, alpha, subscribe):
    deployment = fixed_deployment(
        "fixed-embed", task=ModelDeployment.Task.EMBEDDING, config={"dims": 8}
    )
    subscribe(alpha, deployment)
    return deployment


@pytest.fixture
def client(dataplane, alpha, alice, issue_key):
    return openai.OpenAI(base_url=f"{dataplane}/v1", api_key=issue_key(alpha, alice), max_retries=0)


class ChatCompletionsTestCase:
    def test_it_answers_through_the_openai_client(self, chat, client, start_worker):
        start_worker(chat)
        reply = client.chat.completions.create(
            model="fixed-chat", messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.object == "chat.completion"
        assert reply.model == "fixed-chat"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == "echo: hello there"
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens == 2
        assert reply.usage.completion_tokens == 3
        assert reply.usage.total_tokens == 5

    def test_it_streams_chunks_then_done(self, chat, client, start_worker):
        start_worker(chat)
        stream = client.chat.completions.create(
            model="fixed-chat",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: one two three"
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert [c.choices[0].finish_reason for c in finals] == ["stop"]
        assert chunks[-1].usage.completion_tokens == 4
        assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)

    def test_it_stops_at_max_tokens(self, chat, client, start_worker):
        start_worker(chat)
        reply = client.chat.completions.create(
            model="fixed-chat",
            messages=[{"role": "user", "content": "a b c d e f"}],
            max_tokens=2,
        )
        assert reply.choices[0].message.content == "echo: a"
        assert reply.choices[0].finish_reason == "length"

    def test_it_sends_rate_limit_headers_and_a_request_id(self, chat, client, start_worker):
        start_worker(chat)
        raw = client.chat.completions.with_raw_response.create(
            model="fixed-chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-request-id"].startswith("req_")
        assert raw.headers["x-ratelimit-limit"] == "120"
        assert int(raw.headers["x-ratelimit-remaining"]) == 119


class CompletionsTestCase:
    def test_it_completes_a_prompt(self, chat, client, start_worker):
        start_worker(chat)
        reply = client.completions.create(model="fixed-chat", prompt="roses are red")
        assert reply.object == "text_completion"
        assert reply.choices[0].text == "echo: roses are red"
        assert reply.usage.prompt_tokens == 3

    def test_it_streams_a_completion(self, chat, client, start_worker):
        start_worker(chat)
        chunks = list(client.completions.create(model="fixed-chat", prompt="x y", stream=True))
        assert "".join(chunk.choices[0].text for chunk in chunks) == "echo: x y"


class EmbeddingsTestCase:
    def test_it_embeds_a_list_as_base64_by_default(self, embedder, client, start_worker):
        # The openai client asks for base64 unless told otherwise, and decodes it itself.
        start_worker(embedder)
        reply = client.embeddings.create(model="fixed-embed", input=["one", "two words"])
        assert [item.index for item in reply.data] == [0, 1]
        assert all(len(item.embedding) == 8 for item in reply.data)
        norm = sum(value * value for value in reply.data[0].embedding)
        assert norm == pytest.approx(1.0, rel=1e-5)
        assert reply.usage.prompt_tokens == 3

    def test_it_embeds_a_string_as_floats(self, embedder, client, start_worker):
        start_worker(embedder)
        reply = client.embeddings.create(model="fixed-embed", input="same", encoding_format="float")
        again = client.embeddings.create(model="fixed-embed", input="same")
        assert reply.data[0].embedding == pytest.approx(again.data[0].embedding, rel=1e-6)


class DataPlaneHandlerTestCase:
    def test_it_answers_without_cookies_or_session(self, chat, client, dataplane):
        reply = httpx.get(
            f"{dataplane}/v1/models", headers={"Authorization": f"Bearer {client.api_key}"}
        )
        assert reply.status_code == 200
        assert "set-cookie" not in reply.headers
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["x-request-id"].startswith("req_")

    def test_it_still_enforces_allowed_hosts(self, chat, client, dataplane):
        reply = httpx.get(f"{dataplane}/v1/models", headers={"Host": "evil.example"})
        assert reply.status_code == 400

    def test_an_unknown_v1_path_is_a_json_404(self, dataplane):
        reply = httpx.get(f"{dataplane}/v1/nothing-here")
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "not_found"


class ModelsTestCase:
    def test_it_lists_only_what_the_tenant_may_use(self, chat, client, dataplane):
        fixed_deployment("not-subscribed")
        assert [model.id for model in client.models.list()] == ["fixed-chat"]
        assert client.models.retrieve("fixed-chat").id == "fixed-chat"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("not-subscribed")


@pytest.fixture
def summarize(chat, alpha, alice):
    return published_prompt_api(
        tenant=alpha,
        user=alice,
        slug="summarize",
        deployment=chat,
        messages=[{"role": "user", "content": "Summarize: {{text}}"}],
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 1}},
            "required": ["text"],
            "additionalProperties": False,
        },
        parameters={"max_tokens": 8},
    )


class PromptApiTestCase:
    def test_it_renders_the_template_and_runs_it(self, summarize, client, start_worker, chat):
        start_worker(chat)
        reply = httpx.post(
            f"{client.base_url}apis/summarize",
            json={"inputs": {"text": "long story"}},
            headers={"Authorization": f"Bearer {client.api_key}"},
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["output"] == "echo: Summarize: long story"
        assert body["version"] == 1
        assert body["usage"]["prompt_tokens"] == 3

    def test_it_refuses_inputs_that_fail_the_schema(self, summarize, client):
        reply = httpx.post(
            f"{client.base_url}apis/summarize",
            json={"inputs": {"text": ""}},
            headers={"Authorization": f"Bearer {client.api_key}"},
        )
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "inputs.text"

    def test_it_is_a_404_for_another_tenants_private_prompt_api(
        self, summarize, dataplane, beta, charlie, issue_key, subscribe, chat
    ):
        subscribe(beta, chat)
        reply = httpx.post(
            f"{dataplane}/v1/apis/summarize",
            json={"inputs": {"text": "x"}},
            headers={"Authorization": f"Bearer {issue_key(beta, charlie)}"},
        )
        assert_error(_Response(reply), 404, "not_found")


class _Response:
    """An httpx response dressed as Django's, for tests.support.assert_error."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.content = response.content

    def json(self):
        return self.response.json()

    def __getitem__(self, name: str) -> str:
        return self.response.headers[name]
