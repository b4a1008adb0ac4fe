"""Tasks sent with a ``countdown`` or ``eta``: kept in Redis until their time, then queued.

Celery's worker holds such a task in its own memory, unacknowledged, until its time; with kombu's
Redis transport a countdown longer than the visibility timeout (one hour) is then delivered
again to another worker, and a worker full of waiting tasks prefetches nothing else. imgq keeps
them out of every worker instead:

- a batch that takes a task whose time is ahead puts the message in the sorted set
  ``imgq:eta:<queue>`` (score: its time, epoch seconds), atomically with the batch's ack
  (``worker/broker/settle.py``): it is never outside Redis, so a worker killed at any moment loses
  nothing;
- every worker's keeper moves the messages whose time has come back to the consuming end of the
  queue (:func:`release_due`, one script: a message is released once), where they are served
  next. So a task runs between its time and one keeper tick (``IMGQ_RESTORE_INTERVAL_S``) plus a
  batch later, and never before.

The member is the message itself: a message taken twice (a redelivery) is kept once.
"""

from __future__ import annotations

import redis

__all__ = ["MAX_RELEASE", "eta_key", "release_due"]

#: Most messages one release script moves: each is copied inside Redis, which serves nothing
#: else meanwhile; a tick runs scripts until fewer are due, up to :data:`_MAX_CALLS`.
MAX_RELEASE = 100
_MAX_CALLS = 100

# KEYS: the sorted set, the queue. ARGV: now (epoch seconds), most to move. Returns how many.
_RELEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('RPUSH', KEYS[2], m)
  redis.call('ZREM', KEYS[1], m)
end
return #due
"""


def eta_key(queue: str) -> str:
    """Sorted set of ``queue``'s messages waiting for their ``eta``."""
    return f"imgq:eta:{queue}"


def release_due(client: redis.Redis, queue: str, now: float) -> int:
    """Move ``queue``'s messages whose time is at or before ``now`` to the queue's consuming
    end (up to 10,000 per call, in scripts of :data:`MAX_RELEASE`); returns how many moved."""
    total = 0
    for _ in range(_MAX_CALLS):
        moved = int(client.eval(_RELEASE, 2, eta_key(queue), queue, repr(now), MAX_RELEASE))
        total += moved
        if moved < MAX_RELEASE:
            break
    return total
