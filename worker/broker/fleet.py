"""The fleet as Redis knows it: which workers are alive, and which died without a clean
shutdown, for the alerts Prometheus cannot raise from its own scrapes.

Prometheus finds workers by service discovery (Docker's DNS in docker-compose, a pod list in
Kubernetes), and a dead worker leaves it within seconds: its ``up`` series goes stale after
zero to a few failed scrapes, so no ``up == 0 for 5m`` rule ever fires, and a clean scale-down
looks the same as a crash. Redis can tell them apart: every worker holds a lease
(``imgq:lease:<worker_id>``, ``worker/broker/intake.py``) and gives it up when it shuts down
cleanly.

- A worker that takes a lease anew (at start, or after it lapsed) joins :data:`MEMBERS_KEY`, in
  the same transaction (:func:`join`); its clean release leaves it (``intake_lua.RELEASE``).
- Every worker's keeper sweeps the members (:meth:`Fleet.sweep`, one script, so each loss is
  recorded once): a member whose lease is gone is marked *missing*; still gone ``grace_s``
  later, it is *lost*: recorded in :data:`LOST_KEY` with the time (Redis's clock) and dropped
  from the members. The grace spares live workers whose leases all lapsed in a Redis outage
  longer than the lease: they take new leases within a keeper tick of Redis answering again.
- Each worker exports what its last sweep saw: ``imgq_fleet_workers`` (members holding a lease)
  and ``imgq_fleet_worker_lost_timestamp_seconds`` (the newest loss; 0: none recorded). Both are
  gauges, present from the first scrape, read from Redis: a worker started after the loss
  reports it too, and a series born at any value means what it says (a counter born at 1 is
  invisible to ``increase()``). ``ImgqWorkerDown`` (``docker/alert-rules.yml``) fires on it.
- ``imgq exporter`` exports the same two gauges from :func:`observe`, the sweep's view without
  its writes, so they exist while no worker runs (a fleet scaled to zero).

So a killed worker is recorded within two lease lifetimes plus a keeper tick (``2 x
IMGQ_LEASE_TTL_S + IMGQ_RESTORE_INTERVAL_S``, 22 s at the defaults), by any worker still alive.

Keys::

    imgq:workers           hash worker_id -> queue: workers that took a lease and kept it
    imgq:workers:missing   hash worker_id -> when its lease was first seen gone (epoch seconds)
    imgq:workers:lost      sorted set worker_id -> when it was recorded lost; the newest kept
"""

from __future__ import annotations

import dataclasses
from typing import Any

import redis

__all__ = ["LOST_KEPT", "LOST_KEY", "MEMBERS_KEY", "MISSING_KEY", "Fleet", "FleetView", "join",
           "observe"]  # fmt: skip

MEMBERS_KEY = "imgq:workers"
MISSING_KEY = "imgq:workers:missing"
LOST_KEY = "imgq:workers:lost"
#: Lost workers remembered (the newest), for an operator's `ZREVRANGE imgq:workers:lost`.
LOST_KEPT = 100

# KEYS: members, missing, lost. ARGV: grace (seconds), how many lost entries to keep.
# Returns {members holding a lease, {ids recorded lost now}, time of the newest loss or '0'}.
# The loss is written before the members are dropped: a Redis too full to record it (OOM)
# fails the script before it changes anything, and the next sweep tries again.
_SWEEP = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local grace, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local live, lost = 0, {}
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('EXISTS', 'imgq:lease:' .. id) == 1 then
    live = live + 1
  else
    local since = tonumber(redis.call('HGET', KEYS[2], id) or '')
    if not since then
      redis.call('HSET', KEYS[2], id, string.format('%.6f', now))
    elseif now - since >= grace then
      lost[#lost + 1] = id
    end
  end
end
for _, id in ipairs(lost) do redis.call('ZADD', KEYS[3], now, id) end
if #lost > 0 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -keep - 1) end
for _, id in ipairs(lost) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local newest = redis.call('ZREVRANGE', KEYS[3], 0, 0, 'WITHSCORES')
return {live, lost, newest[2] or '0'}
"""

# KEYS: members, lost. The sweep's view without its writes: {members holding a lease, time of
# the newest loss or '0'}.
_OBSERVE = """
local live = 0
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('EXISTS', 'imgq:lease:' .. id) == 1 then live = live + 1 end
end
local newest = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {live, newest[2] or '0'}
"""


def join(pipe: Any, worker_id: str, queue: str) -> None:
    """Queue on ``pipe`` (a transaction that also sets the worker's lease) the commands that
    make ``worker_id`` a member, no longer missing."""
    pipe.hset(MEMBERS_KEY, worker_id, queue)
    pipe.hdel(MISSING_KEY, worker_id)


@dataclasses.dataclass(frozen=True)
class FleetView:
    """What one sweep saw.

    Attributes:
        live: Members holding a lease.
        lost: Workers this sweep recorded lost.
        last_lost_at: When the newest recorded loss was recorded (epoch seconds; 0: none).
    """

    live: int
    lost: tuple[str, ...]
    last_lost_at: float


class Fleet:
    """The sweep of the members of one Redis.

    Args:
        redis_client: Client of the broker's Redis.
        grace_s: How long a member's lease must stay gone before it counts as lost (the lease
            lifetime: a live worker renews within it once Redis answers).
    """

    def __init__(self, redis_client: redis.Redis, grace_s: float) -> None:
        self.grace_s = grace_s
        self._sweep = redis_client.register_script(_SWEEP)

    def sweep(self) -> FleetView:
        """Mark members whose lease is gone, record those gone for ``grace_s`` as lost.

        Raises:
            redis.RedisError: Redis did not run it (nothing was recorded).
        """
        live, lost, newest = self._sweep(
            keys=[MEMBERS_KEY, MISSING_KEY, LOST_KEY], args=[self.grace_s, LOST_KEPT]
        )
        ids = tuple(w.decode(errors="replace") if isinstance(w, bytes) else str(w) for w in lost)
        return FleetView(live=int(live), lost=ids, last_lost_at=float(newest))


def observe(redis_client: redis.Redis) -> FleetView:
    """What a sweep would see, without recording anything: for a process that watches the fleet
    without being part of it (``imgq exporter``, which runs while the fleet is scaled to zero).
    Losses are recorded by the workers' sweeps only.

    Raises:
        redis.RedisError: Redis did not answer, or answered something else than a view.
    """
    reply = redis_client.eval(_OBSERVE, 2, MEMBERS_KEY, LOST_KEY)
    try:
        live, newest = reply
        return FleetView(live=int(live), lost=(), last_lost_at=float(newest))
    except (TypeError, ValueError) as exc:
        raise redis.ResponseError(f"unexpected reply to the fleet read: {exc}") from None
