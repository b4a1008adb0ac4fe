"""The Redis side of at-least-once delivery: take messages in bulk, hold them until acked, and
give a dead worker's messages back to the queue.

Celery clients ``LPUSH`` messages onto the list named after the queue; consumers pop from the
right. Each batch runner of a worker has its own in-flight list (a :class:`Lane`,
``imgq:inflight:<worker_id>:<runner>``) and takes up to ``max_n`` messages in one transaction
of ``LMOVE queue lane RIGHT LEFT`` commands: a message is never outside Redis, and Redis moves it
without copying it (a Lua script that popped the messages and wrote them into a hash cost Redis
~130 µs per 26 kB message, ~5x an ``LMOVE``: every reply crossed into a Lua string and back, and
the hash writes went to the append-only file again). The runner deletes its lane (the ack) in
the same pipeline that stores the batch's results, after the results; it holds the whole lane
at that moment, so the ack is one idempotent ``DEL``.

Each worker holds a lease key ``imgq:lease:<worker_id>`` with a time to live of ``lease_ttl_s``,
renewed while its batch loop makes progress, and registers its lanes in the hash
:data:`LANES_KEY` (lane -> queue). Every worker runs :meth:`Intake.restore_dead` every
``restore_interval_s``: each registered lane whose worker's lease has expired goes back to the
right end of its queue (served next, in the original order). Hence, after a SIGKILL,
redelivery starts within ``lease_ttl_s + restore_interval_s`` seconds, however long a healthy
batch takes. A worker does not take while its own lease may have expired (it knows when it last
renewed it), so that the others would not give back at once what it just took.

A take whose reply is lost to a connection error (after Redis ran it) leaves messages in the
lane that the runner does not know of. Every take also reads the lane beyond what the runner
holds and serves those with its own (whether the error reached the runner or redis-py retried
the transaction itself); an ack that comes first (the batch in hand after a failed extra take)
gives them back to the queue before its ``DEL``. Either way an ack never deletes a message
nobody served.

A stalled worker whose lease expires loses its messages to the others; if it later wakes up and
stores results, the duplicates carry the same answer, which at-least-once delivery allows.

Keys::

    <queue>                            list of messages (Celery/kombu's own key)
    imgq:lanes                         hash lane key -> queue: the lanes that may hold messages
    imgq:lease:<worker_id>             lease, expires after lease_ttl_s
    imgq:inflight:<worker_id>:<runner> list of the messages that runner holds, newest left
"""

from __future__ import annotations

import time

import redis

__all__ = ["Intake", "Lane", "LeaseLost", "LANES_KEY", "lane_key", "lease_key"]

LANES_KEY = "imgq:lanes"


class LeaseLost(RuntimeError):
    """This worker's lease has expired (it stalled, or was never renewed): it may not take
    messages until the lease is renewed, or other workers would redeliver them at once."""


def lane_key(worker_id: str, runner: int) -> str:
    """List of the messages runner ``runner`` of ``worker_id`` has taken and not yet acked."""
    return f"imgq:inflight:{worker_id}:{runner}"


def lease_key(worker_id: str) -> str:
    """Key whose existence means ``worker_id`` is alive."""
    return f"imgq:lease:{worker_id}"


# Moves the first `count` (all when count < 0) messages at the left (newest) end of a lane to the
# right (consuming) end of its queue, newest first, so that the oldest ends up served first.
# Each LMOVE copies a message into Lua and back: this runs only on redelivery, never per batch.
_GIVE_BACK_FN = """
local function give_back(lane, queue, count)
  local moved = 0
  while count < 0 or moved < count do
    if not redis.call('LMOVE', lane, queue, 'LEFT', 'RIGHT') then break end
    moved = moved + 1
  end
  return moved
end
"""

# KEYS: lanes hash. Gives back every lane whose worker has no lease, and unregisters it.
_RESTORE_DEAD = (
    _GIVE_BACK_FN
    + """
local moved = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local worker = string.match(flat[i], '^imgq:inflight:(.*):%d+$')
  if worker and redis.call('EXISTS', 'imgq:lease:' .. worker) == 0 then
    moved = moved + give_back(flat[i], flat[i + 1], -1)
    redis.call('HDEL', KEYS[1], flat[i])
  end
end
return moved
"""
)

# KEYS: lane, queue. ARGV: how many messages (at the right end) the runner holds. Gives back the
# rest: those of a take whose reply was lost. Safe to repeat.
_GIVE_BACK_UNKNOWN = (
    _GIVE_BACK_FN
    + """
return give_back(KEYS[1], KEYS[2], math.max(0, redis.call('LLEN', KEYS[1]) - tonumber(ARGV[1])))
"""
)

# KEYS: lanes hash, lease, then the worker's lanes. ARGV: the queue. A worker giving back all it
# holds at shutdown.
_RELEASE = (
    _GIVE_BACK_FN
    + """
local moved = 0
for i = 3, #KEYS do
  moved = moved + give_back(KEYS[i], ARGV[1], -1)
  redis.call('HDEL', KEYS[1], KEYS[i])
end
redis.call('DEL', KEYS[2])
return moved
"""
)


