"""Call logs travel from the gateway to PostgreSQL through a Redis stream.

Everything here is real: the records go through Redis, the flusher writes to PostgreSQL,
and a PostgreSQL outage is a real one as the flusher sees it: the server drops its
connection and new ones are refused (its connection settings point at a closed port).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import StringIO
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, connections
from django.test.utils import CaptureQueriesContext

from analytics import calllog, flusher
from analytics.calllog import CallRecord
from analytics.models import CallLog
from sluice.redisconn import get_async_redis, get_redis
from workers import protocol

T = TypeVar("T")


def record(request_id: str, **changes: object) -> CallRecord:
    defaults = CallRecord(
        request_id=request_id,
        tenant_id=1,
        api_key_id=2,
        deployment_id=3,
        prompt_api_version_id=None,
        endpoint="chat.completions",
        status_code=200,
        error_code="",
        prompt_tokens=12,
        completion_tokens=34,
        queue_ms=1.5,
        inference_ms=20.25,
        total_ms=23.125,
        created_at=1_750_000_000.123456,
    )
    return CallRecord(**{**defaults, **changes})


def wait_for(condition: Callable[[], T], *, timeout: float = 30.0, what: str = "it") -> T:
    """Poll until condition() is truthy and return its value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stream_length() -> int:
    return get_redis().xlen(protocol.calllog_stream())


def pending(consumer: str | None = None) -> int:
    """Entries delivered to flushers (or to `consumer`) and not yet acknowledged."""
    try:
        summary = get_redis().xpending(protocol.calllog_stream(), flusher.GROUP)
    except redis.ResponseError:  # no group yet: no flusher has read anything
        return 0
    if consumer is None:
        return summary["pending"]
    return sum(c["pending"] for c in summary["consumers"] if c["name"].decode() == consumer)


def request_ids() -> list[str]:
    return sorted(CallLog.objects.values_list("request_id", flat=True))


