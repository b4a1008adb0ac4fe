"""Storing a batch's outcome: dead letters, results, the ack and the drift counts, exactly once.

One Lua script does it all, in this order, so that an error part-way (a Redis at ``maxmemory``
refusing a write) stops before the ack and the batch is retried whole, never lost:

1. the dead letters of the batch (messages nobody can be answered for, poison pills, messages a
   bug refused), and the messages whose ``eta`` is ahead (``worker/broker/schedule.py``) — before
   the ack that deletes them from the lane;
2. every result with ``SET key value NX EX ttl``, then ``PUBLISH`` on the key for a waiting
   ``AsyncResult`` only when it was stored: the first stored result wins, so a redelivered task
   (a worker that stalled past its lease and woke up, a retried round trip) never changes an
   answer a client may have read, and is never announced twice;
3. the ack: ``DEL`` of the batch's lane and its registration (``worker/broker/intake.py``);
4. the batch's drift counts, only when every result of the batch was new: a re-sent script
   stores nothing new and so counts nothing again. When some results were already there (a
   redelivered batch), the script says which, and the runner counts the new ones alone in a
   second call, guarded by the runner's high-water mark of batch numbers (:func:`once_token`),
   which a re-sent call finds already passed.

When results live in another Redis than the queue, step 2 runs there first and the rest follows
on the broker, with the drift counts guarded by the same mark.

Durability (``IMGQ_WAIT_REPLICAS``): Redis replicates asynchronously, so a failover can lose a
settle the master had acknowledged. With the option, ``WAIT replicas timeout`` follows the
script in the same round trip, and the runner goes on only once that many replicas have the
batch's results and ack, or the timeout has passed. A ``WAIT`` that falls short is counted and
logged, never retried and never fatal: the script ran on the master, and if that master is
lost before it replicates, the batch's messages are still in the new master's queue or in a
lane the keepers give back (``worker/broker/intake.py``), so its tasks are served again: a
result may be stored and published twice (the same answer, for a deterministic model), no task
is lost. Stopping the runner instead would stop serving whenever a replica is down.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from imgq.worker.broker.deadletters_lua import LUA_DEAD_LETTER
from imgq.worker.broker.intake import LANES_KEY, Lane
from imgq.worker.broker.schedule import eta_key
from imgq.worker.wire.codec import json_dumps

__all__ = ["DONE_TTL_S", "DeadMessage", "Settler", "WindowCounts", "done_key", "once_token"]

logger = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0  # a replica that is down makes every batch fall short: logged this often

#: Longest a task sent with ``ignore_result`` is remembered as answered (its marker's time to
#: live, at most the results' own): long enough for any redelivery, short enough that a flood of
#: such tasks does not fill Redis with what the sender asked not to store.
DONE_TTL_S = 3600


def done_key(task_id: str) -> str:
    """The marker that stands in for the result of a task sent with ``ignore_result``: the
    first stored wins and only it counts, as for results, but no one reads it."""
    return f"imgq:done:{task_id}"


def once_token(lane: Lane) -> tuple[str, int]:
    """What makes a batch's drift counts sent apart from its results count once: the runner's
    high-water mark (a key per runner, not per batch, so nothing piles up) and the batch's
    sequence number, which only grows."""
    return f"imgq:once:{lane.intake.worker_id}:{lane.index}", lane.seq


# Dead letters, scheduled messages, results (first wins, published when stored), ack, window
# counts. KEYS: lane ('' for none), lanes hash, (unused), once mark ('' for none: count when every
# result is new; else count only if the batch's seq is above the runner's mark), the queue's eta
# sorted set, then one key per window, then one key per result. ARGV: result ttl, queue, worker,
# dead-letter ttl, max entries, max body bytes, n dead letters, n windows, (unused), (unused),
# batch seq, marker ttl, n scheduled, then 7 values per dead letter (body, length, sha1, head,
# reason, detail, task id), 2 per scheduled message (eta, message), 3 per window (images,
# "slot increment ...", ttl), then one value per result ('' for a marker: ignore_result).
# Returns {count per window (-1: not counted, -2: counting failed)..., stored flag per result...}.
_SETTLE_BODY = """
local ttl, queue, worker = ARGV[1], ARGV[2], ARGV[3]
local n_dead = tonumber(ARGV[7])
local function once(mark, seq)
  if mark == '' then return true end
  if tonumber(seq) <= tonumber(redis.call('GET', mark) or '-1') then return false end
  redis.call('SET', mark, seq, 'EX', 86400)
  return true
