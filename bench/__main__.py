"""python -m bench [--quick] [overhead|overload|batching ...]: run the benchmarks.

With no names, all three run (about 7 minutes on two cores; `make bench`). Each writes
bench/results/<name>.md (a table and a short reading: what was measured, against which
goal, met or missed, and why) and PNG plots beside it. Nothing here asserts a time.
--quick shortens every duration to a quarter, to check that everything runs; its rough
numbers go to $SLUICE_HOME/bench/quick-results/, never over the real results.

Where it runs, so that it never disturbs a running demo or the tests:

- PostgreSQL and Redis: when DATABASE_URL / REDIS_URL are unset (the usual case), private
  embedded servers under $SLUICE_HOME/bench (default .sluice/bench), started by this
  process and stopped when it exits. When DATABASE_URL is set, the same server is used
  with a database of its own, `<name>_bench`, created if missing. When REDIS_URL is set,
  that Redis is used. Either way every Redis key is under the prefix `sluice-bench`,
  cleared when a run starts (and, on a Redis named by REDIS_URL, when it ends).
- Converted model weights: $SLUICE_MODEL_CACHE, by default the demo's .sluice/models, so
  the SmolLM2 GGUF is converted once and never per run.
- Data: a tenant "bench" on a plan "bench" (priority high, limits out of reach), a fresh
  API key per run, deployments named bench-*, each subscribed.
- Processes: uvicorn (the gateway) and `manage.py runworkers` are started here as
  subprocesses for each benchmark and stopped after it; their logs are in
  $SLUICE_HOME/bench/logs.

Client and server share the machine's CPUs; the results say how busy the rest of the
machine was while they ran.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from . import harness

PARTS = ("overhead", "overload", "batching")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run Sluice's benchmarks (all by default)."
    )
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"shorten every duration x{harness.QUICK_FACTOR}: checks that it all runs, "
        "numbers are rough",
    )
    args = parser.parse_args(argv)
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    parts = list(dict.fromkeys(args.parts)) or list(PARTS)
    harness.quick = args.quick
    logs = harness.prepare_environment()
    # Django (and through it the embedded PostgreSQL and Redis) only after the environment
    # above is in place.
    harness.setup_django()
    tenant = harness.ensure_tenant()
    ctx = harness.Context(logs=logs, tenant=tenant, key=harness.issue_key(tenant))
    started_all = time.monotonic()
    try:
        _run(parts, ctx, quick=args.quick)
    finally:
        if harness.shared_redis:
            harness.clear_redis()
    print(f"done in {time.monotonic() - started_all:.0f} s; logs in {logs}", flush=True)


def _run(parts: list[str], ctx: harness.Context, *, quick: bool) -> None:
    for part in parts:
        started = time.monotonic()
        print(f"{part} ...", flush=True)
        module = importlib.import_module(f"bench.{part}")
        if quick:
            for name in module.DURATIONS:
                setattr(module, name, getattr(module, name) * harness.QUICK_FACTOR)
        path = module.run(ctx)
        print(
            f"{part}: wrote {_shown(path)} in {time.monotonic() - started:.0f} s",
            flush=True,
        )


def _shown(path: Path) -> str:
    inside = path.is_relative_to(harness.PROJECT)
    return str(path.relative_to(harness.PROJECT)) if inside else str(path)


if __name__ == "__main__":
    main()