def closed_port() -> int:
    """A local port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def _empty_stream():
    client = get_redis()
    client.delete(protocol.calllog_stream())
    yield
    client.delete(protocol.calllog_stream())


class Outage:
    """Takes PostgreSQL away from every connection but the test's own, and gives it back.

    down(): PostgreSQL drops every other connection to the test database, and new ones
    go to a port where nothing listens; the test's own connection, opened before, stays.
    So the flusher runs in a thread of its own (as in production), whose connection is
    made from the same settings.
    """

    def __init__(self) -> None:
        # Shared by the "default" connection of every thread.
        self.settings = connections["default"].settings_dict
        self.saved = {name: self.settings[name] for name in ("PORT", "CONN_MAX_AGE")}
        # Kept open between batches, so that an outage hits a live connection.
        self.settings["CONN_MAX_AGE"] = None

    def down(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        self.settings["PORT"] = str(closed_port())

    def up(self) -> None:
        self.settings["PORT"] = self.saved["PORT"]

    def restore(self) -> None:
        self.settings.update(self.saved)


@pytest.fixture
def outage(transactional_db):
    # Transactional: the flusher's thread has a connection of its own, which must see
    # (and commit) what the test's connection sees.
    switch = Outage()
    yield switch
    switch.restore()


class FlusherThread:
    """A flusher in a thread of its own, with its own database connection, run on demand."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flusher")

    def call(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        return self._pool.submit(function, *args, **kwargs).result(timeout=60)

    def flush_once(self, **kwargs: object) -> int:
        return self.call(flusher.flush_once, **kwargs)

    def close(self) -> None:
        self.call(connections.close_all)
        self._pool.shutdown()


@pytest.fixture
def flusher_thread(transactional_db):
    thread = FlusherThread()
    yield thread
    thread.close()


class AppendTestCase:
    def test_it_appends_one_entry_that_decodes_to_the_same_record(self):
        calllog.append_sync(record("req_a"))

        [(_, fields)] = get_redis().xrange(protocol.calllog_stream())
        assert calllog.decode(fields) == record("req_a")

    def test_it_writes_none_as_an_empty_string_and_numbers_as_decimals(self):
        calllog.append_sync(record("req_a", api_key_id=None, queue_ms=None))

        [(_, fields)] = get_redis().xrange(protocol.calllog_stream())
        assert fields[b"api_key_id"] == b""
        assert fields[b"queue_ms"] == b""
        assert fields[b"tenant_id"] == b"1"
        assert fields[b"created_at"] == b"1750000000.123456"

    def test_it_appends_from_async_code(self):
        async def append_and_close() -> None:
            await calllog.append(record("req_async"))
            await get_async_redis().aclose(close_connection_pool=True)

        asyncio.run(append_and_close())

        [(_, fields)] = get_redis().xrange(protocol.calllog_stream())
        assert calllog.decode(fields)["request_id"] == "req_async"

    def test_it_trims_the_stream_to_about_its_cap(self, monkeypatch):
        monkeypatch.setattr(calllog, "MAX_STREAM_LENGTH", 100)

        for index in range(1000):
            calllog.append_sync(record(f"req_{index}"))

        # Approximate trimming removes whole nodes only, so a little more may remain.
        assert 100 <= stream_length() < 1000

    def test_it_logs_and_swallows_a_redis_error(self, settings, caplog):
        settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
        get_redis.cache_clear()
        try:
            with caplog.at_level(logging.WARNING, logger="analytics.calllog"):
                calllog.append_sync(record("req_sync_lost"))
                asyncio.run(calllog.append(record("req_async_lost")))
        finally:
            get_redis.cache_clear()

        lost = [r.getMessage() for r in caplog.records if r.name == "analytics.calllog"]
        assert len(lost) == 2
        assert "req_sync_lost" in lost[0]
        assert "req_async_lost" in lost[1]


class FlushTestCase:
    def test_it_writes_appended_records_as_rows_in_one_flush(self, db):
        calllog.append_sync(record("req_a"))
        calllog.append_sync(record("req_b", api_key_id=None, status_code=503, queue_ms=None))

        assert flusher.flush_once(consumer="f1", block_ms=0) == 2

        assert request_ids() == ["req_a", "req_b"]
        row = CallLog.objects.get(request_id="req_b")
        assert (row.tenant_id, row.api_key_id, row.deployment_id) == (1, None, 3)
        assert (row.status_code, row.queue_ms, row.inference_ms, row.total_ms) == (
            503,
            None,
            20.25,
            23.125,
        )
        assert row.created_at.timestamp() == pytest.approx(1_750_000_000.123456)

    def test_it_acknowledges_and_deletes_what_it_wrote(self, db):
        for index in range(3):
            calllog.append_sync(record(f"req_{index}"))

        flusher.flush_once(consumer="f1", block_ms=0)

        assert stream_length() == 0
        assert pending() == 0
        assert flusher.flush_once(consumer="f1", block_ms=0) == 0

    def test_it_flushes_in_batches_of_count(self, db):
        for index in range(5):
            calllog.append_sync(record(f"req_{index}"))

        assert flusher.flush_once(consumer="f1", count=2, block_ms=0) == 2
        assert CallLog.objects.count() == 2
        assert stream_length() == 3

    def test_it_keeps_one_row_when_a_request_id_is_replayed(self, db, caplog):
        with caplog.at_level(logging.WARNING, logger="analytics.flusher"):
            calllog.append_sync(record("req_twice", status_code=200))
            calllog.append_sync(record("req_twice", status_code=200))
            with CaptureQueriesContext(connection) as queries:
                flusher.flush_once(consumer="f1", block_ms=0)
            calllog.append_sync(record("req_twice", status_code=500))
            flusher.flush_once(consumer="f1", block_ms=0)

        # One statement for the batch, duplicates and all.
        assert [q["sql"].split()[0] for q in queries].count("INSERT") == 1

        assert request_ids() == ["req_twice"]
        # The first write stands; a replay never rewrites it.
        assert CallLog.objects.get().status_code == 200
        assert stream_length() == 0
        # Delivery is at least once, so a replay is normal, not a refused row.
        assert not caplog.records

    def test_it_drops_malformed_entries_without_blocking_the_others(self, db, caplog):
        client = get_redis()
        stream = protocol.calllog_stream()
        calllog.append_sync(record("req_good_1"))
        client.xadd(stream, {"request_id": "req_missing_fields"})
        client.xadd(stream, {**calllog.encode(record("req_bad_status")), "status_code": "abc"})
        client.xadd(stream, calllog.encode(record("x" * 65)))
        client.xadd(stream, {**calllog.encode(record("req_bad_time")), "created_at": "1e300"})
        client.xadd(stream, {"something": "else"})
        calllog.append_sync(record("req_good_2"))

        with caplog.at_level(logging.WARNING, logger="analytics.flusher"):
            assert flusher.flush_once(consumer="f1", block_ms=0) == 7

        assert request_ids() == ["req_good_1", "req_good_2"]
        assert stream_length() == 0
        assert pending() == 0
        assert sum("malformed" in r.getMessage() for r in caplog.records) == 5

    def test_it_drops_a_row_the_database_refuses_and_writes_the_rest(self, db, caplog):
        # PostgreSQL text cannot hold NUL; the decoder lets it through, the insert fails.
        calllog.append_sync(record("req_good_1"))
        calllog.append_sync(record("req_nul", error_code="bad\x00code"))
        calllog.append_sync(record("req_good_2"))

        with caplog.at_level(logging.WARNING, logger="analytics.flusher"):
            assert flusher.flush_once(consumer="f1", block_ms=0) == 3

        assert request_ids() == ["req_good_1", "req_good_2"]
        assert pending() == 0
        assert any("req_nul" in r.getMessage() for r in caplog.records)

    def test_it_flushes_records_appended_before_any_flusher_ran(self, db):
        calllog.append_sync(record("req_early"))
        assert not get_redis().xinfo_groups(protocol.calllog_stream())

        flusher.flush_once(consumer="f1", block_ms=0)

        assert request_ids() == ["req_early"]

    def test_it_recreates_its_group_when_redis_loses_the_stream(self, db):
        calllog.append_sync(record("req_before"))
        flusher.flush_once(consumer="f1", block_ms=0)
        get_redis().delete(protocol.calllog_stream())

        calllog.append_sync(record("req_after"))
        assert flusher.flush_once(consumer="f1", block_ms=0) == 1

        assert request_ids() == ["req_after", "req_before"]

    def test_it_takes_entries_that_arrive_while_it_waits(self, transactional_db):
        flusher.ensure_group()
        result: list[int] = []

        def read() -> None:
            try:
                result.append(flusher.flush_once(consumer="f1", block_ms=20_000))
            finally:
                connections.close_all()  # this thread's own connections

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: _consumer_exists("f1"), what="the reader to start")
        calllog.append_sync(record("req_late"))
        reader.join(timeout=30)

        assert result == [1]
        assert request_ids() == ["req_late"]

    def test_two_flushers_at_once_write_every_record_once(self, transactional_db):
        for index in range(300):
            calllog.append_sync(record(f"req_{index:03}"))
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=flusher.run,
                kwargs={"consumer": name, "stop_event": stop, "count": 25, "block_ms": 100},
            )
            for name in ("f1", "f2")
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: stream_length() == 0 and pending() == 0, what="an empty stream")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

        assert request_ids() == [f"req_{index:03}" for index in range(300)]


