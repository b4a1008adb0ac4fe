"""Dead letters an operator can use: bounded in bytes and age, each with its reason, and the raw
message kept (for requeue) only within a byte budget.

A message no worker can serve (unreadable, redelivered too often, too large) must leave the queue
with a trace, but its sender may be hostile: the old list of whole messages reached 2.7 GB. So each
dead letter is a small stream entry (reason, task id, length, sha1, the first
:data:`HEAD_BYTES` bytes), and the raw message is kept beside it only while the queue's kept bodies
fit ``max_body_bytes`` (the oldest bodies are dropped first; their entries stay). Everything
expires after ``ttl_s``. The same raw message dead-lettered again within the TTL (a pipeline re-sent
after a lost reply, a redelivery) adds no second entry.

Keys, for queue ``Q`` (see :func:`dead_letter_keys`)::

    imgq:dlq:Q                 stream, one entry per dead letter (fields: see DeadLetter)
    imgq:dlq:Q:body:<entry id> the raw message, only when kept
    imgq:dlq:Q:bodies          sorted set "<entry id>:<length>" -> entry ms: the kept bodies
    imgq:dlq:Q:bytes           total length of the kept bodies
    imgq:dlq:Q:seen:<sha1>     entry id of that raw message (de-duplication)

An add is one Lua function, :data:`LUA_DEAD_LETTER`, so other scripts (the intake drops an
oversized message inside its own script) can prepend it and call ``dead_letter(...)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
import redis.client

from imgq.shared.errors import ImgqError
from imgq.worker.broker.deadletters_lua import (
    _ADD,
    _PURGE_CHUNK,
    _REQUEUE,
    DETAIL_BYTES,
    HEAD_BYTES,
    LUA_DEAD_LETTER,
)

if TYPE_CHECKING:
    from imgq.worker.settings import WorkerSettings

__all__ = [
    "BODY_STATES", "DEAD_LETTER_REASONS", "HEAD_BYTES", "LUA_DEAD_LETTER", "BodyNotKept",
    "DeadLetter", "DeadLetterKeys", "DeadLetterLimits", "DeadLetters", "UnknownDeadLetter",
    "dead_letter_keys", "escape_bytes",
]  # fmt: skip

#: Reason codes the worker writes, each with what it means; others are allowed (same format).
DEAD_LETTER_REASONS: dict[str, str] = {
    "malformed_message": "the message is not a Celery protocol 2 task imgq can parse",
    "content_refused": "the message is not JSON; imgq executes JSON messages only",
    "redelivered_too_often": "delivered max_deliveries times without a stored result",
    "message_too_large": "the message is larger than the worker accepts",
    "internal_error": "the worker failed on the message itself",
}
#: What ``DeadLetter.body`` says: the raw message is kept, or why not.
BODY_STATES: dict[str, str] = {
    "kept": "the raw message is kept: `imgq dlq show ID --body FILE`, `imgq dlq requeue ID`",
    "over_budget": "larger than the queue's byte budget (IMGQ_DEAD_LETTER_MAX_BYTES)",
    "too_large": "the worker dropped the message unread because it was too large",
    "not_kept": "the writer did not keep the message",
    "evicted": "dropped for newer messages to fit the byte budget",
    "expired": "older than the time to live (IMGQ_DEAD_LETTER_TTL_S)",
}
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ENTRY_ID_RE = re.compile(r"\d{1,20}-\d{1,20}")


class UnknownDeadLetter(ImgqError):
    """No dead letter of this queue has that id (never, or trimmed, requeued or purged)."""


class BodyNotKept(ImgqError):
    """The dead letter exists but its raw message is not kept; ``state`` says why."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


#: Reasons for which the worker itself stored a FAILURE that a requeue must clear.
_REFUSED_BY_THE_WORKER = frozenset({"redelivered_too_often", "internal_error"})

