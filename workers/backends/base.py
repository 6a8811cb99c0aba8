"""What every backend is: load once, then run batches of requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class BackendError(Exception):
    """The request cannot succeed; the client gets this message (no retry)."""

    code = "worker_error"


class InvalidInputError(BackendError):
    """The input is wrong for this model (too long, unsupported): a 400 for the client."""

    code = "invalid_request"


class TransientBackendError(Exception):
    """A failure that may pass (an upstream 503, a dropped connection): retried, unless
    the backend says a retry of the whole message could not help (`retryable=False`: it
    already retried on its own, or its upstream's circuit is open)."""

    def __init__(self, message: str = "", *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class BackendRequest:
    request_id: str
    task: str
    payload: dict[str, Any]
    deadline_ms: int
    # Streaming: called with each new piece of text; returning False stops this request.
    on_text: Callable[[str], bool] | None = None
    # Checked between steps of a long generation: True once the client has gone.
    cancelled: Callable[[], bool] = lambda: False

    def expired(self) -> bool:
        return time.time() * 1000 >= self.deadline_ms


@dataclass
class BackendResult:
    text: str | None = None
    finish_reason: str | None = None
    embeddings: list[list[float]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Backend:
    """Subclasses set `tasks` and implement load() and run_batch()."""

    tasks: tuple[str, ...] = ()
    # False for backends that gain nothing from batching (an upstream HTTP server batches on
    # its own side): requests then run one per worker thread, with no batcher in between.
    batched = True

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config or {})

    def load(self) -> None:
        """Load weights; called once per worker process, before any request."""

    def run_batch(self, requests: list[BackendRequest]) -> list[BackendResult | BaseException]:
        """One result (or exception) per request, in order."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the heartbeat says about this backend (model, device)."""
        return {"backend": type(self).__name__}


def pick_device() -> str:
    """The GPU when there is one, else the CPU: the same code runs on both."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
