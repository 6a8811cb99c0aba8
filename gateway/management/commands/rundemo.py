"""`make demo`: migrate, load demo data, then run every Sluice process on this machine:
the web server, a worker serving the demo models and the call-log flusher.

This process holds the embedded PostgreSQL and Redis (when DATABASE_URL / REDIS_URL are
unset) for as long as it runs; the children it starts join them. Ctrl-C stops the
children, then the embedded servers stop with this process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from gateway.models import ModelDeployment
from sluice.redisconn import get_redis
from tenants.management.commands.bootstrap_demo import Command as Bootstrap
from workers import protocol

# The first start converts the chat model's GGUF once (about half a minute on two cores).
WORKERS_READY_TIMEOUT_S = 300


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Command(BaseCommand):
    help = "Migrate, bootstrap the demo data and run the web server (and friends) until Ctrl-C."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default=os.environ.get("SLUICE_DEMO_HOST", "127.0.0.1"))
        parser.add_argument(
            "--port", type=int, default=int(os.environ.get("SLUICE_DEMO_PORT", "8000"))
        )

    def handle(self, *args, host: str, port: int, **options) -> None:
        if not _port_is_free(host, port):
            raise CommandError(
                f"Port {port} on {host} is taken. Stop what runs there or choose another port: "
                f"make demo SLUICE_DEMO_PORT=8001"
            )
        # Links printed and e-mailed (invitations) point at the port the demo really uses.
        settings.SITE_URL = f"http://{host}:{port}"
        self.stdout.write("Migrating the database ...")
        call_command("migrate", interactive=False, verbosity=0)
        raw_key = Bootstrap(stdout=self.stdout, stderr=self.stderr).run()

        children = self._start(host, port)
        try:
            self._wait_until_up(host, port, children)
            self._print_ready(host, port)
            self._wait_for_workers(children)
            self._print_snippets(host, port, raw_key)
            self._supervise(children)
        finally:
            self._stop(children)

    def _processes(self, host: str, port: int) -> dict[str, list[str]]:
        python = sys.executable
        return {
            "web": [
                python,
                "-m",
                "uvicorn",
                "sluice.asgi:application",
                "--host",
                host,
                "--port",
                str(port),
                "--no-access-log",
            ],
            # One process for both demo models; its threads wait on the micro-batchers.
            "worker": [python, "manage.py", "runworkers", "--deployments", "all"],
            "flusher": [python, "manage.py", "flush_calllogs", "--verbosity", "0"],
        }

    def _start(self, host: str, port: int) -> dict[str, subprocess.Popen]:
        env = {**os.environ, "SITE_URL": f"http://{host}:{port}"}
        children = {}
        for name, argv in self._processes(host, port).items():
            children[name] = subprocess.Popen(argv, env=env, cwd=settings.BASE_DIR)  # noqa: S603
        return children

    def _wait_until_up(self, host: str, port: int, children) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for name, child in children.items():
                if child.poll() is not None:
                    raise CommandError(f"The {name} process exited with code {child.returncode}.")
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise CommandError("The web server did not answer /healthz within 60 s.")

    def _print_ready(self, host: str, port: int) -> None:
        base = f"http://{host}:{port}"
        self.stdout.write(
            self.style.SUCCESS(f"\nSluice is running at {base}/  (Ctrl-C stops everything)\n")
            + f"  Tenant console  {base}/\n"
            + f"  Platform admin  {base}/admin/\n"
            + f"  API docs        {base}/api/docs/\n"
            + f"  Health          {base}/healthz\n"
        )

    def _wait_for_workers(self, children) -> None:
        """Wait until a worker has loaded every enabled deployment's model."""
        wanted = set(ModelDeployment.objects.filter(enabled=True).values_list("slug", flat=True))
        self.stdout.write(f"Loading the models ({', '.join(sorted(wanted))}) ...")
        self.stdout.flush()
        client = get_redis()
        deadline = time.monotonic() + WORKERS_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if children["worker"].poll() is not None:
                raise CommandError(
                    f"The worker exited with code {children['worker'].returncode}; its log is "
                    "above."
                )
            serving = set()
            for worker_id in client.zrange(protocol.workers_index(), 0, -1):
                raw = client.hget(protocol.heartbeat(worker_id.decode()), "deployments")
                if raw:
                    serving |= set(json.loads(raw))
            if wanted <= serving:
                return
            time.sleep(0.5)
        raise CommandError(f"The models did not load within {WORKERS_READY_TIMEOUT_S} s.")

    def _print_snippets(self, host: str, port: int, raw_key: str) -> None:
        base = f"http://{host}:{port}/v1"
        self.stdout.write(
            self.style.SUCCESS("The models are loaded. Try them:\n")
            + f"""
  curl -s {base}/chat/completions \\
    -H "Authorization: Bearer {raw_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "smollm2-135m-instruct", "messages": [{{"role": "user", "content": "Name three rivers."}}], "max_tokens": 40}}'

With the official openai client (paste into a shell in this directory):

.venv/bin/python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="{raw_key}")
print(client.chat.completions.create(model="smollm2-135m-instruct", messages=[{{"role": "user", "content": "Say hello."}}], max_tokens=30).choices[0].message.content)
print(len(client.embeddings.create(model="all-minilm-l6-v2", input="Sluice sheds load honestly.").data[0].embedding), "dimensions")
PY
"""  # noqa: E501 - lines meant to be pasted whole
        )
        self.stdout.flush()

    def _supervise(self, children) -> None:
        stop = {"now": False}

        def on_signal(signum, frame) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["now"]:
            for name, child in children.items():
                if child.poll() is not None:
                    self.stderr.write(f"The {name} process exited with code {child.returncode}.")
                    return
            time.sleep(0.5)

    def _stop(self, children) -> None:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 15
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        self.stdout.write("Stopped.")