# KEYS: a result key. ARGV: a reason code. Deletes the stored result when it is a FAILURE with
# that reason (and nothing else: never a result the task earned since).
_FORGET_REFUSAL = """
local value = redis.call('GET', KEYS[1])
if value and string.find(value, '"status"%s*:%s*"FAILURE"')
    and string.find(value, '"' .. ARGV[1] .. ': ', 1, true) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeadLetterLimits:
    """How much a queue's dead letters may hold; the worker builds it from its settings.

    Args:
        max_entries: Most entries per queue; the oldest are dropped. Defaults to 10,000.
        max_body_bytes: Most bytes of raw messages kept per queue; the oldest bodies are dropped
            first and a larger message is never kept. 0 keeps none. Defaults to 64 MiB.
        ttl_s: Seconds an entry and its message are kept. Defaults to 7 days.
    """

    max_entries: int = 10_000
    max_body_bytes: int = 64 * 2**20
    ttl_s: int = 7 * 86400  # 1 is allowed here, for tests; the worker's settings allow >= 60

    def __post_init__(self) -> None:
        for name, low, high in (
            ("max_entries", 1, 10**7),
            ("max_body_bytes", 0, 2**40),
            ("ttl_s", 1, 365 * 86400),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> DeadLetterLimits:
        """The limits of ``IMGQ_DEAD_LETTER_MAX_ENTRIES``, ``..._MAX_BYTES`` and ``..._TTL_S``."""
        return cls(
            max_entries=settings.dead_letter_max_entries,
            max_body_bytes=settings.dead_letter_max_bytes,
            ttl_s=settings.dead_letter_ttl_s,
        )


@dataclasses.dataclass(frozen=True)
class DeadLetterKeys:
    """The Redis key names of one queue's dead letters (module docstring: what each holds)."""

    queue: str
    stream: str
    bodies: str
    bytes: str

    def body(self, entry_id: str) -> str:
        """Key of the raw message of entry ``entry_id``."""
        return f"{self.stream}:body:{entry_id}"

    def seen(self, sha1: str) -> str:
        """De-duplication key of a raw message by its sha1."""
        return f"{self.stream}:seen:{sha1}"


def dead_letter_keys(queue: str) -> DeadLetterKeys:
    """The key names of ``queue``'s dead letters; the Lua scripts build the same names.

    >>> keys = dead_letter_keys("imgq")
    >>> keys.stream, keys.bytes, keys.body("1700000000000-0")
    ('imgq:dlq:imgq', 'imgq:dlq:imgq:bytes', 'imgq:dlq:imgq:body:1700000000000-0')
    """
    stream = f"imgq:dlq:{queue}"
    return DeadLetterKeys(queue, stream, f"{stream}:bodies", f"{stream}:bytes")


def escape_bytes(data: bytes) -> str:
    """Printable ASCII for any bytes, so a hostile message cannot drive a terminal.

    >>> escape_bytes(b'{"id": 1}\\n\\x1b[2J\\xff')
    '{"id": 1}\\\\n\\\\x1b[2J\\\\xff'
    """
    return repr(data)[2:-1]


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One dead letter as read back. ``body`` is ``kept`` or why not (:data:`BODY_STATES`);
    ``head`` is the first :data:`HEAD_BYTES` bytes of the raw message, as they were."""

    id: str
    time_s: float
    reason: str
    detail: str
    task_id: str | None
    length: int
    sha1: str
    head: bytes
    worker: str
    body: str

    @classmethod
    def _from_fields(cls, entry_id: str, fields: dict[bytes, bytes], body: str) -> DeadLetter:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode("utf-8", "replace")

        return cls(
            id=entry_id,
            time_s=int(entry_id.split("-")[0]) / 1000,
            reason=text("reason"),
            detail=text("detail"),
            task_id=text("task_id") or None,
            length=int(text("length") or 0),
            sha1=text("sha1"),
            head=fields.get(b"head", b""),
            worker=text("worker"),
            body=body,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``head`` as escaped printable text (:func:`escape_bytes`)."""
        out = dataclasses.asdict(self)
        out["head"] = escape_bytes(self.head)
        out["time"] = datetime.fromtimestamp(self.time_s, UTC).isoformat(timespec="milliseconds")
        return out


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _read(client: redis.Redis, queue: str, ttl_s: int, entries: list[Any]) -> list[DeadLetter]:
    """Stream entries as DeadLetters. A stream entry cannot be edited, so a ``kept`` body whose
    key is gone is said to be evicted or expired here, when read."""
    keys = dead_letter_keys(queue)
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for raw_id, _ in entries:
        pipe.exists(keys.body(raw_id.decode()))
    (now_s, now_us), *present = pipe.execute()
    letters = []
    for (raw_id, fields), kept in zip(entries, present, strict=True):
        state = fields.get(b"body", b"").decode()
        letter = DeadLetter._from_fields(raw_id.decode(), fields, state)
        if state == "kept" and not kept:
            expired = now_s + now_us / 1e6 - letter.time_s >= ttl_s
            letter = dataclasses.replace(letter, body="expired" if expired else "evicted")
        letters.append(letter)
    return letters


