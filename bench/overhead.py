"""Gateway overhead: a request through Sluice against the same backend code called directly.

The backend is FixedLatencyBackend at 20 ms a batch, whatever the batch size, so it is an
ideal model: any latency beyond 20 ms is Sluice's. At concurrency 1, 16 and 64, closed
loop, three ways:

- direct: N threads each calling FixedLatencyBackend.run_batch([request]) in-process;
- batcher: N threads submitting to an in-process MicroBatcher over the same backend, with
  the deployment's settings (what the worker adds before any network is involved);
- Sluice: N HTTP clients -> uvicorn -> admission -> Dramatiq on Redis -> worker ->
  micro-batcher -> backend -> reply stream -> HTTP.

Gateway overhead = Sluice minus direct, at p50 and p99. The deployment batches up to 64
requests with max_wait_ms 0, so batching never holds a request back for the sake of
filling a batch; a second deployment with the default max_wait_ms (10) shows what the
batching window costs an unloaded request. Where the time goes comes from the gateway's
call-log records (queue_ms, inference_ms, total_ms; joined on X-Request-ID) for an
unloaded request, and from each process's CPU time per request under load.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from . import harness, load, report
from .harness import Context, DeploymentConfig

NAME = "overhead"
LATENCY_MS = 20
CONCURRENCY = (1, 16, 64)
SLUICE_S = 6.0
INPROCESS_S = 4.0
CALIBRATE_S = 3.0
IDLE_S = 3.0
# Shortened together by `python -m bench --quick`.
DURATIONS = ("SLUICE_S", "INPROCESS_S", "CALIBRATE_S", "IDLE_S")
WORKER_THREADS = 2 * max(CONCURRENCY)
GOAL_OVERHEAD_P50_MS = 5.0
GOAL_CONCURRENCY = 16
SLUG = "bench-overhead"
SLUG_WINDOW = "bench-overhead-w10"
PATH = "/v1/chat/completions"
PROCESS_LABELS = {
    "gateway": "gateway",
    "worker": "worker",
    "redis": "Redis",
    "client": "load generator",
}


def _body(slug: str = SLUG):
    def body() -> dict[str, Any]:
        return {
            "model": slug,
            "messages": [{"role": "user", "content": "How far is the moon?"}],
            "max_tokens": 8,
        }

    return body


def _backend_request() -> Any:
    from workers.backends.base import BackendRequest

    payload = _body()()
    return BackendRequest(
        request_id="direct",
        task="chat",
        payload={"messages": payload["messages"], "max_tokens": payload["max_tokens"]},
        deadline_ms=int(time.time() * 1000) + 3_600_000,
    )


def _threads(call, *, concurrency: int, duration_s: float, warmup_s: float = 0.5) -> list[float]:
    """Latencies (ms) of `call()` from `concurrency` threads, closed loop."""
    latencies: list[float] = []
    lock = threading.Lock()
    keep_from = time.perf_counter() + warmup_s
    stop_at = keep_from + duration_s

    def loop() -> None:
        mine = []
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            call()
            if started >= keep_from:
                mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(loop) for _ in range(concurrency)]:
            future.result()
    return latencies


def direct(concurrency: int, duration_s: float | None = None) -> list[float]:
    from workers.backends.fixed import FixedLatencyBackend

    backend = FixedLatencyBackend({"latency_ms": LATENCY_MS})
    backend.load()
    request = _backend_request()
    return _threads(
        lambda: backend.run_batch([request]),
        concurrency=concurrency,
        duration_s=duration_s or INPROCESS_S,
    )


def batched(concurrency: int, duration_s: float | None = None) -> list[float]:
    from workers.backends.fixed import FixedLatencyBackend
    from workers.batcher import MicroBatcher

    backend = FixedLatencyBackend({"latency_ms": LATENCY_MS})
    backend.load()
    batcher = MicroBatcher(backend, max_batch_size=64, max_wait_ms=0, name="bench")
    request = _backend_request()
    try:
        return _threads(
            lambda: batcher.run(request, timeout=60),
            concurrency=concurrency,
            duration_s=duration_s or INPROCESS_S,
        )
    finally:
        batcher.stop()


def through_sluice(
    url: str, ctx: Context, *, concurrency: int, duration_s: float, client: str = "raw", slug=SLUG
) -> tuple[list[load.Sample], float]:
    """Samples of a closed loop through the gateway, and the client's CPU seconds."""

    async def go() -> tuple[list[load.Sample], float]:
        factory = load.RawClient if client == "raw" else load.HttpxClient
        http = factory(url, ctx.headers())
        cpu = time.process_time()
        try:
            samples = await load.closed_loop(
                http, PATH, _body(slug), concurrency=concurrency, duration_s=duration_s
            )
        finally:
            await http.close()
        return samples, time.process_time() - cpu

    return load.run(go)


