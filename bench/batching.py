"""Batching: what one forward pass for many requests buys with the real models.

- Embeddings (all-MiniLM-L6-v2 through SentenceTransformerBackend), one input per request:
  directly on the backend (run_batch with 32 requests against 32 calls of one), and through
  the gateway at concurrency 32 against two deployments that differ only in
  max_batch_size (32 and 1). Throughput in items/s.
- Generation (SmolLM2-135M-Instruct through TransformersChatBackend), directly on the
  backend: one run_batch of 8 requests against requests run one at a time, greedy, the
  same max_tokens each. Throughput in generated tokens/s (tokens actually produced: a
  request that meets its end-of-turn token early produces fewer).

The direct runs happen in this process before any worker is started, so they have the
CPUs to themselves (apart from whatever else the machine runs); through the gateway the
model shares them with uvicorn, Redis and the load generator.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from . import harness, load, report
from .harness import Context, DeploymentConfig

NAME = "batching"
CONCURRENCY = 32
BIG_BATCH = 32
GATEWAY_S = 8.0
DIRECT_MIN_S = 4.0
# Shortened together by `python -m bench --quick`.
DURATIONS = ("GATEWAY_S", "DIRECT_MIN_S")
GEN_BATCH = 8
GEN_TOKENS = 32
GEN_SINGLE_RUNS = 3
GOAL_EMBEDDING_GAIN = 2.5
PATH = "/v1/embeddings"

SENTENCES = [
    "The tide comes in twice a day along most of the coast.",
    "A sluice gate controls the flow of water through a channel.",
    "Batching many small requests into one forward pass saves time.",
    "Our quarterly report shows steady growth in every region.",
    "Please reset my password; I no longer have the old phone.",
    "The recipe needs two eggs, a cup of flour and some butter.",
    "Which train goes to the airport after midnight?",
    "Transformers attend to every token in the input sequence.",
    "The museum opens at nine and closes at five on weekdays.",
    "An invoice was sent twice by mistake; please refund one.",
    "Rain is expected in the north, sun in the south.",
    "He carried the heavy box up four flights of stairs.",
    "Vector search finds documents that are close in meaning.",
    "The committee will publish its decision next Tuesday.",
    "Cats sleep for most of the day and hunt at dusk.",
    "Latency is the time a single request takes from start to end.",
]

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a canal lock works, step by step.",
    "Describe a busy market in the morning.",
    "Give advice to someone starting to learn the piano.",
    "Tell me about the history of bread.",
    "Write a poem about the sea at night.",
    "Explain why the sky is blue to a child.",
    "Describe your ideal weekend in the mountains.",
]


def _embedding_request(index: int) -> Any:
    from workers.backends.base import BackendRequest

    return BackendRequest(
        request_id=f"emb-{index}",
        task="embedding",
        payload={"input": [SENTENCES[index % len(SENTENCES)]]},
        deadline_ms=int(time.time() * 1000) + 3_600_000,
    )


def embeddings_direct() -> dict[int, float]:
    """Items/s of run_batch with 1 and with BIG_BATCH requests (one input each)."""
    from workers.backends.embeddings import SentenceTransformerBackend

    backend = SentenceTransformerBackend({})
    backend.load()
    rates = {}
    for size in (1, BIG_BATCH):
        backend.run_batch([_embedding_request(i) for i in range(size)])  # warm this shape
        items, started = 0, time.perf_counter()
        while time.perf_counter() - started < DIRECT_MIN_S:
            results = backend.run_batch([_embedding_request(items + i) for i in range(size)])
            assert all(not isinstance(result, BaseException) for result in results)
            items += size
        rates[size] = items / (time.perf_counter() - started)
    del backend
    gc.collect()
    return rates


def embeddings_gateway(url: str, ctx: Context, slug: str) -> dict[str, float]:
    counter = iter(range(10**9))

    def body() -> dict[str, Any]:
        return {"model": slug, "input": [SENTENCES[next(counter) % len(SENTENCES)]]}

    async def go() -> list[load.Sample]:
        client = load.RawClient(url, ctx.headers())
        try:
            return await load.closed_loop(
                client, PATH, body, concurrency=CONCURRENCY, duration_s=GATEWAY_S, warmup_s=2.0
            )
        finally:
            await client.close()

    samples = load.run(go)
    ok = [s.latency_ms for s in samples if s.status == 200]
    return {
        "rate": len(ok) / GATEWAY_S,
        "failures": sum(1 for s in samples if s.status != 200),
        **load.summary(ok),
    }


def batch_sizes(slug: str) -> list[int]:
    """The worker's recent batch sizes for a deployment, from its heartbeat."""
    import json

    from sluice.redisconn import get_redis
    from workers import protocol

    client = get_redis()
    for worker_id in client.zrange(protocol.workers_index(), 0, -1):
        raw = client.hget(protocol.heartbeat(worker_id.decode()), "deployments")
        status = json.loads(raw or b"{}").get(slug)
        if status:
            return list(status.get("recent_batch_sizes") or [])
    return []