def _consumer_exists(name: str) -> bool:
    consumers = get_redis().xinfo_consumers(protocol.calllog_stream(), flusher.GROUP)
    return any(c["name"].decode() == name for c in consumers)


class PostgresOutageTestCase:
    def test_it_loses_nothing_and_writes_each_record_once_after_recovery(
        self, outage, flusher_thread
    ):
        for index in range(3):
            calllog.append_sync(record(f"req_before_{index}"))
        assert flusher_thread.flush_once(consumer="f1", block_ms=0) == 3

        outage.down()
        for index in range(5):
            calllog.append_sync(record(f"req_during_{index}"))
        for _attempt in range(2):  # the connection it held is gone, and no new one comes
            with pytest.raises(DatabaseError):
                flusher_thread.flush_once(consumer="f1", block_ms=0)

        assert CallLog.objects.count() == 3
        assert pending("f1") == 5
        assert stream_length() == 5

        outage.up()
        assert flusher_thread.flush_once(consumer="f1", block_ms=0) == 5

        assert request_ids() == sorted(
            [f"req_before_{i}" for i in range(3)] + [f"req_during_{i}" for i in range(5)]
        )
        assert pending() == 0
        assert stream_length() == 0

    def test_its_loop_retries_through_an_outage(self, outage):
        outage.down()
        for index in range(5):
            calllog.append_sync(record(f"req_{index}"))
        stop = threading.Event()
        loop = threading.Thread(
            target=flusher.run,
            kwargs={"consumer": "f1", "stop_event": stop, "block_ms": 100},
        )
        loop.start()
        try:
            wait_for(lambda: pending("f1") == 5, what="the flusher to take the batch")
            assert CallLog.objects.count() == 0

            outage.up()
            wait_for(lambda: CallLog.objects.count() == 5, what="the batch to be written")
            wait_for(lambda: stream_length() == 0 and pending() == 0, what="an empty stream")
        finally:
            stop.set()
            loop.join(timeout=60)

        assert not loop.is_alive()
        assert request_ids() == [f"req_{index}" for index in range(5)]