def _ok(samples: list[load.Sample]) -> list[float]:
    return [sample.latency_ms for sample in samples if sample.status == 200]


def _failures(samples: list[load.Sample]) -> int:
    return sum(1 for sample in samples if sample.status != 200)


def run(ctx: Context) -> Path:
    for slug, window in ((SLUG, 0), (SLUG_WINDOW, 10)):
        harness.ensure_deployment(
            ctx.tenant,
            DeploymentConfig(
                slug=slug,
                task="chat",
                backend=harness.FIXED_BACKEND,
                config={"latency_ms": LATENCY_MS},
                # Far above any concurrency here: this benchmark never meets admission's limit.
                capacity=1024,
                max_batch_size=64,
                max_wait_ms=window,
            ),
        )
    results: dict[int, dict[str, Any]] = {}
    with harness.Stack(ctx.logs) as stack:
        url = stack.start_gateway()
        stack.start_worker([SLUG, SLUG_WINDOW], threads=WORKER_THREADS)
        pids = {
            "gateway": stack.processes["web"].pid,
            "worker": stack.processes["worker"].pid,
            "client": os.getpid(),
        }
        found = report.redis_pid()
        if found:
            pids["redis"] = found
        # What the processes cost doing nothing: Dramatiq's worker threads and consumers
        # wake every worker_timeout (SLUICE_WORKER_POLL_MS) to poll, busy or not.
        time.sleep(1.0)
        meter = report.CpuMeter(pids)
        meter.start()
        time.sleep(IDLE_S)
        idle = meter.stop()
        print("  client calibration: raw asyncio client against httpx at concurrency 16")
        clients = {}
        for name in ("httpx", "raw"):
            samples, cpu = through_sluice(
                url, ctx, concurrency=16, duration_s=CALIBRATE_S, client=name
            )
            clients[name] = {
                "cpu_us": cpu / max(1, len(samples)) * 1e6,
                "rate": len(samples) / CALIBRATE_S,
                **load.summary(_ok(samples)),
            }
        for concurrency in CONCURRENCY:
            print(f"  concurrency {concurrency}: Sluice, in-process batcher, direct")
            meter = report.CpuMeter(pids)
            meter.start()
            samples, _ = through_sluice(url, ctx, concurrency=concurrency, duration_s=SLUICE_S)
            cpu = meter.stop()
            results[concurrency] = {
                "sluice": load.summary(_ok(samples)),
                "failures": _failures(samples),
                "rate": len(samples) / SLUICE_S,
                "cpu": cpu,
                "samples": samples,
                "batcher": load.summary(batched(concurrency)),
                "direct": load.summary(direct(concurrency)),
            }
        print("  concurrency 1 with the default batching window (max_wait_ms 10)")
        window_samples, _ = through_sluice(
            url, ctx, concurrency=1, duration_s=SLUICE_S / 2, slug=SLUG_WINDOW
        )
        window = load.summary(_ok(window_samples))
        records = harness.call_log_records()
    breakdown = _breakdown(results[1]["samples"], records)
    _plot(results)
    return report.write(NAME, _markdown(results, clients, breakdown, window, idle))


def _breakdown(samples: list[load.Sample], records: dict[str, dict[str, str]]) -> dict[str, float]:
    """Medians of an unloaded request's phases, from the call log joined on X-Request-ID."""
    parts: dict[str, list[float]] = {
        "client": [],
        "outside": [],
        "view": [],
        "queue": [],
        "inference": [],
    }
    for sample in samples:
        record = records.get(sample.request_id)
        if sample.status != 200 or record is None or not record["queue_ms"]:
            continue
        total, queue, inference = (
            float(record["total_ms"]),
            float(record["queue_ms"]),
            float(record["inference_ms"]),
        )
        parts["client"].append(sample.latency_ms)
        parts["outside"].append(sample.latency_ms - total)
        parts["view"].append(total - queue - inference)
        parts["queue"].append(queue)
        parts["inference"].append(inference)
    return {
        name: statistics.median(values) if values else float("nan")
        for name, values in parts.items()
    } | {"n": len(parts["client"])}


