"""The one way out: every outbound HTTP request Sluice makes starts from a client built here.

Upstream model servers use it now; webhooks will. Keeping how Sluice talks to the outside
world in one module (pooling, timeouts, the User-Agent, whether the environment's proxy and
CA settings apply) means a change of policy is made once. Tests swap nothing here: they
point the clients at a real local server (tests/upstream_server.py).
"""

from __future__ import annotations

import httpx

USER_AGENT = "sluice-gateway"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Enough for every thread of a worker process to hold a connection to one upstream; above
# this a request waits for a free connection (up to its timeout) instead of opening more.
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_MAX_KEEPALIVE = 20


def timeout(total_s: float, *, connect_s: float | None = None) -> httpx.Timeout:
    """Per-request timeouts: `connect_s` to connect, `total_s` for each other step.

    httpx applies the read timeout to each read, not to the whole response, so a server that
    trickles bytes can outlast it: a caller with a deadline checks it between reads too.
    """
    total_s = max(0.001, total_s)
    connect = total_s if connect_s is None else max(0.001, min(connect_s, total_s))
    return httpx.Timeout(total_s, connect=connect)


def pooled_client(
    *,
    base_url: str = "",
    headers: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> httpx.Client:
    """A keep-alive connection pool, safe to share between threads; close() it when done.

    Build one per destination and reuse it: a new client per request pays a TCP (and TLS)
    handshake each time, which is most of the overhead of a short upstream call.
    """
    return httpx.Client(
        base_url=base_url,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        timeout=timeout(timeout_s, connect_s=connect_timeout_s),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=min(DEFAULT_MAX_KEEPALIVE, max_connections),
        ),
        # A redirect from an inference API is a misconfiguration, and following one would
        # resend the body (and the Authorization header) somewhere nobody chose.
        follow_redirects=False,
    )