class DeadLetters:
    """One queue's dead letters: add (the worker), list/show/requeue/purge (the operator).

    Args:
        redis_client: Client of the broker's Redis (replies as bytes, the default).
        queue: The queue name; requeue pushes onto the list of that name.
        limits: Entry count, byte budget and time to live.
        worker: Id of the worker that writes, recorded in each entry.

    Example:
        >>> dl = DeadLetters(redis.Redis(), "imgq", worker="imgq@box7")  # doctest: +SKIP
        >>> dl.add(raw, "malformed_message", "not JSON")  # doctest: +SKIP
        >>> [d.reason for d in dl.list()]  # doctest: +SKIP
        ['malformed_message']
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        queue: str,
        limits: DeadLetterLimits = DeadLetterLimits(),  # noqa: B008 (frozen, shared safely)
        worker: str = "",
        *,
        results: redis.Redis | None = None,
        result_key_prefix: str = "celery-task-meta-",
    ) -> None:
        if not isinstance(queue, str) or not queue or any(c.isspace() for c in queue):
            raise ValueError(f"queue must be a non-empty name without spaces, got {queue!r}")
        self.redis, self.queue, self.limits, self.worker = redis_client, queue, limits, worker
        self.results = results if results is not None else redis_client
        self.result_key_prefix = result_key_prefix
        self.keys = dead_letter_keys(queue)
        self._add = redis_client.register_script(_ADD)
        self._requeue = redis_client.register_script(_REQUEUE)
        self._purge_chunk = redis_client.register_script(_PURGE_CHUNK)

    def add(
        self,
        raw: bytes,
        reason: str,
        detail: str,
        task_id: str | None = None,
        *,
        keep_body: bool = True,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Record ``raw`` as a dead letter, unless the same bytes were recorded within the TTL.

        Args:
            raw: The message exactly as it was in Redis.
            reason: A reason code (:data:`DEAD_LETTER_REASONS`; lowercase, digits and ``_``).
            detail: What went wrong, for the operator; cut to :data:`DETAIL_BYTES` bytes.
            task_id: The task id, when the message revealed one; cut to :data:`FIELD_BYTES`.
            keep_body: Keep the raw message (within the byte budget) so it can be requeued.
            pipe: Queue the add on this pipeline (the one that stores a batch's results)
                instead of running it now.
        """
        if not _REASON_RE.fullmatch(reason):
            raise ValueError(
                f"reason must be a code of lowercase letters, digits and _, got {reason!r}; "
                f"known codes: {', '.join(DEAD_LETTER_REASONS)}"
            )
        # A body over the budget is never kept: do not send it to Redis at all.
        send = keep_body and len(raw) <= self.limits.max_body_bytes
        args: list[bytes | str | int] = [
            self.queue, raw if send else b"", len(raw), hashlib.sha1(raw).hexdigest(),
            raw[:HEAD_BYTES], reason, detail[:DETAIL_BYTES], task_id or "", self.worker,
            "1" if keep_body else "0", self.limits.ttl_s, self.limits.max_entries,
            self.limits.max_body_bytes,
        ]  # fmt: skip
        if pipe is not None:
            pipe.eval(_ADD, 0, *args)
        else:
            self._add(keys=[], args=args)

    def list(self, count: int = 20) -> list[DeadLetter]:
        """The ``count`` newest dead letters, newest first."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        entries: Any = self.redis.xrevrange(self.keys.stream, "+", "-", count=count)
        return _read(self.redis, self.queue, self.limits.ttl_s, entries)

    def show(self, entry_id: str) -> tuple[DeadLetter, bytes | None]:
        """One dead letter and its raw message (``None`` when not kept)."""
        self._check_id(entry_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xrange(self.keys.stream, entry_id, entry_id)
        pipe.get(self.keys.body(entry_id))
        entries, body = pipe.execute()
        if not entries:
            raise self._unknown(entry_id)
        letter = _read(self.redis, self.queue, self.limits.ttl_s, entries)[0]
        return letter, body if letter.body == "kept" else None

    def requeue(self, entry_id: str) -> DeadLetter:
        """Push the kept raw message back onto the queue (``LPUSH``, as a Celery producer does),
        and forget the dead letter, its de-duplication key and the worker's delivery count of
        the message, so that it gets fresh deliveries. Atomic.

        A task the worker refused itself (``redelivered_too_often``, ``internal_error``) has a
        FAILURE stored, and the first stored result wins: that FAILURE is deleted first, so
        the requeued task can be answered (and its waiting client told).

        Raises:
            UnknownDeadLetter: no such entry.
            BodyNotKept: the raw message is not kept (``state`` says why).
        """
        self._check_id(entry_id)
        entry, body = self.show(entry_id)
        if body is not None and entry.task_id and entry.reason in _REFUSED_BY_THE_WORKER:
            key = self.result_key_prefix + entry.task_id
            self.results.eval(_FORGET_REFUSAL, 1, key, entry.reason)
        reply = self._requeue(keys=[], args=[self.queue, entry_id, self.limits.ttl_s])
        if reply[0] == b"unknown":
            raise self._unknown(entry_id)
        if reply[0] == b"not_kept":
            state = reply[1].decode()
            raise BodyNotKept(
                f"dead letter {entry_id} of queue {self.queue!r} cannot be requeued: its message "
                f"is not kept ({state}: {BODY_STATES.get(state, 'unknown state')}); the entry "
                f"holds only its first {HEAD_BYTES} bytes, so resend the task from its source",
                state,
            )
        return DeadLetter._from_fields(entry_id, _pairs(reply[1]), "kept")

    def purge(self) -> int:
        """Delete every dead letter of this queue and its kept message; how many entries.

        Works in chunks (each atomic) up to the newest entry when it started, so that a long
        purge neither blocks Redis nor deletes a dead letter added meanwhile.
        """
        newest: Any = self.redis.xrevrange(self.keys.stream, "+", "-", count=1)
        last_id = newest[0][0].decode() if newest else "+"
        deleted, more = 0, 1
        while more:
            n, more = self._purge_chunk(keys=[], args=[self.queue, last_id])
            deleted += int(n)
        return deleted

    def stats(self) -> dict[str, Any]:
        """Entries, kept bodies and their bytes, the oldest and newest entry times (Unix s), and
        the limits."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xlen(self.keys.stream)
        pipe.zcard(self.keys.bodies)
        pipe.get(self.keys.bytes)
        pipe.xrange(self.keys.stream, "-", "+", count=1)
        pipe.xrevrange(self.keys.stream, "+", "-", count=1)
        entries, bodies, kept_bytes, oldest, newest = pipe.execute()
        times = [int(e[0][0].split(b"-")[0]) / 1000 if e else None for e in (oldest, newest)]
        return {
            "queue": self.queue,
            "entries": int(entries),
            "kept_bodies": int(bodies),
            "kept_bytes": int(kept_bytes or 0),
            "oldest_time_s": times[0],
            "newest_time_s": times[1],
            **dataclasses.asdict(self.limits),
        }

    def _check_id(self, entry_id: str) -> None:
        if (
            not isinstance(entry_id, str)
            or not _ENTRY_ID_RE.fullmatch(entry_id)
            or any(int(part) >= 2**64 for part in entry_id.split("-"))  # Redis refuses those
        ):
            raise UnknownDeadLetter(
                f"{entry_id!r:.60} is not a dead-letter id (they look like 1700000000000-0); "
                f"`imgq dlq list --queue {self.queue}` shows them"
            )

    def _unknown(self, entry_id: str) -> UnknownDeadLetter:
        return UnknownDeadLetter(
            f"queue {self.queue!r} has no dead letter {entry_id} (requeued, purged, trimmed or "
            f"older than {self.limits.ttl_s} s); `imgq dlq list --queue {self.queue}` shows them"
        )
