"""The Redis side of at-least-once delivery: take messages in bulk, hold them until acked, and
give a dead worker's messages back to the queue.

Celery clients ``LPUSH`` messages onto the list named after the queue; consumers pop from the
right. A worker takes up to ``max_n`` messages in one Lua script that pops them *and* writes them
into its in-flight hash ``imgq:inflight:<worker_id>`` in the same atomic step, so there is no
moment where a message exists only in the worker's memory. It deletes them from that hash (the
ack) in the same pipeline that stores their results, after the results.

Each worker holds a lease key ``imgq:lease:<worker_id>`` with a time to live of ``lease_ttl_s``,
renewed while its batch loop makes progress. Every worker runs :meth:`Intake.restore_dead` every
``restore_interval_s``: for each registered worker whose lease has expired, the script moves its
in-flight messages back to the right end of their queue (so they are served next, in their
original order). Hence, after a SIGKILL, redelivery starts within
``lease_ttl_s + restore_interval_s`` seconds, however long a healthy batch takes.

A take whose reply is lost to a connection error (after the script ran) leaves messages in the
hash that no runner holds; :meth:`Intake.recover_orphans`, run every ``restore_interval_s``,
gives those back too.

A stalled worker whose lease expires loses its messages to the others; if it later wakes up and
stores results, the duplicates carry the same answer, which at-least-once delivery allows.

Keys::

    <queue>                  list of messages (Celery/kombu's own key)
    imgq:workers             set of worker ids that may hold messages
    imgq:lease:<worker_id>   lease, expires after lease_ttl_s
    imgq:inflight:<worker_id>  hash "<queue>|<seq>" -> message, in the order taken
"""

from __future__ import annotations

import threading

import redis

__all__ = ["Intake", "LeaseLost", "WORKERS_KEY", "inflight_key", "lease_key"]

WORKERS_KEY = "imgq:workers"


class LeaseLost(RuntimeError):
    """This worker's lease has expired (it stalled, or was never renewed): it may not take
    messages until the lease is renewed, or other workers would redeliver them at once."""


def inflight_key(worker_id: str) -> str:
    """Hash of the messages ``worker_id`` has taken and not yet acked."""
    return f"imgq:inflight:{worker_id}"


def lease_key(worker_id: str) -> str:
    """Key whose existence means ``worker_id`` is alive."""
    return f"imgq:lease:{worker_id}"


# KEYS: queue, inflight hash, workers set, lease. ARGV: max_n, worker id, first sequence number.
# Takes nothing without a live lease, so a worker that lost its lease cannot take messages that
# another worker would immediately consider abandoned.
_TAKE = """
if redis.call('EXISTS', KEYS[4]) == 0 then return false end
local items = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not items then return {} end
local seq = tonumber(ARGV[3])
local fields = {}
for i, item in ipairs(items) do
  local field = KEYS[1] .. '|' .. (seq + i - 1)
  redis.call('HSET', KEYS[2], field, item)
  fields[i] = field
end
redis.call('SADD', KEYS[3], ARGV[2])
return {fields, items}
"""

# Pushes entries of an in-flight hash back to the right (consuming) end of their queues, oldest
# last so that it is served first, and deletes them from the hash; entries named in `held` stay.
_RESTORE_FN = """
local function restore(hash, held)
  local flat = redis.call('HGETALL', hash)
  local entries = {}
  for i = 1, #flat, 2 do
    if not held[flat[i]] then
      local queue, seq = string.match(flat[i], '^(.*)|(%d+)$')
      entries[#entries + 1] = {queue, tonumber(seq), flat[i + 1], flat[i]}
    end
  end
  table.sort(entries, function(a, b) return a[2] > b[2] end)
  for _, e in ipairs(entries) do
    redis.call('RPUSH', e[1], e[3])
    redis.call('HDEL', hash, e[4])
  end
  return #entries
end
"""

# KEYS: workers set. Restores every registered worker whose lease key is gone.
_RESTORE_DEAD = (
    _RESTORE_FN
    + """
local moved = 0
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', 'imgq:lease:' .. worker) == 0 then
    moved = moved + restore('imgq:inflight:' .. worker, {})
    redis.call('SREM', KEYS[1], worker)
  end
end
return moved
"""
)

# KEYS: in-flight hash. ARGV: the fields this worker's runners hold. Gives back the rest: messages
# taken by a call whose reply was lost (connection error after the script ran, client retry).
_RECOVER_ORPHANS = (
    _RESTORE_FN
    + """
local held = {}
for _, field in ipairs(ARGV) do held[field] = true end
return restore(KEYS[1], held)
"""
)

