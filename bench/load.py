"""The load generator: a minimal HTTP/1.1 client on asyncio, closed and open loops, stats.

Client and server share two cores, so every microsecond the client spends is taken from
the gateway. httpx.AsyncClient costs several times more CPU per request than this client
(the overhead benchmark measures both and reports it); this one writes a prepared request
and parses only the status line, the headers it needs and a Content-Length or chunked
body, over keep-alive connections from a pool without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client(Protocol):
    async def post(self, path: str, body: dict[str, Any]) -> Reply: ...

    async def close(self) -> None: ...


class RawClient:
    """Keep-alive HTTP/1.1 POSTs of JSON; a new connection whenever none is idle."""

    # uvicorn closes a connection idle for 5 s (timeout_keep_alive); one idle for less than
    # this is reused, an older one is closed here first, so no request races that close.
    MAX_IDLE_S = 2.0

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.fixed_headers = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._all: set[asyncio.StreamWriter] = set()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """(reader, writer, reused)"""
        now = time.monotonic()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if now - since < self.MAX_IDLE_S and not writer.is_closing():
                return reader, writer, True
            self._all.discard(writer)
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        self._all.add(writer)
        return reader, writer, False

    async def post(self, path: str, body: dict[str, Any]) -> Reply:
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.fixed_headers}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        try:
            return await self._exchange(head + payload)
        except _StaleConnection:
            # The server closed a kept-alive connection before reading the request: nothing
            # was processed, so sending it again on a fresh connection is safe.
            return await self._exchange(head + payload, fresh=True)

    async def _exchange(self, request: bytes, *, fresh: bool = False) -> Reply:
        if fresh:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
            self._all.add(writer)
            reused = False
        else:
            reader, writer, reused = await self._connect()
        reusable = False
        try:
            writer.write(request)
            try:
                reply = await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                partial = getattr(exc, "partial", b"")
                if reused and not partial:
                    raise _StaleConnection from exc
                raise
            reusable = reply.headers.get("connection", "").lower() != "close"
            return reply
        finally:
            # A cancelled request (the benchmark's cut-off) leaves its connection mid-reply:
            # close it, which the server sees as the client leaving.
            if reusable:
                self._idle.append((reader, writer, time.monotonic()))
            else:
                self._all.discard(writer)
                writer.close()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Reply:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            pieces = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                pieces.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(pieces)
        else:
            body = await reader.read()
            headers["connection"] = "close"
        return Reply(status, headers, body)

    async def close(self) -> None:
        for writer in list(self._all):
            writer.close()
        self._all.clear()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection was closed by the server before it answered anything."""


