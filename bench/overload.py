"""Overload: open-loop arrivals at 0.5x, 1x, 2x and 4x of a deployment's service capacity,
with admission control (two in-flight capacities) and without it (an unbounded queue).

The backend is FixedLatencyBackend at LATENCY_MS per batch with max_batch_size 1, so the
deployment serves one request at a time and its capacity is well defined: about
1000 / (LATENCY_MS + the worker's per-request cost) requests/s. It is measured first, in a
closed loop that keeps the worker busy, and the offered rates are multiples of it.

Arrivals are Poisson at a fixed rate, whatever the answers (open loop: a refused client
does not slow the arrivals down). For each rate: goodput (200s completed inside the
window, per second), latency of admitted requests and of refusals, the share refused, and
whether a client that waits the Retry-After it was given is then admitted (a sample of
refusals, retried once, only where the retry falls inside the window). The same arrivals
then go to a gateway started with SLUICE_ENFORCE_CAPACITY=0: every request is queued.
Requests still unanswered GRACE_S after the last arrival are cut off (their connections
closed, which cancels their work) and count in the percentiles with their age at the cut,
so a percentile that includes them is a lower bound, marked ">=".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import harness, load, report
from .harness import Context, DeploymentConfig

NAME = "overload"
LATENCY_MS = 40
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
WINDOW_S = 20.0
GRACE_S = 5.0
CAPACITIES = (2, 8)  # in-flight bounds (queued + running) compared under admission
UNBOUNDED_SLUG_CAPACITY = 8
BASELINE_S = 5.0
CAPACITY_S = 6.0
# Shortened together by `python -m bench --quick`.
DURATIONS = ("WINDOW_S", "GRACE_S", "BASELINE_S", "CAPACITY_S")
RETRY_SHARE = 0.05
MAX_RETRIES = 50
PATH = "/v1/chat/completions"
# Goals of the issue.
GOAL_P99_FACTOR = 2.0
GOAL_GOODPUT = 0.9
GOAL_REFUSAL_P99_MS = 10.0


def slug(capacity: int) -> str:
    return f"bench-overload-c{capacity}"


def _body(name: str):
    def body() -> dict[str, Any]:
        return {
            "model": name,
            "messages": [{"role": "user", "content": "Summarise the tides."}],
            "max_tokens": 8,
        }

    return body


@dataclass
class Step:
    config: str  # "capacity 2", "capacity 8", "unbounded"
    multiplier: float
    outcome: load.OpenLoopResult
    drain_s: float
    # Messages the worker ran to completion during the step (from its heartbeat), whether
    # or not their client was still there to get the answer.
    worker_ran: int = 0
    # Inside-the-view times of this step's refusals (call log total_ms), filled in later.
    refusal_view_ms: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(1 for s in [*self.samples, *self.outcome.retries] if s.status == 200)

    @property
    def wasted(self) -> int:
        """Runs whose result reached no client (it had been answered otherwise, or left)."""
        return max(0, self.worker_ran - self.answered)

    @property
    def samples(self) -> list[load.Sample]:
        return self.outcome.samples

    @property
    def offered(self) -> float:
        """Arrivals per second actually generated."""
        return len(self.samples) / self.outcome.window_s

    @property
    def goodput(self) -> float:
        """200s completed inside the window, first attempts and retries, per second."""
        window_end = self.outcome.started + self.outcome.window_s
        done = [*self.samples, *self.outcome.retries]
        ok = sum(1 for s in done if s.status == 200 and s.done is not None and s.done <= window_end)
        return ok / self.outcome.window_s

    @property
    def admitted(self) -> dict[str, float]:
        # Cut-off requests count with their age when cut: the percentiles become minimums.
        return load.summary(
            [s.age_ms for s in self.samples if s.status == 200 or s.cut_at is not None]
        )

    @property
    def lower_bound(self) -> bool:
        return self.outcome.cut_off > 0

    @property
    def refused(self) -> list[load.Sample]:
        return [s for s in self.samples if s.status in (429, 503)]

    @property
    def refusals(self) -> dict[str, float]:
        return load.summary([s.latency_ms for s in self.refused])

    @property
    def refused_share(self) -> float:
        return len(self.refused) / max(1, len(self.samples))

    @property
    def admitted_share(self) -> float:
        return sum(1 for s in self.samples if s.status == 200) / max(1, len(self.samples))

    @property
    def errors(self) -> dict[str, list[float]]:
        """Answers that are neither success nor refusal, by code, with their latencies."""
        found: dict[str, list[float]] = {}
        for sample in self.samples:
            if sample.done is not None and sample.status not in (200, 429, 503):
                found.setdefault(sample.error or str(sample.status), []).append(sample.latency_ms)
        return found

    @property
    def retries(self) -> list[load.Sample]:
        return self.outcome.retries

    @property
    def retries_admitted(self) -> int:
        return sum(1 for s in self.retries if s.status == 200)

    @property
    def retry_after_ms(self) -> float:
        given = [s.retry_after_ms for s in self.refused if s.retry_after_ms is not None]
        return load.percentile(given, 50)

    @property
    def lag_p99_ms(self) -> float:
        return load.percentile([s.lag_ms for s in self.samples], 99)

    def timeline(self) -> list[tuple[float, float, str]]:
        """(arrival second in the window, latency ms, outcome) of every first attempt."""
        points = []
        for sample in self.samples:
            if sample.status == 200:
                kind = "ok"
            elif sample.status in (429, 503):
                kind = "refused"
            elif sample.cut_at is not None:
                kind = "cut off"
            else:
                kind = "error"
            points.append((sample.due - self.outcome.started, sample.age_ms, kind))
        return points


def _open_loop(url: str, ctx: Context, name: str, rate: float, seed: int) -> load.OpenLoopResult:
    async def go() -> load.OpenLoopResult:
        client = load.RawClient(url, ctx.headers())
        try:
            return await load.open_loop(
                client,
                PATH,
                _body(name),
                rate=rate,
                duration_s=WINDOW_S,
                grace_s=GRACE_S,
                seed=seed,
                retry_share=RETRY_SHARE,
                max_retries=MAX_RETRIES,
            )
        finally:
            await client.close()

    return load.run(go)


def _closed(url: str, ctx: Context, name: str, concurrency: int, duration_s: float):
    async def go() -> list[load.Sample]:
        client = load.RawClient(url, ctx.headers())
        try:
            return await load.closed_loop(
                client, PATH, _body(name), concurrency=concurrency, duration_s=duration_s
            )
        finally:
            await client.close()

    return load.run(go)


def _settled_counts(name: str) -> tuple[int, int]:
    from workers.heartbeat import HEARTBEAT_INTERVAL_S

    # The heartbeat is written every second: wait for one written after the queue drained.
    time.sleep(HEARTBEAT_INTERVAL_S + 0.2)
    return harness.worker_counts(name)


def _ran_since(name: str, before: tuple[int, int]) -> int:
    handled, dropped = _settled_counts(name)
    return (handled - before[0]) - (dropped - before[1])


def run(ctx: Context) -> Path:
    for capacity in CAPACITIES:
        harness.ensure_deployment(
            ctx.tenant,
            DeploymentConfig(
                slug=slug(capacity),
                task="chat",
                backend=harness.FIXED_BACKEND,
                config={"latency_ms": LATENCY_MS},
                capacity=capacity,
                max_batch_size=1,
                max_wait_ms=0,
            ),
        )
    slugs = [slug(capacity) for capacity in CAPACITIES]
    steps: list[Step] = []
    with harness.Stack(ctx.logs) as stack:
        url = stack.start_gateway("web")
        stack.start_worker(slugs, threads=8)
        reference = slug(max(CAPACITIES))
        print("  unloaded latency (closed loop, concurrency 1)")
        baseline_samples = _closed(url, ctx, reference, 1, BASELINE_S)
        baseline = load.summary([s.latency_ms for s in baseline_samples if s.status == 200])
        print("  service capacity (closed loop, concurrency = capacity)")
        capacity_samples = _closed(url, ctx, reference, max(CAPACITIES), CAPACITY_S)
        service_rate = sum(1 for s in capacity_samples if s.status == 200) / CAPACITY_S
        capacity_refused = sum(1 for s in capacity_samples if s.status != 200)
        for capacity in CAPACITIES:
            # The same seed per load level, so every configuration gets the same arrivals.
            for seed, multiplier in enumerate(MULTIPLIERS, start=1):
                print(f"  capacity {capacity}: {multiplier}x ({multiplier * service_rate:.0f}/s)")
                before = _settled_counts(slug(capacity))
                outcome = _open_loop(url, ctx, slug(capacity), multiplier * service_rate, seed)
                drain = harness.wait_drained(slug(capacity))
                ran = _ran_since(slug(capacity), before)
                steps.append(Step(f"capacity {capacity}", multiplier, outcome, drain, ran))
        stack.stop("web")
        url = stack.start_gateway("web-unbounded", enforce_capacity=False)
        for seed, multiplier in enumerate(MULTIPLIERS, start=1):
            print(f"  unbounded queue: {multiplier}x ({multiplier * service_rate:.0f}/s)")
            before = _settled_counts(reference)
            outcome = _open_loop(url, ctx, reference, multiplier * service_rate, seed)
            drain = harness.wait_drained(reference, timeout=300)
            ran = _ran_since(reference, before)
            steps.append(Step("unbounded", multiplier, outcome, drain, ran))
    records = harness.call_log_records()
    for step in steps:
        step.refusal_view_ms = [
            float(records[s.request_id]["total_ms"])
            for s in step.refused
            if s.request_id in records
        ]
    _plot(steps, service_rate, baseline)
    return report.write(NAME, _markdown(steps, service_rate, capacity_refused, baseline))


# --- report ---------------------------------------------------------------------------


def _configs(steps: list[Step]) -> list[str]:
    return list(dict.fromkeys(step.config for step in steps))


def _at(steps: list[Step], config: str, multiplier: float) -> Step:
    return next(s for s in steps if s.config == config and s.multiplier == multiplier)


def _plot(steps: list[Step], service_rate: float, baseline: dict[str, float]) -> None:
    plt = report.pyplot()
    figure, (latency, goodput) = plt.subplots(1, 2, figsize=(11, 4.4))
    for config in _configs(steps):
        mine = [step for step in steps if step.config == config]
        xs = [step.multiplier for step in mine]
        line = latency.plot(
            xs, [step.admitted["p99"] for step in mine], marker="o", label=f"{config}: p99"
        )[0]
        latency.plot(
            xs,
            [step.admitted["p50"] for step in mine],
            marker=".",
            linestyle="--",
            color=line.get_color(),
            label=f"{config}: p50",
        )
        refused = [(step.multiplier, step.refusals["p99"]) for step in mine if step.refused]
        if refused:
            latency.plot(
                [x for x, _ in refused],
                [y for _, y in refused],
                marker="x",
                linestyle=":",
                color=line.get_color(),
                label=f"{config}: refusal p99",
            )
        goodput.plot(xs, [step.goodput for step in mine], marker="o", label=config)
    latency.axhline(
        GOAL_P99_FACTOR * baseline["p99"],
        color="grey",
        linestyle=":",
        label=f"{GOAL_P99_FACTOR:.0f}x unloaded p99",
    )
    latency.set_yscale("log")
    latency.set_xscale("log", base=2)
    latency.set_xticks(list(MULTIPLIERS), [f"{m}x" for m in MULTIPLIERS])
    latency.set_xlabel("offered load (x measured capacity)")
    latency.set_ylabel("latency, ms (log)")
    latency.set_title("Latency of admitted requests (and of refusals)")
    latency.legend(fontsize=6.5, ncol=2)
    goodput.axhline(service_rate, color="grey", linestyle=":", label="measured capacity")
    goodput.axhline(
        GOAL_GOODPUT * service_rate, color="grey", linestyle="--", label=f"{GOAL_GOODPUT:.0%}"
    )
    goodput.set_xscale("log", base=2)
    goodput.set_xticks(list(MULTIPLIERS), [f"{m}x" for m in MULTIPLIERS])
    goodput.set_xlabel("offered load (x measured capacity)")
    goodput.set_ylabel("goodput, successful requests/s")
    goodput.set_title("Goodput vs offered load")
    goodput.legend(fontsize=7)
    report.save(figure, NAME)

    figure, axis = plt.subplots(figsize=(11, 4.4))
    top = max(MULTIPLIERS)
    markers = {"ok": ".", "refused": "x", "error": "+", "cut off": "|"}
    for config in _configs(steps):
        points = _at(steps, config, top).timeline()
        for kind, marker in markers.items():
            mine = [(t, v) for t, v, k in points if k == kind]
            if mine:
                axis.scatter(
                    [t for t, _ in mine],
                    [v for _, v in mine],
                    s=5,
                    marker=marker,
                    label=f"{config}: {kind} ({len(mine)})",
                )
    axis.set_yscale("log")
    axis.set_xlabel("arrival time in the window, s")
    axis.set_ylabel("latency, ms (log)")
    axis.set_title(f"Every first attempt at {top}x capacity, by arrival time")
    axis.legend(fontsize=7, markerscale=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    report.save(figure, f"{NAME}_timeline")


def _latency(step: Step, name: str) -> str:
    value = report.ms(step.admitted[name], 0)
    return f">= {value}" if step.lower_bound else value


def _errors(step: Step) -> str:
    return (
        ", ".join(
            f"{code} {len(latencies)} (p50 at {load.percentile(latencies, 50) / 1000:.1f} s)"
            for code, latencies in step.errors.items()
        )
        or "-"
    )


def _markdown(
    steps: list[Step], service_rate: float, capacity_refused: int, baseline: dict[str, float]
) -> str:
    rows = []
    for step in steps:
        rows.append(
            [
                step.config,
                f"{step.multiplier}x",
                f"{step.offered:.1f}",
                f"{step.goodput:.1f} ({step.goodput / service_rate:.0%})",
                f"{_latency(step, 'p50')} / {_latency(step, 'p99')}",
                report.pct(step.refused_share),
                f"{report.ms(step.refusals['p50'])} / {report.ms(step.refusals['p99'])}"
                if step.refused
                else "-",
                f"{report.ms(load.percentile(step.refusal_view_ms, 50))} / "
                f"{report.ms(load.percentile(step.refusal_view_ms, 99))}"
                if step.refusal_view_ms
                else "-",
                report.ms(step.retry_after_ms, 0) if step.refused else "-",
                f"{step.retries_admitted}/{len(step.retries)}" if step.retries else "-",
                str(step.outcome.cut_off) if step.outcome.cut_off else "-",
                _errors(step),
                f"{step.worker_ran} / {step.wasted}",
                report.ms(step.lag_p99_ms),
            ]
        )
    main = report.table(
        [
            "config",
            "load",
            "offered req/s",
            "goodput req/s",
            "admitted p50 / p99 ms",
            "refused",
            "refusal p50 / p99 ms",
            "refusal inside the view p50 / p99 ms",
            "Retry-After ms (median)",
            "retried after Retry-After: admitted",
            "cut off",
            "other answers",
            "worker runs / wasted",
            "client lag p99 ms",
        ],
        rows,
    )
    top = max(MULTIPLIERS)
    limit = GOAL_P99_FACTOR * baseline["p99"]
    reading = [
        f"Goals at {top}x: admitted p99 <= {GOAL_P99_FACTOR:.0f}x the unloaded p99 "
        f"(= {report.ms(limit, 0)} ms), goodput >= {GOAL_GOODPUT:.0%} of capacity, refusal "
        f"p99 <= {GOAL_REFUSAL_P99_MS:.0f} ms, while the unbounded queue's latency grows "
        "without bound.",
        "",
    ]
    bounded = [config for config in _configs(steps) if config != "unbounded"]
    for config in bounded:
        step = _at(steps, config, top)
        p99_ok = step.admitted["p99"] <= limit and not step.lower_bound
        goodput_ok = step.goodput >= GOAL_GOODPUT * service_rate
        refusal_ok = bool(step.refused) and step.refusals["p99"] <= GOAL_REFUSAL_P99_MS
        reading.append(
            f"- **{config}**: admitted p99 {report.ms(step.admitted['p99'], 0)} ms: "
            f"**{'met' if p99_ok else 'missed'}**; goodput {step.goodput / service_rate:.0%} "
            f"of capacity: **{'met' if goodput_ok else 'missed'}**; refusal p99 "
            f"{report.ms(step.refusals['p99'])} ms: **{'met' if refusal_ok else 'missed'}**."
        )
    if "unbounded" in _configs(steps):
        last = _at(steps, "unbounded", top)
        errors = sum(len(v) for v in last.errors.values())
        text = (
            f"- **unbounded**: admitted p50 {_latency(last, 'p50')} ms, p99 "
            f"{_latency(last, 'p99')} ms, goodput {last.goodput / service_rate:.0%} of "
            f"capacity; {last.outcome.cut_off} requests were still waiting {GRACE_S:.0f} s "
            "after the last arrival and were cut off. The timeline plot shows its latency "
            "climbing through the window while admission keeps it flat."
        )
        if errors:
            codes = ", ".join(last.errors)
            waited = load.percentile([v for vs in last.errors.values() for v in vs], 50) / 1000
            text += (
                f" {errors} requests got an error ({codes}) instead of an answer, after a "
                f"median of {waited:.1f} s: the gateway gave up on them, not the client. The "
                "worker had queued them all the "
                f"same: of its {last.worker_ran} runs, {last.wasted} produced an answer that "
                "nobody received, which is why goodput falls below capacity: a queue without "
                "a bound, in front of callers that stop waiting, spends the capacity on work "
                "that is thrown away."
            )
        reading.append(text)
    reading.append("")
    if len(bounded) >= 2:
        tight, loose = (
            min(bounded, key=lambda c: int(c.split()[-1])),
            max(bounded, key=lambda c: int(c.split()[-1])),
        )
        low = min(MULTIPLIERS)
        reading.append(
            "The in-flight capacity is the operator's knob between latency and refusals. With "
            f"one request served at a time, an admitted request waits behind up to capacity - 1 "
            f"others, so its latency is about capacity x {LATENCY_MS} ms: at {top}x, "
            f"{tight} gives p99 {report.ms(_at(steps, tight, top).admitted['p99'], 0)} ms and "
            f"{loose} {report.ms(_at(steps, loose, top).admitted['p99'], 0)} ms. But a small "
            "capacity also refuses the bursts of a Poisson stream well below saturation: at "
            f"{low}x, {tight} refused {report.pct(_at(steps, tight, low).refused_share)} and "
            f"{loose} {report.pct(_at(steps, loose, low).refused_share)}; at 1.0x, "
            f"{report.pct(_at(steps, tight, 1.0).refused_share)} against "
            f"{report.pct(_at(steps, loose, 1.0).refused_share)}, with goodput "
            f"{_at(steps, tight, 1.0).goodput / service_rate:.0%} against "
            f"{_at(steps, loose, 1.0).goodput / service_rate:.0%} of capacity. The lease is "
            "held from admission to settlement (enqueue, pickup, batching, the run), so the "
            "worker only stays busy when capacity covers that whole pipeline."
        )
        reading.append("")
    refusal_view = [s for s in steps if s.config in bounded and s.multiplier == top]
    if refusal_view and all(s.refusal_view_ms for s in refusal_view):
        inside = max(load.percentile(s.refusal_view_ms, 99) for s in refusal_view)
        outside = max(s.refusals["p99"] for s in refusal_view)
        reading.append(
            f"Where a refusal's time goes: inside the view (key, validation, the admission "
            f"script, the 503) it took at most {report.ms(inside)} ms at p99; at the client, "
            f"up to {report.ms(outside)} ms. The difference is spent before and after the "
            "view, in uvicorn and Django's request handling (the request_started and "
            "request_finished signals, run through sync_to_async on a shared thread), and "
            "in waiting for the same CPU as the admitted requests."
        )
        reading.append("")
    retried = [s for s in steps if s.config in bounded and s.retries]
    if retried:
        parts = [
            f"{s.config} at {s.multiplier}x: {s.retries_admitted}/{len(s.retries)} retries "
            f"admitted against {s.admitted_share:.0%} of first attempts"
            for s in retried
            if s.multiplier >= 2
        ]
        reading.append(
            "Retry-After: the script estimates the wait from the measured drain rate, and "
            "the gateway clamps it to at least 1 s (retry-after-ms 1000 here, where the "
            f"drain rate alone would say about {1000 / service_rate:.0f} ms). A client that "
            "waits it and retries once meets the same overload, so under a sustained "
            "overload its chance is only somewhat better than a fresh request's ("
            + "; ".join(parts)
            + "). It is honest about when room appears, but cannot reserve it."
        )
    return "\n".join(
        [
            "# Overload",
            "",
            f"Fixed-latency backend, {LATENCY_MS} ms per batch, max_batch_size 1 (one request "
            "at a time), one worker process with 8 threads, one uvicorn process; the bench "
            "tenant's plan has priority high (it may fill 100% of the capacity) and limits "
            f"out of reach. Poisson arrivals for {WINDOW_S:.0f} s per load level, the same "
            "arrival times for every configuration.",
            "",
            f"**Measured capacity: {service_rate:.1f} requests/s** (closed loop, "
            f"{max(CAPACITIES)} clients on capacity {max(CAPACITIES)}, {CAPACITY_S:.0f} s; "
            f"{capacity_refused} refused). Unloaded latency (closed loop, one client, "
            f"{BASELINE_S:.0f} s): p50 {report.ms(baseline['p50'])} ms, p99 "
            f"{report.ms(baseline['p99'])} ms.",
            "",
            report.machine(),
            "",
            main,
            "",
            "Goodput counts 200s completed inside the window (first attempts and retries). "
            "Latencies are measured from when a request was due, so client lag (how late the "
            "load generator sent it) is included, not hidden. Refusal inside the view: the "
            "gateway's own call-log total_ms of the same refusals (joined on X-Request-ID). "
            "Worker runs: messages the worker ran to completion during the step (its "
            "heartbeat's handled minus dropped); wasted: runs whose answer reached no client. "
            "Unbounded: the gateway ran with SLUICE_ENFORCE_CAPACITY=0, so every request is "
            "queued; capacity 8's deployment.",
            "",
            "![latency and goodput vs offered load](overload.png)",
            "",
            "![every request at the highest load](overload_timeline.png)",
            "",
            "## Reading",
            "",
            *reading,
        ]
    )