# KEYS: in-flight hash, workers set, lease. ARGV: worker id. A worker giving back all it holds.
_RELEASE = (
    _RESTORE_FN
    + """
local moved = restore(KEYS[1], {})
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return moved
"""
)


class Intake:
    """One worker process's access to one queue: take, ack, lease, restore.

    Thread-safe: batch runner threads share one instance (redis-py's pool gives each call its
    own connection; taking and recovering are serialised by a lock so that the set of messages
    the runners hold is always exact).

    Args:
        redis_client: Client of the broker's Redis.
        queue: Queue name (the Redis list).
        worker_id: Unique per process start, e.g. ``"imgq1@host:4242:9f3c"``.
        lease_ttl_s: Lease lifetime in seconds.
    """

    def __init__(
        self, redis_client: redis.Redis, queue: str, worker_id: str, lease_ttl_s: float
    ) -> None:
        self.redis = redis_client
        self.queue = queue
        self.worker_id = worker_id
        self.lease_ttl_s = lease_ttl_s
        self.inflight_key = inflight_key(worker_id)
        self.lease_key = lease_key(worker_id)
        self._next_seq = 0
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._take = redis_client.register_script(_TAKE)
        self._restore_dead = redis_client.register_script(_RESTORE_DEAD)
        self._recover_orphans = redis_client.register_script(_RECOVER_ORPHANS)
        self._release = redis_client.register_script(_RELEASE)

    def take(self, max_n: int) -> tuple[list[str], list[bytes]]:
        """Atomically pop up to ``max_n`` messages and record them as in flight.

        Returns:
            ``(fields, messages)``: the in-flight field of each message (pass them to
            :meth:`ack` and :meth:`settled`) and the messages, oldest first; both empty when the
            queue is empty.

        Raises:
            LeaseLost: this worker holds no lease.
        """
        keys = [self.queue, self.inflight_key, WORKERS_KEY, self.lease_key]
        with self._lock:
            first, self._next_seq = self._next_seq, self._next_seq + max_n
            reply = self._take(keys=keys, args=[max_n, self.worker_id, first])
            if reply is None:
                raise LeaseLost(f"worker {self.worker_id} has no lease ({self.lease_key})")
            if not reply:
                return [], []
            fields = [f.decode() for f in reply[0]]
            self._held.update(fields)
        return fields, list(reply[1])

    def wait(self, timeout_s: float) -> bool:
        """Block until the queue has a message or ``timeout_s`` passes, consuming nothing.

        ``BLMOVE q q RIGHT RIGHT`` puts the element back where it was, so the order is kept.

        Returns:
            True when a message was there.
        """
        # Redis takes a fractional timeout; redis-py's annotation says int.
        moved = self.redis.blmove(self.queue, self.queue, timeout_s, "RIGHT", "RIGHT")  # type: ignore[arg-type]
        return moved is not None

    def ack(self, pipe: redis.client.Pipeline, fields: list[str]) -> None:
        """Queue the deletion of acked messages on ``pipe`` (after their results)."""
        if fields:
            pipe.hdel(self.inflight_key, *fields)

    def settled(self, fields: list[str]) -> None:
        """Forget ``fields`` once the pipeline that acked them has run."""
        with self._lock:
            self._held.difference_update(fields)

    def renew_lease(self) -> None:
        """Set (or extend) this worker's lease to ``lease_ttl_s`` from now."""
        self.redis.set(self.lease_key, self.worker_id, px=int(self.lease_ttl_s * 1000))

    def restore_dead(self) -> int:
        """Give every dead worker's in-flight messages back to their queues.

        Returns:
            How many messages were moved.
        """
        return int(self._restore_dead(keys=[WORKERS_KEY]))

    def recover_orphans(self) -> int:
        """Give back this worker's in-flight messages that no runner holds: those of a take whose
        reply was lost to a connection error after the script had run.

        Returns:
            How many messages were moved.
        """
        with self._lock:
            return int(self._recover_orphans(keys=[self.inflight_key], args=sorted(self._held)))

    def release(self) -> int:
        """At shutdown, after the runners stopped: give back every unacked message, drop the
        lease and the registration.

        Returns:
            How many messages were given back.
        """
        with self._lock:
            self._held.clear()
            keys = [self.inflight_key, WORKERS_KEY, self.lease_key]
            return int(self._release(keys=keys, args=[self.worker_id]))
