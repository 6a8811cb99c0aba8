"""The upstream circuit breaker, worker side: workers record outcomes, the gateway reads.

Three keys per deployment (workers.protocol): `breaker` exists while the circuit is open
and its TTL is the time left; `breaker_failures` counts consecutive failed upstream calls;
`breaker_probe` names the one request the gateway let through while half-open.

- closed: failures below the threshold; everything is admitted.
- open: the failures reached the threshold; the gateway refuses with 503
  upstream_unavailable and Retry-After = the key's TTL (workers/lua/admit.lua).
- half-open: the open period is over but nothing has succeeded since; the admission
  script lets one probe through. Its success closes the circuit (record_success deletes
  the counter); its failure opens it again for another open period.

The worker records one outcome per call of the backend (after its in-process retries),
not per HTTP attempt.
"""

from __future__ import annotations

import functools
from typing import Literal

from sluice.redisconn import get_redis

from . import protocol

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_OPEN_S = 30
# The failure counter is forgotten this long after the last failure (beyond the open
# period), so a handful of failures spread over days never trips the circuit, while the
# counter still outlives the open period (without it there would be no half-open state).
FAILURE_MEMORY_S = 300

State = Literal["closed", "open", "half_open"]

# KEYS 1 breaker  2 failures  3 probe holder
# ARGV 1 threshold  2 open period (ms)  3 how long the counter is remembered (ms)
# Returns 1 when this failure opened the circuit.
_RECORD_FAILURE = """
local failures = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local probing = redis.call('DEL', KEYS[3])
if failures >= tonumber(ARGV[1]) or probing == 1 then
  -- NX: requests admitted before the circuit opened may still fail while it is open;
  -- they must not keep pushing its end further away.
  if redis.call('SET', KEYS[1], '1', 'PX', ARGV[2], 'NX') then return 1 end
end
return 0
"""


@functools.cache
def _record_failure_script():
    # get_redis() is one client per process, so one registered script per process.
    return get_redis().register_script(_RECORD_FAILURE)


def record_success(slug: str) -> None:
    """The upstream answered: forget the failures, release the probe; the circuit closes.

    An open period already running is left to end by itself: one straggler's success is
    weak evidence, and the half-open probe that follows costs one request.
    """
    get_redis().delete(protocol.breaker_failures(slug), protocol.breaker_probe(slug))


def record_failure(
    slug: str, *, threshold: int = DEFAULT_FAILURE_THRESHOLD, open_s: float = DEFAULT_OPEN_S
) -> bool:
    """Count one failed upstream call; True when it opened the circuit.

    The circuit opens when the consecutive failures reach `threshold`, or when the
    half-open probe fails (the counter is then already past the threshold).
    """
    open_ms = max(1, int(open_s * 1000))
    opened = _record_failure_script()(
        keys=[
            protocol.breaker(slug),
            protocol.breaker_failures(slug),
            protocol.breaker_probe(slug),
        ],
        args=[max(1, threshold), open_ms, open_ms + FAILURE_MEMORY_S * 1000],
    )
    return bool(opened)


def is_open(slug: str) -> bool:
    return bool(get_redis().exists(protocol.breaker(slug)))


def state(slug: str, *, threshold: int = DEFAULT_FAILURE_THRESHOLD) -> State:
    """For dashboards and tests: what the admission script would make of the keys now."""
    pipe = get_redis().pipeline(transaction=True)
    pipe.exists(protocol.breaker(slug))
    pipe.get(protocol.breaker_failures(slug))
    opened, failures = pipe.execute()
    if opened:
        return "open"
    if int(failures or 0) >= max(1, threshold):
        return "half_open"
    return "closed"
