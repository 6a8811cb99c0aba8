"""python manage.py runworkers --deployments a,b [--processes N] [--threads M]

Starts Dramatiq worker processes for those deployments' queues. Each process loads its
deployments' models once (GPU when torch sees one), registers the inference actor per
queue, beats its heartbeat and serves until SIGTERM / Ctrl-C, finishing what it holds.
Run one process per GPU; threads only wait on the micro-batcher, so they are cheap.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from gateway.models import ModelDeployment
from workers.broker import get_broker
from workers.runtime import DeploymentSpec
from workers.service import WorkerService, default_threads

logger = logging.getLogger("workers")


class Command(BaseCommand):
    help = "Run Dramatiq workers that serve the named model deployments."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--deployments",
            required=True,
            help="Comma-separated deployment slugs (the `model` names), or 'all'.",
        )
        parser.add_argument("--processes", type=int, default=1)
        parser.add_argument(
            "--threads",
            type=int,
            default=0,
            help="Worker threads per process (default: twice the largest max_batch_size, "
            "at least 8).",
        )

    def handle(self, *args, deployments: str, processes: int, threads: int, **options) -> None:
        specs = self._specs(deployments)
        if processes < 1:
            raise CommandError("--processes must be at least 1")
        threads = threads or default_threads(specs)
        if processes > 1:
            self._supervise(processes, deployments, threads)
            return
        self._serve(specs, threads)

    def _specs(self, deployments: str) -> list[DeploymentSpec]:
        queryset = ModelDeployment.objects.filter(enabled=True)
        if deployments.strip() != "all":
            wanted = [slug.strip() for slug in deployments.split(",") if slug.strip()]
            queryset = queryset.filter(slug__in=wanted)
            found = set(queryset.values_list("slug", flat=True))
            missing = [slug for slug in wanted if slug not in found]
            if missing:
                raise CommandError(
                    f"No enabled deployment named {', '.join(missing)}. "
                    f"Known: {', '.join(ModelDeployment.objects.values_list('slug', flat=True))}"
                )
        specs = [DeploymentSpec.from_model(deployment) for deployment in queryset]
        if not specs:
            raise CommandError("No enabled deployments to serve.")
        return specs

    def _serve(self, specs: list[DeploymentSpec], threads: int) -> None:
        service = WorkerService(specs, threads=threads)
        try:
            service.start()
        except (ImportError, TypeError) as exc:
            raise CommandError(f"Cannot serve these deployments: {exc}") from exc
        self.stdout.write(
            f"worker {service.worker_id} serving {', '.join(service.runtimes)} "
            f"with {service.threads} threads"
        )
        self.stdout.flush()
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stopping.set())
        signal.signal(signal.SIGINT, lambda *a: stopping.set())
        while not stopping.wait(0.5):
            pass
        self.stdout.write("stopping: finishing the messages in hand")
        service.stop()
        get_broker().close()

    def _supervise(self, processes: int, deployments: str, threads: int) -> None:
        argv = [
            sys.executable,
            "manage.py",
            "runworkers",
            "--deployments",
            deployments,
            "--processes",
            "1",
            "--threads",
            str(threads),
        ]
        children = [
            subprocess.Popen(argv, cwd=settings.BASE_DIR, env=os.environ.copy())  # noqa: S603
            for _ in range(processes)
        ]
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stopping.set())
        signal.signal(signal.SIGINT, lambda *a: stopping.set())
        while not stopping.is_set() and all(child.poll() is None for child in children):
            time.sleep(0.5)
        crashed = [child for child in children if child.poll() is not None]
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait()
        if not stopping.is_set():
            # A child died on its own (out of memory, say): fail, so that a supervisor with
            # a restart-on-failure policy brings the workers back.
            child = crashed[0]
            raise CommandError(
                f"worker process {child.pid} exited with status {child.returncode}; "
                "stopped the others"
            )
