"""The /v1 endpoints with the real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) behind
a real Dramatiq worker, through the official openai client: what a newcomer does after
`make demo`."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from gateway.models import ModelDeployment
from workers.runtime import DeploymentSpec
from workers.service import WorkerService

from .conftest import published_prompt_api

CHAT = {
    "slug": "smollm2-135m-instruct",
    "task": "chat",
    "backend": "workers.backends.chat.TransformersChatBackend",
    "config": {},
    "max_batch_size": 8,
    "max_wait_ms": 10,
}
EMBED = {
    "slug": "all-minilm-l6-v2",
    "task": "embedding",
    "backend": "workers.backends.embeddings.SentenceTransformerBackend",
    "config": {"dimensions": 384},
    "max_batch_size": 32,
    "max_wait_ms": 5,
}


@pytest.fixture(scope="module")
def models_worker():
    """One worker for the module: the models load once (a few seconds)."""
    specs = [DeploymentSpec(queue_name=f"deploy.{spec['slug']}", **spec) for spec in (CHAT, EMBED)]
    service = WorkerService(specs, threads=16)
    service.start()
    yield service
    service.stop(timeout_ms=5000)


@pytest.fixture
def client(dataplane, models_worker, alpha, alice, subscribe, issue_key):
    for spec in (CHAT, EMBED):
        deployment = ModelDeployment.objects.create(
            slug=spec["slug"],
            name=spec["slug"],
            task=spec["task"],
            backend=spec["backend"],
            backend_config=spec["config"],
            max_batch_size=spec["max_batch_size"],
            max_wait_ms=spec["max_wait_ms"],
            capacity=16,
        )
        subscribe(alpha, deployment)
    return openai.OpenAI(base_url=f"{dataplane}/v1", api_key=issue_key(alpha, alice), max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


class RealChatTestCase:
    def test_it_answers_with_the_model_and_counts_real_tokens(self, client):
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=QUESTION, max_tokens=12, temperature=0
        )
        text = reply.choices[0].message.content
        assert "Paris" in text
        # The chat template wraps the question in role markers: more tokens than words.
        assert reply.usage.prompt_tokens > len(QUESTION[0]["content"].split())
        assert 1 <= reply.usage.completion_tokens <= 12
        assert reply.choices[0].finish_reason in ("stop", "length")

    def test_streaming_gives_the_same_text_as_a_plain_answer(self, client):
        plain = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=QUESTION, max_tokens=12, temperature=0
        )
        chunks = list(
            client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=QUESTION,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == plain.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2

    def test_it_completes_a_prompt_and_honours_max_tokens(self, client):
        reply = client.completions.create(
            model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=5, temperature=0
        )
        assert reply.choices[0].text.strip()
        assert reply.usage.completion_tokens == 5
        assert reply.choices[0].finish_reason == "length"

    def test_a_prompt_too_long_for_the_model_is_a_bad_request(self, client):
        # ~20,000 tokens of distinct words: beyond SmolLM2's 8,192-token context.
        words = " ".join(f"w{index}" for index in range(10_000))
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=[{"role": "user", "content": words}],
                max_tokens=5,
            )
        assert "context" in raised.value.message

    def test_a_prompt_api_runs_on_the_model(self, client, alpha, alice, dataplane):
        published_prompt_api(
            tenant=alpha,
            user=alice,
            slug="capital",
            deployment=ModelDeployment.objects.get(slug="smollm2-135m-instruct"),
            messages=[{"role": "user", "content": "What is the capital of {{country}}? One word."}],
            input_schema={
                "type": "object",
                "properties": {"country": {"type": "string"}},
                "required": ["country"],
            },
            parameters={"max_tokens": 8, "temperature": 0},
        )
        reply = httpx.post(
            f"{dataplane}/v1/apis/capital",
            json={"inputs": {"country": "France"}},
            headers={"Authorization": f"Bearer {client.api_key}"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["output"]


class RealEmbeddingsTestCase:
    def test_similar_sentences_embed_close_together(self, client):
        reply = client.embeddings.create(
            model="all-minilm-l6-v2",
            input=["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell."],
        )
        cat, kitten, stocks = (item.embedding for item in reply.data)
        assert len(cat) == 384

        def cosine(a, b):
            return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
                sum(x * x for x in a) * sum(y * y for y in b)
            )

        assert cosine(cat, kitten) > cosine(cat, stocks) + 0.2
        assert reply.usage.prompt_tokens >= 12  # real tokenizer counts, with [CLS] and [SEP]

    def test_dimensions_equal_to_the_models_own_are_accepted(self, client):
        reply = client.embeddings.create(
            model="all-minilm-l6-v2", input="hello", dimensions=384, encoding_format="float"
        )
        assert len(reply.data[0].embedding) == 384