def generation_direct() -> dict[str, dict[str, float]]:
    from workers.backends.base import BackendRequest
    from workers.backends.chat import TransformersChatBackend

    backend = TransformersChatBackend({})
    started = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - started

    def request(index: int) -> BackendRequest:
        return BackendRequest(
            request_id=f"gen-{index}",
            task="chat",
            payload={
                "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                "max_tokens": GEN_TOKENS,
                "temperature": 0,
            },
            deadline_ms=int(time.time() * 1000) + 3_600_000,
        )

    def measure(batches: list[list[BackendRequest]]) -> dict[str, float]:
        tokens, started = 0, time.perf_counter()
        for batch in batches:
            for result in backend.run_batch(batch):
                assert not isinstance(result, BaseException), result
                tokens += result.completion_tokens
        elapsed = time.perf_counter() - started
        return {"tokens": tokens, "seconds": elapsed, "rate": tokens / elapsed}

    single = measure([[request(i)] for i in range(GEN_SINGLE_RUNS)])
    batched = measure([[request(i) for i in range(GEN_BATCH)]])
    return {"single": single, "batched": batched, "load_s": {"rate": load_s}}


def run(ctx: Context) -> Path:
    print("  embeddings, directly on the backend")
    direct = embeddings_direct()
    print("  generation, directly on the backend")
    generation = generation_direct()
    gc.collect()  # the chat model's memory, before the worker loads its own models
    slugs = {1: "bench-embed-b1", BIG_BATCH: f"bench-embed-b{BIG_BATCH}"}
    for size, slug in slugs.items():
        harness.ensure_deployment(
            ctx.tenant,
            DeploymentConfig(
                slug=slug,
                task="embedding",
                backend=harness.EMBEDDING_BACKEND,
                config={},
                capacity=4 * CONCURRENCY,
                max_batch_size=size,
                max_wait_ms=5,
            ),
        )
    gateway: dict[int, dict[str, float]] = {}
    sizes: dict[int, list[int]] = {}
    with harness.Stack(ctx.logs) as stack:
        url = stack.start_gateway()
        stack.start_worker(list(slugs.values()), threads=2 * CONCURRENCY)
        for size, slug in slugs.items():
            print(f"  embeddings through the gateway, max_batch_size {size}")
            gateway[size] = embeddings_gateway(url, ctx, slug)
            sizes[size] = batch_sizes(slug)
    _plot(direct, gateway, generation)
    return report.write(NAME, _markdown(direct, gateway, sizes, generation))


def _plot(direct, gateway, generation) -> None:
    plt = report.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["direct run_batch", f"gateway, concurrency {CONCURRENCY}"]
    ones = [direct[1], gateway[1]["rate"]]
    bigs = [direct[BIG_BATCH], gateway[BIG_BATCH]["rate"]]
    xs = range(len(labels))
    left.bar([x - 0.2 for x in xs], ones, 0.4, label="batch 1")
    left.bar([x + 0.2 for x in xs], bigs, 0.4, label=f"batch {BIG_BATCH}")
    left.set_xticks(list(xs), labels)
    left.set_ylabel("embeddings / s")
    left.set_title("all-MiniLM-L6-v2")
    left.legend()
    right.bar(
        ["batch 1", f"batch {GEN_BATCH}"],
        [generation["single"]["rate"], generation["batched"]["rate"]],
        color=["tab:blue", "tab:orange"],
    )
    right.set_ylabel("generated tokens / s")
    right.set_title("SmolLM2-135M-Instruct, run_batch")
    report.save(figure, NAME)