end
local a = 13
for i = 1, n_dead do
  local body = ARGV[a + 1]
  dead_letter(queue, body ~= '' and body or false, tonumber(ARGV[a + 2]), ARGV[a + 3],
    ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], worker, body ~= '' and '1' or '0',
    ARGV[4], ARGV[5], ARGV[6])
  a = a + 7
end
for i = 1, tonumber(ARGV[13]) do
  redis.call('ZADD', KEYS[5], ARGV[a + 1], ARGV[a + 2])
  a = a + 2
end
local n_windows = tonumber(ARGV[8])
local out = {}
for w = 1, n_windows do out[w] = -1 end
local all_new = true
local first = 6 + n_windows
for i = first, #KEYS do
  local value = ARGV[a + 3 * n_windows + i - first + 1]
  if value == '' then  -- ignore_result: a marker, nobody waits for it
    out[#out + 1] = redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[12]) and 1 or 0
    all_new = all_new and out[#out] == 1
  elseif redis.call('SET', KEYS[i], value, 'NX', 'EX', ttl) then
    redis.call('PUBLISH', KEYS[i], value)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
    all_new = false
  end
end
if KEYS[1] ~= '' then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], KEYS[1])
end
if n_windows > 0 and all_new and once(KEYS[4], ARGV[11]) then
  for w = 1, n_windows do
    local ok, count = pcall(add_window, KEYS[5 + w], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
    out[w] = ok and count or -2
    a = a + 3
  end
end
return out
"""


@dataclasses.dataclass(frozen=True)
class DeadMessage:
    """A message for the dead letters: ``body`` is kept for ``imgq dlq requeue`` unless empty."""

    body: bytes
    length: int
    sha1: str
    head: bytes
    reason: str
    detail: str
    task_id: str


@dataclasses.dataclass(frozen=True)
class WindowCounts:
    """A batch's drift counts for the open window: images and ``"slot increment ..."``."""

    key: str
    images: int
    pairs: str
    ttl_s: int


class Settler:
    """Runs the settle script of one runner's batches.

    Args:
        broker: Client of the queue's Redis.
        results: Client of the results' Redis (the same object when they are one Redis).
        queue: The queue's name (dead letters are per queue).
        worker_id: Written into dead letters.
        result_expires_s: Time to live of stored results.
        dead_letters: ``(ttl_s, max_entries, max_body_bytes)``.
        lua_add_window: The observer's Lua function that adds counts to a window
            (``Observer.lua_add_window``), or None when nothing observes the batches.
        wait_replicas: Replicas that must acknowledge each settle (``WAIT``); 0: none.
        wait_timeout_ms: Longest ``WAIT``.
        on_shortfall: Called once per ``WAIT`` that fell short (a metric).

    Attributes:
        shortfalls: How many ``WAIT`` replies fell short so far.
    """

    def __init__(
        self,
        broker: redis.Redis,
        results: redis.Redis,
        queue: str,
        worker_id: str,
        result_expires_s: int,
        dead_letters: tuple[int, int, int],
        lua_add_window: str | None = None,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        on_shortfall: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.results = results
        self.queue = queue
        self.worker_id = worker_id
        self.result_expires_s = result_expires_s
        self.dead_letters = dead_letters
        self._script = LUA_DEAD_LETTER + (lua_add_window or _NO_WINDOW) + _SETTLE_BODY
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._on_shortfall = on_shortfall
        self.shortfalls = 0
        self._wait_at: int | None = None  # where the last settle's WAIT reply is, if it has one
        self._logged_s = -math.inf

    def settle(
        self,
        pipe: redis.client.Pipeline,
        lane: Lane | None,
        results: Sequence[tuple[str | bytes, Mapping[str, Any] | None]],
        dead: Sequence[DeadMessage],
        windows: Sequence[WindowCounts],
        once: tuple[str, int] | None = None,
        *,
        scheduled: Sequence[tuple[float, bytes]] = (),
    ) -> int:
        """Queue the settle script on ``pipe``.

        Args:
            pipe: The batch's pipeline; other commands (task events) may follow.
            lane: The batch's lane to ack, or None (nothing taken).
            results: ``(result key, record)`` per task; ``(done_key(id), None)`` for one sent
                with ``ignore_result``.
            dead: The batch's dead letters.
            windows: The batch's counts per window (drift: one per model version served).
            once: :func:`once_token` of the batch, for counts sent apart from their results:
                they are added only if the batch is above the runner's mark (instead of only
                if every result is new).
            scheduled: ``(eta, message)`` of the batch's tasks whose time is ahead, kept in
                ``worker/broker/schedule.py``'s sorted set before the ack deletes them from the
                lane.

        Returns:
            The index of the script's reply in ``pipe.execute()``: ``[count per window (-1 when
            not counted, -2 when counting failed)..., stored flag per result...]``; read it with
            :meth:`reply`, which also checks the ``WAIT`` queued after the script when the
            batch stores results or acks a lane.
        """
        ttl_s, max_entries, max_body = self.dead_letters
        mark, seq = once if once is not None else ("", 0)
        keys: list[str | bytes] = [lane.key if lane is not None else "", LANES_KEY, "", mark,
                                   eta_key(self.queue)]  # fmt: skip
        keys += [w.key for w in windows]
        keys += [key for key, _ in results]
        args: list[Any] = [self.result_expires_s, self.queue, self.worker_id, ttl_s,
                           max_entries, max_body, len(dead), len(windows), "", "", seq,
                           min(DONE_TTL_S, self.result_expires_s), len(scheduled)]  # fmt: skip
        for d in dead:
            args += [d.body, d.length, d.sha1, d.head, d.reason, d.detail[:500], d.task_id]
        for eta, message in scheduled:
            args += [repr(eta), message]
        for w in windows:
            args += [w.images, w.pairs, w.ttl_s]
        args += [b"" if record is None else json_dumps(record) for _, record in results]
        index = len(pipe)
        pipe.eval(self._script, len(keys), *keys, *args)
        self._wait_at = None
        if self.wait_replicas and (lane is not None or results):
            self._wait_at = len(pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        return index

    def reply(self, replies: Sequence[Any], index: int) -> Any:
        """The settle script's reply from ``pipe.execute(raise_on_error=False)`` of the pipeline
        the last :meth:`settle` call queued it on; a ``WAIT`` after it that fell short (or
        failed) is counted and logged (see the module docstring).

        Raises:
            redis.RedisError: the script failed (nothing after the failing write happened).
        """
        script = replies[index]
        if isinstance(script, Exception):
            raise script
        wait_at, self._wait_at = self._wait_at, None
        if wait_at is not None:
            acked = replies[wait_at]
            if isinstance(acked, Exception) or int(acked) < self.wait_replicas:
                self._short(acked)
        return script

    def _short(self, acked: Any) -> None:
        self.shortfalls += 1
        if self._on_shortfall is not None:
            self._on_shortfall()
        now = time.monotonic()
        if now - self._logged_s >= _LOG_EVERY_S:
            self._logged_s = now
            logger.warning(
                "WAIT %d %d answered %s: a batch's results and ack are on the master only (%d "
                "batches so far); if it fails before they replicate, their tasks are served "
                "again", self.wait_replicas, self.wait_timeout_ms, acked, self.shortfalls,
            )  # fmt: skip


# Without drift the script still names add_window (never called).
_NO_WINDOW = "local function add_window(key, n, pairs, ttl) return -1 end\n"