class HttpxClient:
    """The same interface on httpx.AsyncClient, to measure what the raw client saves."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            timeout=httpx.Timeout(300.0),
        )

    async def post(self, path: str, body: dict[str, Any]) -> Reply:
        reply = await self.client.post(path, json=body)
        return Reply(
            reply.status_code, {k.lower(): v for k, v in reply.headers.items()}, reply.content
        )

    async def close(self) -> None:
        await self.client.aclose()


# --- results ----------------------------------------------------------------------------


@dataclass
class Sample:
    """One request: when it was due, sent and answered (monotonic seconds), and how."""

    due: float
    sent: float
    done: float | None = None
    status: int = 0  # 0: no answer (cut off, or a connection error)
    request_id: str = ""
    retry_after_ms: float | None = None
    error: str = ""
    retry: bool = False  # a retry after the Retry-After of an earlier refusal
    cut_at: float | None = None  # when the benchmark gave up waiting for its answer

    @property
    def latency_ms(self) -> float:
        assert self.done is not None
        return (self.done - self.due) * 1000

    @property
    def age_ms(self) -> float:
        """Its latency, or for a request cut off, its age then (a lower bound)."""
        end = self.done if self.done is not None else self.cut_at
        assert end is not None
        return (end - self.due) * 1000

    @property
    def lag_ms(self) -> float:
        return (self.sent - self.due) * 1000


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "mean": float(np.mean(values)) if values else math.nan,
    }


async def _send(client: Client, path: str, body: dict[str, Any], sample: Sample) -> Sample:
    try:
        reply = await client.post(path, body)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        sample.done = time.monotonic()
        sample.error = type(exc).__name__
        return sample
    sample.done = time.monotonic()
    sample.status = reply.status
    sample.request_id = reply.headers.get("x-request-id", "")
    if "retry-after-ms" in reply.headers:
        sample.retry_after_ms = float(reply.headers["retry-after-ms"])
    elif "retry-after" in reply.headers:
        sample.retry_after_ms = float(reply.headers["retry-after"]) * 1000
    if reply.status != 200:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            sample.error = reply.json()["error"]["code"]
    return sample


async def closed_loop(
    client: Client,
    path: str,
    body: Callable[[], dict[str, Any]],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
) -> list[Sample]:
    """`concurrency` clients, each sending its next request when the last one is answered.

    Samples from the first warmup_s are dropped (connections opening, caches filling).
    """
    samples: list[Sample] = []
    start = time.monotonic()
    keep_from = start + warmup_s
    stop_at = keep_from + duration_s

    async def one_client() -> None:
        while time.monotonic() < stop_at:
            now = time.monotonic()
            sample = await _send(client, path, body(), Sample(due=now, sent=now))
            if sample.sent >= keep_from:
                samples.append(sample)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return samples


@dataclass
class OpenLoopResult:
    samples: list[Sample]
    retries: list[Sample]
    started: float
    window_s: float
    cut_off: int  # requests still unanswered when the benchmark stopped waiting
    cut_off_ages_ms: list[float] = field(default_factory=list)


async def open_loop(
    client: Client,
    path: str,
    body: Callable[[], dict[str, Any]],
    *,
    rate: float,
    duration_s: float,
    grace_s: float,
    seed: int,
    retry_share: float = 0.0,
    max_retries: int = 0,
) -> OpenLoopResult:
    """Poisson arrivals at `rate` per second for `duration_s`, whatever the answers.

    Latency is measured from when a request was due, not when the client got round to it,
    so a client falling behind shows up in the numbers instead of hiding them. A share of
    refusals (`retry_share`, at most `max_retries`) waits the Retry-After it was given and
    retries once, if that retry falls inside the window. Requests unanswered `grace_s`
    after the last arrival are cancelled (their connections closed) and reported as cut
    off, with their age at that moment.
    """
    rng = random.Random(seed)
    loop_start = time.monotonic()
    arrivals: list[float] = []
    at = loop_start + 0.05
    while True:
        at += rng.expovariate(rate)
        if at >= loop_start + 0.05 + duration_s:
            break
        arrivals.append(at)
    end_of_arrivals = loop_start + 0.05 + duration_s
    samples: list[Sample] = []
    retries: list[Sample] = []
    tasks: set[asyncio.Task] = set()
    pending: dict[asyncio.Task, Sample] = {}

    async def with_retry(sample: Sample) -> None:
        await _send(client, path, body(), sample)
        if (
            sample.status in (429, 503)
            and sample.retry_after_ms is not None
            and len(retries) < max_retries
            # Only retries that land inside the window: after it the load is gone.
            and time.monotonic() + sample.retry_after_ms / 1000 < end_of_arrivals
            and rng.random() < retry_share
        ):
            await asyncio.sleep(sample.retry_after_ms / 1000)
            now = time.monotonic()
            again = Sample(due=now, sent=now, retry=True)
            retries.append(again)
            await _send(client, path, body(), again)

    for due in arrivals:
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sample = Sample(due=due, sent=time.monotonic())
        samples.append(sample)
        task = asyncio.create_task(with_retry(sample))
        tasks.add(task)
        pending[task] = sample
        task.add_done_callback(lambda t: (tasks.discard(t), pending.pop(t, None)))
    if tasks:
        wait_s = max(0.0, end_of_arrivals + grace_s - time.monotonic())
        await asyncio.wait(set(tasks), timeout=wait_s)
    cut_now = time.monotonic()
    # Only first attempts that have no answer are "cut off"; a retry in its sleep is not.
    cut = [sample for sample in pending.values() if sample.done is None]
    for sample in cut:
        sample.cut_at = cut_now
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return OpenLoopResult(
        samples=samples,
        retries=retries,
        started=loop_start + 0.05,
        window_s=duration_s,
        cut_off=len(cut),
        cut_off_ages_ms=[(cut_now - sample.due) * 1000 for sample in cut],
    )


def run(coro_factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run one load phase on a fresh event loop (uvloop when installed, as uvicorn uses)."""
    try:
        import uvloop

        return uvloop.run(coro_factory())
    except ImportError:
        return asyncio.run(coro_factory())
