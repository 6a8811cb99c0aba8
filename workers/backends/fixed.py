"""FixedLatencyBackend: a deterministic stand-in model for benchmarks and tests.

It serves every task with outputs computed from the input (an echo for text, a hash for
embeddings) after a configured delay, so measurements isolate Sluice's own overhead and
queueing. It is not a model: never deploy it for real traffic.

Config: latency_ms (per batch, default 20), per_item_ms (added per request in the batch),
token_ms (streaming: delay between words), dims (embedding size, default 384), and, for
tests of failure handling, fail_on (a marker: inputs containing it raise a permanent error)
and transient_on (inputs containing it fail transiently on their first attempt).
"""

from __future__ import annotations

import hashlib
import math
import time

from .base import Backend, BackendError, BackendRequest, BackendResult, TransientBackendError

_attempts: dict[str, int] = {}


def _text_of(request: BackendRequest) -> str:
    payload = request.payload
    if "messages" in payload:
        return " ".join(str(m.get("content", "")) for m in payload["messages"])
    if "prompt" in payload:
        return str(payload["prompt"])
    return " ".join(payload.get("input", []))


class FixedLatencyBackend(Backend):
    tasks = ("chat", "completion", "embedding", "classification")

    def run_batch(self, requests: list[BackendRequest]) -> list[BackendResult | BaseException]:
        latency = float(self.config.get("latency_ms", 20))
        per_item = float(self.config.get("per_item_ms", 0))
        time.sleep((latency + per_item * len(requests)) / 1000)
        return [self._one(request) for request in requests]

    def _one(self, request: BackendRequest) -> BackendResult | BaseException:
        text = _text_of(request)
        fail_on = self.config.get("fail_on")
        if fail_on and fail_on in text:
            return BackendError(f"the fixed-latency backend refuses inputs containing {fail_on!r}")
        transient_on = self.config.get("transient_on")
        if transient_on and transient_on in text:
            seen = _attempts.get(request.request_id, 0)
            _attempts[request.request_id] = seen + 1
            if seen == 0:
                return TransientBackendError("a transient failure, as configured")
        if request.task == "embedding":
            inputs = request.payload.get("input", [])
            return BackendResult(
                embeddings=[self._vector(item) for item in inputs],
                prompt_tokens=sum(len(item.split()) for item in inputs),
            )
        limit = int(request.payload.get("max_tokens") or 16)
        every_word = ["echo:", *text.split()]
        words = every_word[:limit]
        emitted: list[str] = []
        finish = "stop" if len(every_word) <= limit else "length"
        token_ms = float(self.config.get("token_ms", 0))
        for index, word in enumerate(words):
            piece = word if index == 0 else " " + word
            if request.cancelled():
                finish = "cancelled"
                break
            if request.on_text is not None and request.on_text(piece) is False:
                finish = "cancelled"
                break
            emitted.append(piece)
            if token_ms:
                time.sleep(token_ms / 1000)
        return BackendResult(
            text="".join(emitted),
            finish_reason=finish,
            prompt_tokens=len(text.split()),
            completion_tokens=len(emitted),
        )

    def _vector(self, text: str) -> list[float]:
        dims = int(self.config.get("dims", 384))
        digest = hashlib.sha256(text.encode()).digest()
        raw = [((digest[i % 32] + i * 31) % 255) / 127.0 - 1.0 for i in range(dims)]
        norm = math.sqrt(sum(v * v for v in raw)) or 1.0
        return [v / norm for v in raw]

    def describe(self) -> dict:
        return {"backend": "FixedLatencyBackend", "latency_ms": self.config.get("latency_ms", 20)}
