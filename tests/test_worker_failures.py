"""Workers that fail: transient errors retried, poison messages dead-lettered, a worker
killed with SIGKILL mid-request. The client always gets a clear answer, never a hang,
and capacity always comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from urllib.parse import quote

import openai
import pytest
from django.conf import settings
from django.db import connection

from sluice.redisconn import get_redis
from workers import protocol

from .conftest import fixed_deployment, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(dataplane, alpha, alice, issue_key):
    return openai.OpenAI(base_url=f"{dataplane}/v1", api_key=issue_key(alpha, alice), max_retries=0)


def leases(slug: str) -> int:
    return get_redis().zcard(protocol.leases(slug))


class RetryTestCase:
    def test_a_transient_failure_is_retried_and_succeeds(
        self, dataplane, alpha, subscribe, client, start_worker
    ):
        deployment = fixed_deployment("flaky", config={"transient_on": "FLAKY"})
        subscribe(alpha, deployment)
        start_worker(deployment)
        reply = client.chat.completions.create(
            model="flaky", messages=[{"role": "user", "content": "FLAKY please"}]
        )
        assert reply.choices[0].message.content == "echo: FLAKY please"

    def test_a_poison_message_is_dead_lettered_and_the_client_told(
        self, dataplane, alpha, subscribe, client, start_worker
    ):
        deployment = fixed_deployment("poisoned", config={"fail_on": "POISON"})
        subscribe(alpha, deployment)
        start_worker(deployment)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(
                model="poisoned", messages=[{"role": "user", "content": "POISON"}]
            )
        assert failed.value.code == "worker_error"
        assert "POISON" in failed.value.message
        dead = f"{settings.DRAMATIQ_NAMESPACE}:{deployment.queue_name}.XQ"
        wait_until(lambda: get_redis().zcard(dead) == 1, what="the message to be dead-lettered")
        assert leases("poisoned") == 0
        # The worker goes on serving.
        assert client.chat.completions.create(model="poisoned", messages=MESSAGES).choices


def _database_url() -> str:
    """The test database, as a URL a subprocess can use."""
    config = connection.settings_dict
    auth = quote(config["USER"] or "")
    if config["PASSWORD"]:
        auth += ":" + quote(config["PASSWORD"])
    host = config["HOST"] or ""
    name = quote(config["NAME"])
    if host.startswith("/"):
        return f"postgresql://{auth}@/{name}?host={quote(host)}"
    return f"postgresql://{auth}@{host}:{config['PORT'] or 5432}/{name}"


def _worker_process(slug: str, *options: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "SLUICE_REDIS_PREFIX": settings.REDIS_PREFIX,
    }
    return subprocess.Popen(  # noqa: S603 - our own manage.py
        [
            sys.executable,
            "manage.py",
            "runworkers",
            "--deployments",
            slug,
            "--threads",
            "2",
            *options,
        ],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _busy_workers() -> int:
    client = get_redis()
    busy = 0
    for worker_id in client.zrange(protocol.workers_index(), 0, -1):
        value = client.hget(protocol.heartbeat(worker_id.decode()), "busy")
        busy += int(value or 0)
    return busy


class KilledWorkerTestCase:
    def test_a_sigkilled_worker_costs_one_request_a_clear_error_and_nothing_more(
        self, dataplane, alpha, subscribe, client, start_worker
    ):
        deployment = fixed_deployment("mortal", capacity=1, config={"latency_ms": 10_000})
        subscribe(alpha, deployment)
        worker = _worker_process("mortal")
        try:
            wait_until(
                lambda: get_redis().zcard(protocol.workers_index()) >= 1,
                timeout=60,
                what="the worker process to start",
            )
            outcome: dict = {}

            def doomed() -> None:
                try:
                    client.with_options(
                        default_headers={"X-Request-Timeout": "3"}
                    ).chat.completions.create(model="mortal", messages=MESSAGES)
                except openai.APIStatusError as error:
                    outcome["error"] = error

            thread = threading.Thread(target=doomed, daemon=True)
            thread.start()
            wait_until(lambda: _busy_workers() == 1, timeout=10, what="the worker to be busy")
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            thread.join(timeout=10)
        finally:
            if worker.poll() is None:
                worker.kill()
        # The client heard, by its deadline, that the request did not finish ...
        assert outcome["error"].status_code == 504
        assert outcome["error"].code == "deadline_exceeded"
        # ... the capacity the dead worker held is free again ...
        assert leases("mortal") == 0
        # ... and a new worker serves the next request.
        deployment.backend_config = {"latency_ms": 5}
        deployment.save(update_fields=["backend_config"])
        start_worker(deployment)
        reply = client.chat.completions.create(model="mortal", messages=MESSAGES)
        assert reply.choices[0].message.content == "echo: hi"


class StoppingTestCase:
    def test_a_worker_that_stops_mid_request_tells_its_client_at_once(
        self, dataplane, alpha, subscribe, client, start_worker
    ):
        deployment = fixed_deployment("slow-stop", config={"latency_ms": 20_000})
        subscribe(alpha, deployment)
        service = start_worker(deployment)
        outcome: dict[str, BaseException] = {}

        def ask() -> None:
            try:
                client.with_options(timeout=60).chat.completions.create(
                    model="slow-stop", messages=MESSAGES
                )
            except openai.APIStatusError as error:
                outcome["error"] = error

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        runtime = service.runtimes["slow-stop"]
        wait_until(lambda: runtime.busy == 1, what="the worker to take the request")

        service.stop(timeout_ms=200)  # a rolling deploy: SIGTERM, and no time to finish

        asking.join(timeout=15)  # long before the 20 s answer or the 60 s deadline
        error = outcome["error"]
        assert error.status_code == 503
        assert error.code == "worker_unavailable"
        assert leases("slow-stop") == 0

    def test_a_stream_redelivered_after_a_crash_is_not_replayed(
        self, dataplane, alpha, subscribe, start_worker
    ):
        deployment = fixed_deployment("replay")
        subscribe(alpha, deployment)
        runtime = start_worker(deployment).runtimes["replay"]
        message = {
            "request_id": "req_replayed",
            "deployment": "replay",
            "task": "chat",
            "tenant_id": alpha.id,
            "deadline_ms": protocol.now_ms() + 30_000,
            "enqueued_ms": protocol.now_ms(),
            "stream": True,
            "payload": {"messages": MESSAGES},
            "ms_per_token": 0,
        }
        stream = protocol.reply_stream("req_replayed")
        # The first run, on a worker that then died, had sent part of its answer.
        get_redis().xadd(stream, protocol.encode_event("chunk", {"text": "echo:"}))

        runtime.handle(message)

        events = [protocol.decode_event(fields) for _, fields in get_redis().xrange(stream)]
        assert [event["type"] for event in events] == ["chunk", "error"]
        assert events[-1]["data"]["code"] == "worker_unavailable"


class SupervisorTestCase:
    def test_a_crashed_child_makes_the_supervisor_fail_not_succeed(
        self, transactional_db, start_worker
    ):
        import psutil

        fixed_deployment("supervised")
        supervisor = _worker_process("supervised", "--processes", "2")
        try:
            wait_until(
                lambda: len(psutil.Process(supervisor.pid).children()) == 2,
                timeout=30,
                what="two worker processes",
            )
            psutil.Process(supervisor.pid).children()[0].kill()  # out of memory, say
            # A restart-on-failure policy must see a failure.
            assert supervisor.wait(timeout=60) != 0
        finally:
            if supervisor.poll() is None:
                supervisor.kill()


class BatcherWaitTestCase:
    def test_a_thread_writing_its_answer_is_not_waited_for(
        self, dataplane, alpha, subscribe, client, start_worker, monkeypatch
    ):
        # The batcher waits for requests the worker has taken but not yet batched; one
        # whose batch has answered it (its thread now writing "done") must not count.
        from workers.runtime import ReplyWriter

        deployment = fixed_deployment("counted")
        subscribe(alpha, deployment)
        runtime = start_worker(deployment).runtimes["counted"]
        seen: list[int] = []
        original = ReplyWriter._add

        def noting(writer, kind, data, pipe=None):
            if kind == "done":
                seen.append(runtime.batcher.in_hand())
            return original(writer, kind, data, pipe)

        monkeypatch.setattr(ReplyWriter, "_add", noting)
        client.chat.completions.create(model="counted", messages=MESSAGES)
        assert seen == [0]