class RedisOutageTestCase:
    def test_its_loop_retries_while_redis_is_away(self, transactional_db, settings, caplog):
        reachable = settings.REDIS_URL
        settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
        get_redis.cache_clear()
        stop = threading.Event()
        loop = threading.Thread(
            target=flusher.run, kwargs={"consumer": "f1", "stop_event": stop, "block_ms": 100}
        )
        try:
            with caplog.at_level(logging.WARNING, logger="analytics.flusher"):
                loop.start()
                wait_for(lambda: caplog.records, what="the flusher to fail")

            settings.REDIS_URL = reachable
            get_redis.cache_clear()
            calllog.append_sync(record("req_after"))
            wait_for(lambda: CallLog.objects.exists(), what="the record to be written")
        finally:
            stop.set()
            loop.join(timeout=60)
            settings.REDIS_URL = reachable
            get_redis.cache_clear()

        assert "retrying" in caplog.records[0].getMessage()
        assert request_ids() == ["req_after"]


class DeadFlusherTestCase:
    @staticmethod
    def _take_and_die(consumer: str) -> None:
        """What a flusher that crashed after reading a batch leaves: entries pending."""
        flusher.ensure_group()
        get_redis().xreadgroup(flusher.GROUP, consumer, {protocol.calllog_stream(): ">"}, count=100)

    def test_it_claims_the_pending_entries_of_a_dead_flusher(self, db):
        for index in range(4):
            calllog.append_sync(record(f"req_{index}"))
        self._take_and_die("dead")
        assert pending("dead") == 4

        handled = wait_for(
            lambda: flusher.flush_once(consumer="alive", block_ms=0, claim_idle_ms=50),
            what="the entries to idle past claim_idle_ms",
        )

        assert handled == 4
        assert request_ids() == [f"req_{index}" for index in range(4)]
        assert pending() == 0
        assert stream_length() == 0

    def test_it_leaves_a_live_flushers_entries_alone(self, db):
        for index in range(4):
            calllog.append_sync(record(f"req_{index}"))
        self._take_and_die("busy")

        assert flusher.flush_once(consumer="other", block_ms=0) == 0

        assert pending("busy") == 4
        assert CallLog.objects.count() == 0


class FlushCommandTestCase:
    def test_it_flushes_everything_waiting_with_once(self, db):
        for index in range(7):
            calllog.append_sync(record(f"req_{index}"))
        out = StringIO()

        call_command("flush_calllogs", "--once", "--batch", "3", stdout=out)

        assert CallLog.objects.count() == 7
        assert out.getvalue().splitlines() == [
            "flushed 3 call logs",
            "flushed 3 call logs",
            "flushed 1 call logs",
        ]

    def test_it_fails_with_once_while_the_database_is_down(self, outage, flusher_thread):
        calllog.append_sync(record("req_a"))
        outage.down()

        with pytest.raises(CommandError, match="not flushed"):
            flusher_thread.call(call_command, "flush_calllogs", "--once")

        assert pending() == 1
        assert CallLog.objects.count() == 0

    def test_it_runs_until_sigterm(self, transactional_db):
        database = urlsplit(settings.DATABASE_URL)
        env = {
            **os.environ,
            "DATABASE_URL": urlunsplit(
                database._replace(path="/" + connection.settings_dict["NAME"])
            ),
            "REDIS_URL": settings.REDIS_URL,
            "SLUICE_REDIS_PREFIX": settings.REDIS_PREFIX,
        }
        process = subprocess.Popen(
            [sys.executable, "manage.py", "flush_calllogs", "--batch", "2"],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            for index in range(3):
                calllog.append_sync(record(f"req_{index}"))
            wait_for(lambda: CallLog.objects.count() == 3, what="the command to flush")
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

        assert process.returncode == 0, output
        assert "flushed" in output
        assert stream_length() == 0


class FlushOnceUnderTrafficTestCase:
    def test_once_stops_at_what_was_waiting_when_it_started(self, db, monkeypatch):
        for index in range(5):
            calllog.append_sync(record(f"req_{index}"))
        calls = []

        def endless(**kwargs):  # traffic never lets the stream run dry
            calls.append(kwargs)
            if len(calls) > 100:
                raise AssertionError("--once did not stop")
            return kwargs["count"]

        monkeypatch.setattr(flusher, "flush_once", endless)

        call_command("flush_calllogs", "--once", "--batch", "2", stdout=StringIO())

        assert len(calls) <= 5 // 2 + 2