def _plot(results: dict[int, dict[str, Any]]) -> None:
    plt = report.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = list(results)
    positions = range(len(levels))
    width = 0.27
    for offset, (key, label) in enumerate(
        (("direct", "direct run_batch"), ("batcher", "in-process batcher"), ("sluice", "Sluice"))
    ):
        xs = [p + (offset - 1) * width for p in positions]
        p50 = [results[level][key]["p50"] for level in levels]
        p99 = [results[level][key]["p99"] for level in levels]
        bars = left.bar(xs, p50, width, label=f"{label} p50")
        left.scatter(xs, p99, marker="_", s=300, color=bars.patches[0].get_facecolor())
    left.set_xticks(list(positions), [f"concurrency {level}" for level in levels])
    left.set_ylabel("latency, ms (bar p50, tick p99)")
    left.set_yscale("log")
    left.set_title(f"Fixed {LATENCY_MS} ms backend: direct vs through Sluice")
    left.legend(fontsize=8)
    names = [name for name in ("gateway", "worker", "redis", "client") if name in results[1]["cpu"]]
    bottom = [0.0] * len(levels)
    for name in names:
        per_request = [
            results[level]["cpu"][name] * 1000 / max(1, results[level]["sluice"]["n"])
            for level in levels
        ]
        right.bar(list(positions), per_request, 0.5, bottom=bottom, label=PROCESS_LABELS[name])
        bottom = [b + v for b, v in zip(bottom, per_request, strict=True)]
    right.set_xticks(list(positions), [f"concurrency {level}" for level in levels])
    right.set_ylabel("CPU ms per request")
    right.set_title("Where the CPU goes, per Sluice request")
    right.legend(fontsize=8)
    report.save(figure, NAME)


