"""The stage the benchmarks run on: a private database and Redis, a bench tenant with
high limits, deployments, and the gateway and worker processes started and stopped here.

prepare_environment() must run before Django is imported: it decides which PostgreSQL and
Redis the benchmark uses (see bench/__main__.py) and every child process inherits that.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
REDIS_PREFIX = "sluice-bench"
FIXED_BACKEND = "workers.backends.fixed.FixedLatencyBackend"
EMBEDDING_BACKEND = "workers.backends.embeddings.SentenceTransformerBackend"
CHAT_BACKEND = "workers.backends.chat.TransformersChatBackend"
# Limits no benchmark can reach: refusals must come from capacity, never from a quota.
UNREACHABLE = 2_000_000_000

_home: Path | None = None
# Set by `python -m bench --quick`: every duration shortened, for checking that it all runs.
QUICK_FACTOR = 0.25
quick = False
# REDIS_URL named a Redis that others use too: the benchmark removes its keys when it ends.
shared_redis = False


def prepare_environment() -> Path:
    """Point this process (and its children) at the benchmark's own services; returns the
    directory for the benchmark's logs."""
    global _home, shared_redis
    env = os.environ
    shared_redis = bool(env.get("REDIS_URL"))
    user_home = Path(env.get("SLUICE_HOME") or PROJECT / ".sluice").expanduser().resolve()
    # The converted chat model is shared with the demo, so a run never reconverts the GGUF.
    env.setdefault("SLUICE_MODEL_CACHE", str(user_home / "models"))
    # Embedded PostgreSQL and Redis (for whichever URL is unset) live here, apart from the
    # demo's and the tests', so a benchmark never disturbs them.
    _home = user_home / "bench"
    env["SLUICE_HOME"] = str(_home)
    env["SLUICE_REDIS_PREFIX"] = REDIS_PREFIX
    if env.get("DATABASE_URL"):
        env["DATABASE_URL"] = _own_database(env["DATABASE_URL"])
    env.setdefault("SECRET_KEY", "bench-only-secret-key-not-for-production")
    # Production settings: DEBUG keeps every SQL query in memory and slows the hot path.
    env["DEBUG"] = "0"
    env.setdefault("LOG_LEVEL", "WARNING")
    env["DJANGO_SETTINGS_MODULE"] = "sluice.settings"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Model loading prints progress bars; the benchmark's own output is what matters here.
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logs = _home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs


def quick_results() -> Path:
    assert _home is not None, "prepare_environment() first"
    return _home / "quick-results"


def _own_database(url: str) -> str:
    """The same PostgreSQL server as `url`, database `<name>_bench`, created if missing."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "sluice"
    if name.endswith("_bench"):
        return url
    bench_name = f"{name}_bench"
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [bench_name])
        if found.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(bench_name)))
    return urlunsplit(parts._replace(path=f"/{bench_name}"))


def setup_django() -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    clear_redis()


def clear_redis() -> None:
    """Forget everything an earlier run left under the benchmark's prefix."""
    from sluice.redisconn import get_redis

    client = get_redis()
    for found in client.scan_iter(match=f"{REDIS_PREFIX}:*", count=1000):
        client.delete(found)


# --- data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentConfig:
    slug: str
    task: str
    backend: str
    config: dict[str, Any]
    capacity: int
    max_batch_size: int
    max_wait_ms: int


def ensure_tenant() -> Any:
    """The bench tenant, on a high-priority plan whose limits are out of reach."""
    from tenants import services
    from tenants.models import Plan, Tenant
    from tenants.policy import SYSTEM

    plan, _ = Plan.objects.update_or_create(
        slug="bench",
        defaults={
            "name": "Bench",
            "requests_per_minute": UNREACHABLE,
            "tokens_per_minute": UNREACHABLE,
            "monthly_token_budget": 10**15,
            "max_tokens_cap": 4096,
            # high: the tenant may fill 100% of a deployment's capacity (normal stops at 90%).
            "priority": "high",
            "fair_share_weight": 1,
            "requires_platform_approval": False,
        },
    )
    tenant = Tenant.objects.filter(slug="bench").first()
    if tenant is None:
        tenant = services.tenant_create(name="Bench", slug="bench", plan=plan, actor=SYSTEM)
    elif tenant.plan_id != plan.id:
        tenant.plan = plan
        tenant.save(update_fields=["plan"])
    return tenant


def issue_key(tenant: Any) -> str:
    from tenants import services
    from tenants.policy import SYSTEM

    _key, raw = services.api_key_issue(tenant=tenant, name="bench", actor=SYSTEM)
    return raw


def ensure_deployment(tenant: Any, spec: DeploymentConfig) -> None:
    """Create or reset the deployment and subscribe the bench tenant to it.

    Written before the gateway starts, so no web process holds an older copy in its catalog.
    """
    from gateway.models import ModelDeployment
    from tenants.models import Subscription

    deployment, _ = ModelDeployment.objects.update_or_create(
        slug=spec.slug,
        defaults={
            "name": spec.slug,
            "task": spec.task,
            "backend": spec.backend,
            "backend_config": spec.config,
            "capacity": spec.capacity,
            "max_batch_size": spec.max_batch_size,
            "max_wait_ms": spec.max_wait_ms,
            "default_deadline_s": 120.0,
            "enabled": True,
        },
    )
    if not Subscription.objects.filter(
        tenant=tenant, deployment=deployment, revoked_at__isnull=True
    ).exists():
        Subscription.objects.create(tenant=tenant, deployment=deployment)