def _markdown(direct, gateway, sizes, generation) -> str:
    direct_gain = direct[BIG_BATCH] / direct[1]
    gateway_gain = gateway[BIG_BATCH]["rate"] / gateway[1]["rate"]
    generation_gain = generation["batched"]["rate"] / generation["single"]["rate"]
    embed = report.table(
        ["where", "batch 1 items/s", f"batch {BIG_BATCH} items/s", "gain"],
        [
            [
                "directly on the backend (run_batch)",
                f"{direct[1]:.0f}",
                f"{direct[BIG_BATCH]:.0f}",
                f"**{direct_gain:.2f}x**",
            ],
            [
                f"through the gateway, concurrency {CONCURRENCY}",
                f"{gateway[1]['rate']:.0f}",
                f"{gateway[BIG_BATCH]['rate']:.0f}",
                f"**{gateway_gain:.2f}x**",
            ],
        ],
    )
    latency = report.table(
        ["max_batch_size", "p50 ms", "p99 ms", "non-200", "recent batch sizes (worker heartbeat)"],
        [
            [
                str(size),
                report.ms(result["p50"]),
                report.ms(result["p99"]),
                str(result["failures"]),
                ", ".join(map(str, sizes.get(size, [])[-12:])) or "-",
            ]
            for size, result in gateway.items()
        ],
    )
    single, batched = generation["single"], generation["batched"]
    gen = report.table(
        ["run", "generated tokens", "seconds", "tokens/s"],
        [
            [
                f"{GEN_SINGLE_RUNS} requests one at a time",
                f"{single['tokens']:.0f}",
                f"{single['seconds']:.1f}",
                f"{single['rate']:.1f}",
            ],
            [
                f"one batch of {GEN_BATCH}",
                f"{batched['tokens']:.0f}",
                f"{batched['seconds']:.1f}",
                f"{batched['rate']:.1f}",
            ],
        ],
    )
    recent = sizes.get(BIG_BATCH) or [0]
    mean_batch = sum(recent) / len(recent)
    direct_met = direct_gain >= GOAL_EMBEDDING_GAIN
    gateway_met = gateway_gain >= GOAL_EMBEDDING_GAIN
    return "\n".join(
        [
            "# Batching",
            "",
            "Real models on the CPU: all-MiniLM-L6-v2 (SentenceTransformerBackend, config {}) "
            "and SmolLM2-135M-Instruct (TransformersChatBackend, config {}). Embedding "
            "requests carry one sentence each.",
            "",
            report.machine(),
            "",
            "## Embeddings",
            "",
            embed,
            "",
            f"Through the gateway: {CONCURRENCY} closed-loop clients for {GATEWAY_S:.0f} s "
            f"(after 2 s of warm-up) on deployments that differ only in max_batch_size; "
            "max_wait_ms 5, one worker process with 64 threads, one uvicorn process. "
            "Latency of those requests:",
            "",
            latency,
            "",
            "## Generation",
            "",
            gen,
            "",
            f"Greedy decoding, max_tokens {GEN_TOKENS}, the chat backend's run_batch called "
            f"directly (model load {generation['load_s']['rate']:.1f} s from the converted "
            "cache).",
            "",
            "![throughput with and without batching](batching.png)",
            "",
            "## Reading",
            "",
            f"**Goal: embedding batching >= {GOAL_EMBEDDING_GAIN}x.** Directly on the backend: "
            f"{direct_gain:.2f}x, **{'met' if direct_met else 'missed'}**. Through the "
            f"gateway at concurrency {CONCURRENCY}: {gateway_gain:.2f}x, "
            f"**{'met' if gateway_met else 'missed'}**.",
            "",
            f"Directly, the gain is the model's alone: one padded forward pass for "
            f"{BIG_BATCH} short sentences instead of {BIG_BATCH} passes, each paying Python "
            "and kernel-launch costs for a tiny matrix. Through the gateway, every request "
            "also costs CPU in uvicorn, Django, Redis and the worker's Dramatiq threads, on "
            "the same cores as the model, and that cost does not shrink with batching: the "
            "faster the model gets per item, the larger the share of that fixed cost. The "
            f"batches also fill less: the worker's last batches averaged {mean_batch:.1f} "
            f"requests of the {BIG_BATCH} allowed, because the gateway hands requests to the "
            "queue only as fast as its own CPU allows.",
            "",
            f"Generation: a batch of {GEN_BATCH} produced {generation_gain:.1f}x the tokens/s "
            "of one request at a time. Each decoding step is one forward pass whatever the "
            "batch, so the gain grows with the batch until the CPU's arithmetic, not the "
            "per-step overhead, is the limit.",
        ]
    )
