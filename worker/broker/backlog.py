"""A queue's backlog as a scaler must see it: every message sent and not yet answered, by where
it waits, and how long the oldest ready one has waited.

States, read by one Lua script, so they are one moment's snapshot: a take, a store, a give-back
and a release of due tasks are each atomic in Redis too, so the states add up exactly however
busy the workers are:

- ``ready``: on the queue's lists (every priority level, ``worker/broker/priority.py``), its
  suspects and its poison list: waiting for a worker to take them.
- ``in_flight``: in batches' lanes (the queue's registrations in ``imgq:lanes``: every worker,
  both lanes of each runner, and a dead worker's until they are given back): taken, not
  answered.
- ``due``: in the queue's ``eta`` set (``worker/broker/schedule.py``) with their time come by
  Redis's clock, not yet queued again by a keeper: ready in all but place.
- ``scheduled``: in the ``eta`` set with their time ahead: known work, none for now.

So ``ready + in_flight + due + scheduled`` is every message of the queue not answered, and
``ready + in_flight + due`` the work a fleet must do now (what to scale on).

**The oldest ready message's wait.** The script brings the two ends of each ready list (the end
served next, where given-back and due messages go too, and the newest end), at most
:data:`FRAGMENT_BYTES` from each end of each message, so a read never carries a whole image.
A message's wait runs from the ``imgq_sent_at`` header (``ImgqClient`` sets it) or, when its
``eta`` has come, from that ``eta`` (it could not be served before), to Redis's own clock (the
script's ``TIME``): one clock for every reader, so only the producer's clock can be off. A
producer behind Redis makes a wait look longer; one ahead makes it look shorter (never below
0). A message with no time at all (Celery's own ``send_task`` sets none) is timed by the
reader itself: from when it first saw that message at that end (the same size and ends), a
lower bound that the same watch also sets under a producer's clock running ahead. A one-shot
read (``imgq backlog``) has no such memory: it says it does not know.

Cost: one script of ``TYPE`` and ``LLEN`` per list and per lane of the queue, the ``HGETALL`` of
``imgq:lanes`` (two lanes per runner), two ``ZCOUNT`` and two ``LINDEX`` per non-empty list;
read-only (it runs on a replica, and on a Redis at ``maxmemory``). Each ``LINDEX`` copies its
message inside Redis, the one cost that grows with message size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from typing import Any

import redis

from imgq.shared.errors import InvalidTask
from imgq.worker.broker.intake import LANES_KEY, poison_key, suspect_key
from imgq.worker.broker.priority import QueueLists
from imgq.worker.broker.schedule import eta_key
from imgq.worker.wire.message import epoch_s

__all__ = ["FRAGMENT_BYTES", "STATES", "Backlog", "BacklogReader", "header_times"]

#: The states of a message not yet answered, in the order a message goes through them.
STATES = ("scheduled", "due", "ready", "in_flight")
#: Bytes read from each end of a message at an end of a list: kombu writes the headers after the
#: body (a few kB, with Celery's argument summaries), other producers may write them first.
FRAGMENT_BYTES = 8 << 10

# A key of another type fails the read naming it (Redis's own WRONGTYPE names none).
# KEYS: the ready lists, the lanes hash, the eta set. ARGV: the queue as lanes are registered
# under, the fragment size. Returns {seconds, microseconds (Redis's TIME), {each list's
# length}, in flight, due, scheduled, {per list: {size, head, tail} of its served end, then of
# its newest end when it holds more than one message}}.
_READ = """
local function wrong(key, want)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= want then
    local name = string.sub(key, 1, 120)
    return redis.error_reply('WRONGTYPE ' .. name .. ' is a ' .. kind .. ', not a ' .. want)
  end
end
local clock = redis.call('TIME')
local now = string.format('%d.%06d', clock[1], clock[2])
local n, cut = #KEYS - 2, tonumber(ARGV[2])
local lengths, ends = {}, {}
for i = 1, #KEYS do
  local bad = wrong(KEYS[i], i == n + 1 and 'hash' or (i == n + 2 and 'zset' or 'list'))
  if bad then return bad end