def _markdown(
    results: dict[int, dict[str, Any]],
    clients: dict[str, dict[str, float]],
    breakdown: dict[str, float],
    window: dict[str, float],
    idle: dict[str, float],
) -> str:
    rows = []
    for level, result in results.items():
        direct_, batcher_, sluice_ = result["direct"], result["batcher"], result["sluice"]
        rows.append(
            [
                str(level),
                f"{report.ms(direct_['p50'])} / {report.ms(direct_['p99'])}",
                f"{report.ms(batcher_['p50'])} / {report.ms(batcher_['p99'])}",
                f"{report.ms(sluice_['p50'])} / {report.ms(sluice_['p99'])}",
                f"**{report.ms(sluice_['p50'] - direct_['p50'])}** / "
                f"{report.ms(sluice_['p99'] - direct_['p99'])}",
                f"{result['rate']:.0f}",
                str(result["failures"]),
            ]
        )
    main = report.table(
        [
            "concurrency",
            "direct p50 / p99 ms",
            "in-process batcher p50 / p99 ms",
            "Sluice p50 / p99 ms",
            "overhead p50 / p99 ms",
            "Sluice req/s",
            "non-200",
        ],
        rows,
    )
    cpu_rows = []
    for level, result in results.items():
        cpu, n = result["cpu"], max(1, result["sluice"]["n"])
        ours = sum(cpu.get(name, 0.0) for name in ("gateway", "worker", "redis", "client"))
        cpu_rows.append(
            [
                str(level),
                *(
                    report.ms(cpu[name] * 1000 / n, 2) if name in cpu else "-"
                    for name in ("gateway", "worker", "redis", "client")
                ),
                report.ms(ours * 1000 / n, 2),
                f"{report.ms(cpu['others'] / cpu['wall'], 2)} of {psutil.cpu_count()}",
            ]
        )
    cpu_table = report.table(
        [
            "concurrency",
            "gateway",
            "worker",
            "redis",
            "load generator",
            "all of ours",
            "other processes (CPUs busy)",
        ],
        cpu_rows,
    )
    at_goal = results[GOAL_CONCURRENCY]
    overhead = at_goal["sluice"]["p50"] - at_goal["direct"]["p50"]
    met = overhead <= GOAL_OVERHEAD_P50_MS
    unloaded = results[1]["sluice"]["p50"] - results[1]["direct"]["p50"]
    per_request_cpu = (
        sum(at_goal["cpu"].get(name, 0.0) for name in ("gateway", "worker", "redis", "client"))
        / max(1, at_goal["sluice"]["n"])
        * 1000
    )
    cores = psutil.cpu_count() or 1
    shares = {
        name: at_goal["cpu"][name] * 1000 / max(1, at_goal["sluice"]["n"])
        for name in ("gateway", "worker", "redis", "client")
        if name in at_goal["cpu"]
    }
    largest = max(shares, key=shares.__getitem__)
    ceiling = cores * 1000 / per_request_cpu if per_request_cpu else float("nan")
    wanted = GOAL_CONCURRENCY * 1000 / at_goal["direct"]["p50"]
    b = breakdown
    reading = [
        f"**Goal: overhead p50 <= {GOAL_OVERHEAD_P50_MS:.0f} ms at concurrency "
        f"{GOAL_CONCURRENCY}: {'met' if met else 'missed'}** ({report.ms(overhead)} ms).",
        "",
        f"Unloaded (concurrency 1), Sluice adds {report.ms(unloaded)} ms at p50 to a "
        f"{LATENCY_MS} ms model. Where it goes (medians of {b['n']:.0f} requests, from the "
        "call log joined on X-Request-ID): "
        f"{report.ms(b['client'])} ms at the client ~ "
        f"{report.ms(b['inference'])} ms in the worker's batcher and backend "
        f"(of which {LATENCY_MS} ms is the model) + "
        f"{report.ms(b['queue'])} ms from enqueue to a worker picking the message up "
        "(an idle consumer wakes on the queue's bell; a busy one polls every "
        "SLUICE_WORKER_POLL_MS at most) + "
        f"{report.ms(b['view'])} ms of the view's own work (key, validation, admission, "
        "enqueue, reading the reply stream) + "
        f"{report.ms(b['outside'])} ms outside the view (HTTP, uvicorn, Django's request "
        "handling, DRF rendering).",
        "",
        f"Under concurrency the limit is CPU, not waiting: at concurrency {GOAL_CONCURRENCY} "
        f"Sluice's processes (gateway, worker, Redis, load generator) spent "
        f"{report.ms(per_request_cpu, 2)} ms of CPU per request, so {cores} CPUs carry at "
        f"most about {ceiling:.0f} requests/s, while {GOAL_CONCURRENCY} clients of a "
        f"{LATENCY_MS} ms model ask for about {wanted:.0f}/s. Requests then wait for CPU, "
        f"and latency approaches concurrency / throughput ({GOAL_CONCURRENCY} / "
        f"{at_goal['rate']:.0f} per s = {GOAL_CONCURRENCY * 1000 / at_goal['rate']:.0f} ms). "
        f"The largest share is the {PROCESS_LABELS[largest]}'s "
        f"({report.ms(shares[largest], 2)} ms); the "
        "direct call costs no CPU at all, as the fixed backend only sleeps, and its threads "
        "each sleep their own 20 ms in parallel, which no batching worker can do: against "
        "the in-process batcher column (the same backend behind one micro-batcher) the "
        "overhead at this concurrency is "
        f"{report.ms(at_goal['sluice']['p50'] - at_goal['batcher']['p50'])} ms at p50. "
        + (
            "At this CPU cost per request the goal cannot be met on this machine at this "
            "concurrency, however the work is scheduled: it needs less CPU per request "
            "(more gateway processes help only with more cores)."
            if ceiling < wanted
            else ""
        ),
        "",
        f"Idle, with no request at all, the worker process ({WORKER_THREADS} threads) used "
        f"{idle['worker'] / idle['wall']:.0%} of a CPU and the gateway "
        f"{idle['gateway'] / idle['wall']:.0%}: idle consumers block on their queue's bell "
        "and idle worker threads wake four times a second (workers/broker.py, "
        "workers/service.py; Dramatiq alone would wake each thread 100 times a second).",
        "",
        "The in-process batcher column is the worker's own scheduling without any network: "
        "a request that arrives while a batch runs waits for the next one, so with many "
        "clients it adds up to one batch time even with max_wait_ms 0.",
        "",
        f"The batching window: with the default max_wait_ms of 10, an unloaded request took "
        f"{report.ms(window['p50'])} ms p50 / {report.ms(window['p99'])} ms p99, against "
        f"{report.ms(results[1]['sluice']['p50'])} / {report.ms(results[1]['sluice']['p99'])} "
        "with 0. The batcher waits for company only while the worker holds requests on "
        "their way to it (workers/batcher.py), so an unloaded request barely pays for the "
        "window.",
        "",
        f"Load generator: at concurrency 16, httpx.AsyncClient used "
        f"{clients['httpx']['cpu_us']:.0f} µs of CPU per request "
        f"(p50 {report.ms(clients['httpx']['p50'])} ms, {clients['httpx']['rate']:.0f} req/s) "
        f"and the raw asyncio client {clients['raw']['cpu_us']:.0f} µs "
        f"(p50 {report.ms(clients['raw']['p50'])} ms, {clients['raw']['rate']:.0f} req/s); "
        "every benchmark uses the raw client, since its CPU is taken from the server.",
    ]
    return "\n".join(
        [
            "# Gateway overhead",
            "",
            f"A request through Sluice to a fixed-latency backend ({LATENCY_MS} ms per batch) "
            "against the same backend code called in-process from threads, closed loop, "
            f"{SLUICE_S:.0f} s per concurrency through Sluice (after 1 s of warm-up), "
            f"{INPROCESS_S:.0f} s in-process. Deployment: max_batch_size 64, max_wait_ms 0, "
            "capacity 1024 (admission never refuses here), one worker process with "
            f"{WORKER_THREADS} threads, one uvicorn process.",
            "",
            report.machine(),
            "",
            main,
            "",
            "CPU time per Sluice request (ms), by process, over the same runs:",
            "",
            cpu_table,
            "",
            "![latency and CPU per request](overhead.png)",
            "",
            "## Reading",
            "",
            *reading,
        ]
    )