class Intake:
    """One worker process's access to one queue: its lease, its lanes, redelivery.

    Args:
        redis_client: Client of the broker's Redis.
        queue: Queue name (the Redis list).
        worker_id: Unique per process start, e.g. ``"imgq1@host:4242:9f3c"``.
        lease_ttl_s: Lease lifetime in seconds.
        runners: How many lanes (batch runner threads) this worker has.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        queue: str,
        worker_id: str,
        lease_ttl_s: float,
        runners: int = 1,
    ) -> None:
        self.redis = redis_client
        self.queue = queue
        self.worker_id = worker_id
        self.lease_ttl_s = lease_ttl_s
        self.lease_key = lease_key(worker_id)
        # Takes stop this long before the lease could expire: a take must reach Redis while the
        # lease is certainly alive.
        self._lease_margin_s = lease_ttl_s / 10
        self._lease_until = -float("inf")
        self.lanes = [Lane(self, i) for i in range(runners)]
        self._restore_dead = redis_client.register_script(_RESTORE_DEAD)
        self._give_back_unknown = redis_client.register_script(_GIVE_BACK_UNKNOWN)
        self._release = redis_client.register_script(_RELEASE)

    def renew_lease(self) -> None:
        """Set (or extend) this worker's lease to ``lease_ttl_s`` from now."""
        sent = time.monotonic()
        self.redis.set(self.lease_key, self.worker_id, px=int(self.lease_ttl_s * 1000))
        # Redis counts the time to live from when it ran the SET, after `sent`.
        self._lease_until = sent + self.lease_ttl_s

    def check_lease(self) -> None:
        """Raises:
        LeaseLost: the lease was not renewed recently enough to be certainly alive."""
        if time.monotonic() > self._lease_until - self._lease_margin_s:
            raise LeaseLost(f"worker {self.worker_id} has no lease ({self.lease_key})")

    def wait(self, timeout_s: float) -> bool:
        """Block until the queue has a message or ``timeout_s`` passes, consuming nothing.

        ``BLMOVE q q RIGHT RIGHT`` puts the element back where it was, so the order is kept.

        Returns:
            True when a message was there.
        """
        # Redis takes a fractional timeout; redis-py's annotation says int.
        moved = self.redis.blmove(self.queue, self.queue, timeout_s, "RIGHT", "RIGHT")  # type: ignore[arg-type]
        return moved is not None

    def restore_dead(self) -> int:
        """Give every dead worker's in-flight messages back to their queues.

        Returns:
            How many messages were moved.
        """
        return int(self._restore_dead(keys=[LANES_KEY]))

    def release(self) -> int:
        """At shutdown, after the runners stopped: give back every unacked message, drop the
        lease and the registration.

        Returns:
            How many messages were given back.
        """
        keys = [LANES_KEY, self.lease_key, *(lane.key for lane in self.lanes)]
        moved = int(self._release(keys=keys, args=[self.queue]))
        for lane in self.lanes:
            lane.held, lane.unsure = 0, False
        return moved


class Lane:
    """One batch runner's in-flight list: take, ack. Used by that runner's thread only.

    Attributes:
        key: The list's Redis key.
        held: How many messages the runner took and has not acked (the right end of the list).
        unsure: A take's outcome is unknown (its reply was lost): the list may hold more than
            ``held``; the next take serves the extra with its own, or the next ack gives it
            back to the queue first.
    """

    def __init__(self, intake: Intake, index: int) -> None:
        self.intake = intake
        self.key = lane_key(intake.worker_id, index)
        self.held = 0
        self.unsure = False
        self._short = False  # the last take found fewer messages than it asked for

    def take(self, max_n: int) -> list[bytes]:
        """Move up to ``max_n`` messages, oldest first, from the queue into this lane, atomically.

        Returns:
            The messages, oldest first; empty when the queue is empty. After a lost reply that
            redis-py retried, also those its first attempt moved (so possibly more than
            ``max_n``).

        Raises:
            LeaseLost: this worker's lease may have expired.
            redis.ConnectionError, redis.TimeoutError: the outcome is unknown (see ``unsure``).
        """
        self.intake.check_lease()
        queue = self.intake.queue
        if self._short and max_n > 1:
            # The last take emptied the queue: ask how much is there rather than send max_n
            # LMOVEs, most of them for nothing (~10 µs of client CPU each).
            max_n = min(max_n, int(self.intake.redis.llen(queue)))
            if not max_n:
                return []
        pipe = self.intake.redis.pipeline(transaction=True)
        pipe.hset(LANES_KEY, self.key, queue)  # registered before it can hold anything
        # What the lane holds beyond `held`: nothing, unless an earlier take's reply was lost
        # (its error reached us: `unsure`; or redis-py retried this very transaction). Those
        # messages are served with this batch, so the ack deletes nothing unknown.
        pipe.lrange(self.key, 0, -self.held - 1)
        for _ in range(max_n):
            pipe.lmove(queue, self.key, "RIGHT", "LEFT")
        try:
            replies = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            self.unsure = True
            raise
        moved = [m for m in replies[2:] if m is not None]
        messages = replies[1][::-1] + moved  # the lane is newest first
        self.held += len(messages)
        self.unsure = False
        self._short = len(moved) < max_n
        return messages

    def wait(self, timeout_s: float) -> bool:
        """:meth:`Intake.wait`."""
        return self.intake.wait(timeout_s)

    def ack(self, pipe: redis.client.Pipeline) -> None:
        """Queue the deletion of every held message on ``pipe`` (after their results); call
        :meth:`settled` once the pipeline has run. Repeating it (a retried pipeline) is safe.

        Raises:
            redis.ConnectionError, redis.TimeoutError: giving back the messages of a lost take
                reply failed; retry.
        """
        self._settle_unknown()
        if self.held:
            pipe.delete(self.key)

    def settled(self) -> None:
        """The pipeline that acked the held messages has run."""
        self.held = 0

    def _settle_unknown(self) -> None:
        """After a lost take reply: give back whatever the lane holds beyond ``held``."""
        if self.unsure:
            self.intake._give_back_unknown(keys=[self.key, self.intake.queue], args=[self.held])
            self.unsure = False