end
for i = 1, n do
  local length = redis.call('LLEN', KEYS[i])
  local found = {}
  for _, at in ipairs(length > 1 and {-1, 0} or (length == 1 and {-1} or {})) do
    local m = redis.call('LINDEX', KEYS[i], at)
    if m then
      local tail = ''
      if #m > cut then tail = string.sub(m, -cut) end
      found[#found + 1] = #m
      found[#found + 1] = string.sub(m, 1, cut)
      found[#found + 1] = tail
    end
  end
  lengths[i], ends[i] = length, found
end
local in_flight = 0
local lanes = redis.call('HGETALL', KEYS[n + 1])
for i = 1, #lanes, 2 do
  if lanes[i + 1] == ARGV[1] then
    local bad = wrong(lanes[i], 'list')
    if bad then return bad end
    in_flight = in_flight + redis.call('LLEN', lanes[i])
  end
end
local due = redis.call('ZCOUNT', KEYS[n + 2], '-inf', now)
local scheduled = redis.call('ZCOUNT', KEYS[n + 2], '(' .. now, '+inf')
return {clock[1], clock[2], lengths, in_flight, due, scheduled, ends}
"""

_NUMBER = rb"(-?\d{1,20}(?:\.\d{1,20})?(?:[eE][-+]?\d{1,3})?)"
# A header key, where JSON puts a key: after `{` or `,` (a `"` inside a string is escaped).
_SENT_AT = re.compile(rb'[{,]\s*"imgq_sent_at"\s*:\s*' + _NUMBER)
_ETA = re.compile(rb'[{,]\s*"eta"\s*:\s*(?:"([^"\\]{1,64})"|' + _NUMBER + rb")")


def header_times(*fragments: bytes) -> tuple[float | None, float | None]:
    """``(sent_at, eta)`` of a message from fragments of it (epoch seconds; None: absent or not
    a time). The first fragment that has a header wins.

    >>> header_times(b'{"body": "eyJ9", "headers": {"eta": null, "imgq_sent_at": 1700000000.5}}')
    (1700000000.5, None)
    >>> header_times(b'..., "eta": "2023-11-14T22:13:20+00:00", "id": "x"}', b'{"imgq_sent_at": 9}')
    (9.0, 1700000000.0)
    >>> header_times(b'{"kwargsrepr": "{\\\\"imgq_sent_at\\\\": 5}", "imgq_sent_at": 1e400}')
    (None, None)
    """
    sent = eta = None
    for fragment in fragments:
        if sent is None and (found := _SENT_AT.search(fragment)):
            sent = _time(found.group(1).decode(), number=True)
        if eta is None and (found := _ETA.search(fragment)):
            text, number = found.groups()
            eta = _time((text or number).decode(errors="replace"), number=not text)
    return sent, eta


def _time(text: str, number: bool) -> float | None:
    """Epoch seconds from a header's number or ISO 8601 text; None when it is no usable time."""
    try:
        return epoch_s(float(text) if number else text)
    except (InvalidTask, ValueError, OverflowError):
        return None


@dataclasses.dataclass(frozen=True)
class Backlog:
    """One queue's backlog at one moment (Redis's clock).

    Attributes:
        queue: The queue's name.
        ready, in_flight, due, scheduled: Messages in each state (module docstring).
        oldest_age_s: The longest wait of a ready message, in seconds, among those whose wait
            is known (0 when none is ready): a lower bound when ``untimed``.
        oldest_age_from: What that wait was measured from: "sent_at" (the header), "eta" (its
            time came after it was sent), "observed" (this reader first saw it then), or ""
            (no ready message with a known wait).
        untimed: Messages at the ends of the ready lists that carry no time and that this
            reader sees for the first time: their wait is unknown.
        ready_lists: Each ready list's length, by its Redis key (highest priority first, then
            the suspects and the poison list).
        read_at: Redis's clock at the read, epoch seconds.
    """

    queue: str
    ready: int
    in_flight: int
    due: int
    scheduled: int
    oldest_age_s: float
    oldest_age_from: str
    untimed: int
    ready_lists: dict[str, int]
    read_at: float

    def states(self) -> dict[str, int]:
        """Messages per state, in :data:`STATES` order."""
        return {state: getattr(self, state) for state in STATES}

    def as_json(self) -> dict[str, Any]:
        """The backlog as a JSON-ready dict (list keys decoded, control characters escaped)."""
        out = dataclasses.asdict(self)
        out["ready_lists"] = {k.encode("unicode_escape").decode(): v
                              for k, v in self.ready_lists.items()}  # fmt: skip
        return out


class BacklogReader:
    """Reads one queue's backlog; remembers, between reads, when it first saw each message at
    an end of a ready list (for messages that carry no time). Safe to share between threads.

    Args:
        client: Client of the broker's Redis (short timeouts: a scrape must not hang).
        queue: The queue's name, as workers are given it (``IMGQ_QUEUE``).
        lists: How the queue's lists are named (the clients' transport options).
    """

    def __init__(self, client: redis.Redis, queue: str, lists: QueueLists | None = None) -> None:
        self.queue = queue
        lists = lists or QueueLists()
        home = lists.home(queue)
        self.keys = [*lists.names(queue), suspect_key(home), poison_key(home)]
        self._home = home
        self._script = client.register_script(_READ)
        self._lock = threading.Lock()
        self._first_seen: dict[tuple[int, bytes], float] = {}

    def read(self) -> Backlog:
        """The backlog now.

        Raises:
            redis.RedisError: Redis did not answer, or answered something that is no backlog.
        """
        reply = self._script(keys=[*self.keys, LANES_KEY, eta_key(self._home)],
                             args=[self._home, FRAGMENT_BYTES])  # fmt: skip
        try:
            seconds, micros, lengths, in_flight, due, scheduled, ends = reply
            now = int(seconds) + int(micros) / 1e6
            counts = [_count(x) for x in lengths]
            if len(counts) != len(self.keys) or len(ends) != len(self.keys):
                raise ValueError("one length and one set of ends per list")
            in_flight, due, scheduled = _count(in_flight), _count(due), _count(scheduled)
            with self._lock:
                age, source, untimed = self._oldest(now, ends)
        except (TypeError, ValueError) as exc:
            raise redis.ResponseError(f"unexpected reply to the backlog read: {exc}") from None
        return Backlog(
            queue=self.queue,
            ready=sum(counts),
            in_flight=in_flight,
            due=due,
            scheduled=scheduled,
            oldest_age_s=age,
            oldest_age_from=source,
            untimed=untimed,
            ready_lists={key: n for key, n in zip(self.keys, counts, strict=True)},
            read_at=now,
        )

    def _oldest(self, now: float, ends: list[Any]) -> tuple[float, str, int]:
        """The longest known wait over the ends of the lists, what it was measured from, and
        how many messages there have no known wait."""
        seen: dict[tuple[int, bytes], float] = {}
        oldest, source, untimed = 0.0, "", 0
        for index, found in enumerate(ends):
            if not isinstance(found, list) or len(found) % 3:
                raise ValueError("each end is a size, a head and a tail")
            for at in range(0, len(found), 3):
                size, head, tail = found[at : at + 3]
                if not isinstance(head, bytes) or not isinstance(tail, bytes):
                    raise ValueError("a message's ends are strings")
                digest = hashlib.sha1(b"%d:%s:%s" % (_count(size), head, tail)).digest()
                first = self._first_seen.get((index, digest))
                seen[(index, digest)] = now if first is None or first > now else first
                waited, since = _waited(now, head, tail, None if first is None else now - first)
                if waited is None:
                    untimed += 1
                elif waited > oldest or not source:
                    oldest, source = waited, since
        self._first_seen = seen  # only the messages at an end now: bounded by the lists
        return oldest, source, untimed


def _waited(
    now: float, head: bytes, tail: bytes, observed_s: float | None
) -> tuple[float | None, str]:
    """One message's wait and what it is measured from: its time (sent, or its ``eta`` once
    come) or, when longer or the only one, how long this reader has seen it."""
    sent, eta = header_times(tail, head)
    since, source = sent, "sent_at"
    if eta is not None and eta <= now and (since is None or eta > since):
        since, source = eta, "eta"
    age = None if since is None else max(0.0, now - since)
    if observed_s is not None and (age is None or observed_s > age):
        return max(0.0, observed_s), "observed"
    return age, source


def _count(value: Any) -> int:
    """A count from Redis: a non-negative integer, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | bytes) or int(value) < 0:
        raise ValueError(f"not a count: {value!r:.40}")
    return int(value)