# --- processes ----------------------------------------------------------------------------


@dataclass
class Stack:
    """The gateway and worker processes of one benchmark; stop() ends every one of them."""

    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _log_files: dict[str, Any] = field(default_factory=dict)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], **popen: Any) -> None:
        if name in self.processes:
            raise RuntimeError(f"{name} is already running")
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed in stop())
        self._log_files[name] = log
        self.processes[name] = subprocess.Popen(  # noqa: S603 (our own interpreter and args)
            argv, cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, **popen
        )

    def start_gateway(self, name: str = "web", *, enforce_capacity: bool = True) -> str:
        """uvicorn on a free port; returns its base URL.

        Not `uvicorn --fd` with a socket bound here: uvicorn takes an inherited descriptor
        for a Unix socket, so asyncio skips TCP_NODELAY on it, and Nagle's algorithm with
        the client's delayed ACK then adds 40 ms to every response.
        """
        port = _free_port()
        env = {**os.environ, "SLUICE_ENFORCE_CAPACITY": "1" if enforce_capacity else "0"}
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "sluice.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--backlog",
            "4096",
        ]
        self._spawn(name, argv, env)
        url = f"http://127.0.0.1:{port}"
        self._wait_healthy(name, url)
        return url

    def _wait_healthy(self, name: str, url: str, timeout: float = 60.0) -> None:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            self._check_alive(name)
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/healthz", timeout=2) as reply,  # noqa: S310
            ):
                if reply.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not answer /healthz within {timeout:.0f} s")

    def start_worker(
        self, slugs: list[str], *, name: str = "worker", threads: int = 0, timeout: float = 300
    ) -> None:
        """runworkers for these deployments; returns once its heartbeat lists all of them."""
        argv = [sys.executable, "manage.py", "runworkers", "--deployments", ",".join(slugs)]
        if threads:
            argv += ["--threads", str(threads)]
        self._spawn(name, argv, dict(os.environ))
        self._wait_serving(name, set(slugs), timeout)

    def _wait_serving(self, name: str, wanted: set[str], timeout: float) -> None:
        from sluice.redisconn import get_redis
        from workers import protocol

        client = get_redis()
        pid = str(self.processes[name].pid)
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            self._check_alive(name)
            for worker_id in client.zrange(protocol.workers_index(), 0, -1):
                beat = client.hgetall(protocol.heartbeat(worker_id.decode()))
                if beat.get(b"pid", b"").decode() != pid:
                    continue
                if wanted <= set(json.loads(beat.get(b"deployments") or b"{}")):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not serve {sorted(wanted)} within {timeout:.0f} s")

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            tail = (self.logs / f"{name}.log").read_text()[-3000:]
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{tail}")

    def stop(self, name: str | None = None, timeout: float = 20.0) -> None:
        """SIGTERM (each finishes what it holds), then SIGKILL for any that hangs."""
        names = [name] if name else list(self.processes)
        for each in names:
            process = self.processes.get(each)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for each in names:
            process = self.processes.pop(each, None)
            if process is None:
                continue
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self._log_files.pop(each).close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def queue_depth(slug: str) -> int:
    """Messages waiting in a deployment's Dramatiq queue (ready, not yet taken)."""
    from django.conf import settings

    from gateway.models import ModelDeployment
    from sluice.redisconn import get_redis

    queue = ModelDeployment(slug=slug).queue_name
    return int(get_redis().llen(f"{settings.DRAMATIQ_NAMESPACE}:{queue}"))


def in_flight(slug: str) -> int:
    """Messages a worker holds (taken, not acknowledged) plus those waiting."""
    from django.conf import settings

    from gateway.models import ModelDeployment
    from sluice.redisconn import get_redis

    queue = ModelDeployment(slug=slug).queue_name
    return int(get_redis().hlen(f"{settings.DRAMATIQ_NAMESPACE}:{queue}.msgs"))


def wait_drained(slug: str, timeout: float = 120.0) -> float:
    """Wait until the deployment's queue holds nothing; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if in_flight(slug) == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"the queue of {slug} did not drain within {timeout:.0f} s")


def call_log_records() -> dict[str, dict[str, str]]:
    """The gateway's call-log records still on the Redis stream, by request id (no flusher
    runs during a benchmark, so every record of the run is there)."""
    from sluice.redisconn import get_redis
    from workers import protocol

    records: dict[str, dict[str, str]] = {}
    for _entry_id, fields in get_redis().xrange(protocol.calllog_stream()):
        record = {k.decode(): v.decode() for k, v in fields.items()}
        records[record["request_id"]] = record
    return records


@dataclass(frozen=True)
class Context:
    """What every benchmark gets: where logs go, the bench tenant and its API key."""

    logs: Path
    tenant: Any
    key: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def worker_counts(slug: str) -> tuple[int, int]:
    """(handled, dropped) of a deployment, summed over the live workers' last heartbeats:
    handled counts every message a worker took, dropped those it skipped because their
    deadline had passed or their client had gone."""
    from sluice.redisconn import get_redis
    from workers import protocol

    client = get_redis()
    handled = dropped = 0
    for worker_id in client.zrange(protocol.workers_index(), 0, -1):
        raw = client.hget(protocol.heartbeat(worker_id.decode()), "deployments")
        status = json.loads(raw or b"{}").get(slug)
        if status:
            handled += int(status.get("handled", 0))
            dropped += int(status.get("dropped", 0))
    return handled, dropped
