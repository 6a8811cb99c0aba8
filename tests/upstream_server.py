"""A small OpenAI-compatible HTTP server for tests: real sockets, real HTTP, scripted faults.

    with UpstreamServer() as upstream:
        upstream.fail(2, status=503, retry_after=1)   # the next two requests get a 503
        backend = OpenAIUpstreamBackend({"base_url": upstream.base_url, ...})
        ...
        assert len(upstream.requests) == 3

It serves POST /v1/chat/completions (plain, and `stream: true` as Server-Sent Events in
OpenAI's chunk format ending with `data: [DONE]`), /v1/completions and /v1/embeddings,
each with a usage block. Answers are computed from the input: a chat or completion
answers "echo:" followed by the words of the last message (or prompt), one word per
token; an embedding is a short vector derived from the text. HTTP/1.1 with keep-alive, so
clients pool connections as they would against a real upstream.

Faults are queued and each is used by one request, in order; `fail_always` sets one for
every request until `heal()`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

MODEL = "upstream-test-model"


@dataclass(frozen=True)
class Fault:
    # status: answer `status` with an OpenAI error body; hang: say nothing for `seconds`,
    # then close; drop: close the connection without answering; drop_stream: stream
    # `after_chunks` content chunks, then close mid-stream.
    kind: Literal["status", "hang", "drop", "drop_stream"]
    status: int = 503
    message: str = "The upstream is overloaded."
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 30.0
    after_chunks: int = 0


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float  # time.monotonic() on arrival
    client_port: int  # the same port twice: the client kept its connection alive


class UpstreamServer:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._faults: list[Fault] = []
        self._always: Fault | None = None
        self._lock = threading.Condition()
        self._release = threading.Event()  # wakes hanging handlers when the server stops
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> UpstreamServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.upstream = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="upstream-test-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the server first"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- scripting --------------------------------------------------------------------

    def fail(
        self,
        times: int = 1,
        *,
        status: int = 503,
        message: str | None = None,
        retry_after: float | None = None,
        retry_after_ms: float | None = None,
    ) -> None:
        """Answer the next `times` requests with `status` (and Retry-After headers)."""
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        if retry_after_ms is not None:
            headers["retry-after-ms"] = f"{retry_after_ms:g}"
        fault = Fault("status", status=status, message=message or Fault.message, headers=headers)
        self._queue([fault] * times)

    def fail_always(self, *, status: int = 503, message: str | None = None) -> None:
        with self._lock:
            self._always = Fault("status", status=status, message=message or Fault.message)

    def hang(self, times: int = 1, *, seconds: float = 30.0) -> None:
        self._queue([Fault("hang", seconds=seconds)] * times)

    def drop(self, times: int = 1) -> None:
        self._queue([Fault("drop")] * times)

    def drop_stream(self, *, after_chunks: int) -> None:
        self._queue([Fault("drop_stream", after_chunks=after_chunks)])

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()
            self._always = None

    def _queue(self, faults: list[Fault]) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else self._always

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)
            self._lock.notify_all()

    def wait_for_requests(self, count: int, *, timeout: float = 10.0) -> list[Seen]:
        """Block until the server has received `count` requests (or fail the test)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.requests) >= count, timeout=timeout):
                raise AssertionError(f"{len(self.requests)} requests arrived, not {count}")
            return list(self.requests)


# --- answers --------------------------------------------------------------------------


def _words_of(body: dict[str, Any]) -> tuple[list[str], int]:
    """The answer's words and the prompt's token count (a word is a token here)."""
    if "messages" in body:
        messages = body["messages"] or [{}]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        last = str(messages[-1].get("content", ""))
    else:
        last = str(body.get("prompt", ""))
        prompt_tokens = len(last.split())
    return ["echo:", *last.split()], prompt_tokens


def _vector(text: str, dims: int = 4) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i] / 255, 6) for i in range(dims)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: UpstreamServer

    def handle_error(self, request, client_address) -> None:
        # Clients that time out or hang up are the point of several tests; say nothing.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            traceback.print_exc()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # Idle keep-alive connections are closed after this, so handler threads end.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._error(404, "Not found.", "not_found_error")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._error(400, "The body is not valid JSON.")
            return
        upstream = self.server.upstream
        upstream._record(
            Seen(
                path=self.path,
                body=body,
                headers={k.lower(): v for k, v in self.headers.items()},
                at=time.monotonic(),
                client_port=self.client_address[1],
            )
        )
        fault = upstream._next_fault()
        if fault is not None and fault.kind == "status":
            kind = "invalid_request_error" if fault.status < 500 else "server_error"
            self._error(fault.status, fault.message, kind, headers=fault.headers)
            return
        if fault is not None and fault.kind == "hang":
            upstream._release.wait(fault.seconds)
            self._hang_up()
            return
        if fault is not None and fault.kind == "drop":
            self._hang_up()
            return
        if self.path == "/v1/embeddings":
            self._embeddings(body)
        elif self.path in ("/v1/chat/completions", "/v1/completions"):
            chat = self.path == "/v1/chat/completions"
            if body.get("stream"):
                cut = fault.after_chunks if fault is not None else None
                self._stream(body, chat=chat, cut_after=cut)
            else:
                self._complete(body, chat=chat)
        else:
            self._error(404, f"Unknown path {self.path}.", "not_found_error")

    # --- plain answers --------------------------------------------------------------

    def _complete(self, body: dict[str, Any], *, chat: bool) -> None:
        words, prompt_tokens = _words_of(body)
        limit = int(body.get("max_tokens") or 64)
        finish = "stop" if len(words) <= limit else "length"
        text = " ".join(words[:limit])
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._json(
            200,
            {
                "id": "cmpl-test",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.get("model", MODEL),
                "choices": [choice],
                "usage": _usage(prompt_tokens, min(limit, len(words))),
            },
        )

    def _embeddings(self, body: dict[str, Any]) -> None:
        inputs = body.get("input", [])
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        tokens = sum(len(str(text).split()) for text in inputs)
        # Deliberately out of order: clients must sort by index.
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(str(text))}
            for i, text in reversed(list(enumerate(inputs)))
        ]
        self._json(
            200,
            {
                "object": "list",
                "model": body.get("model", MODEL),
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    # --- streams --------------------------------------------------------------------

    def _stream(self, body: dict[str, Any], *, chat: bool, cut_after: int | None) -> None:
        words, prompt_tokens = _words_of(body)
        limit = int(body.get("max_tokens") or 64)
        finish = "stop" if len(words) <= limit else "length"
        words = words[:limit]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        created = int(time.time())

        def event(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {
                "id": "chatcmpl-test" if chat else "cmpl-test",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": body.get("model", MODEL),
                "choices": choices,
                **extra,
            }
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())

        def choice(text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {"index": 0, "text": text or "", "finish_reason": finish_reason}

        if chat:
            event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
        self._chunk(b": keep-alive comments are part of the format\n\n")
        for index, word in enumerate(words):
            if cut_after is not None and index >= cut_after:
                self._hang_up()
                return
            event([choice(word if index == 0 else " " + word)])
        event([choice(None, finish)])
        if (body.get("stream_options") or {}).get("include_usage"):
            event([], usage=_usage(prompt_tokens, len(words)))
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")  # the last chunk of a chunked body

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # --- plumbing ---------------------------------------------------------------------

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        error = {"message": message, "type": kind, "param": None, "code": None}
        self._json(status, {"error": error}, headers)

    def _hang_up(self) -> None:
        """Close the connection at once, whatever has been sent."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client went first


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
