"""The Redis side of at-least-once delivery: take messages in bulk, hold them until acked, give a
dead worker's messages back, and quarantine messages that keep killing workers.

Celery clients ``LPUSH`` messages onto the list named after the queue (one list per priority level,
``worker/broker/priority.py``); consumers pop from the right. Each batch of each runner has its own
in-flight list (a *lane*, ``imgq:inflight:<worker_id>:<runner>:b<seq>``, registered in the hash
:data:`LANES_KEY`), and a take is one transaction of ``LMOVE queue lane RIGHT LEFT`` commands: a
message is never outside Redis, and Redis moves it without copying it. The batch's results and its
ack (``DEL`` of the lane, unregistering it) are one script (``worker/broker/settle.py``); ``seq``
then moves on, so the next batch takes into a new lane.

Why a lane per batch: the ack deletes exactly the messages this batch took. If Redis comes back
with older data (an append-only file a second behind, a failover to a lagging replica), it may
hold lanes of batches this worker has long acked; they carry a smaller ``seq`` than the
runner's, so :meth:`Intake.restore_dead` gives them back to the queue instead of anything
deleting them. Whatever is given back goes to the consuming end of the queue's first list, so it
is served next whatever its priority was: it had been taken already.

Bounded reads: takes go through a client whose replies may not exceed one message at the size
limit (``worker/broker/capped.py``), and the number of messages asked for shrinks to what fits after
large ones were seen. A reply that would exceed it is dropped unread and the lane is sorted out
inside Redis by ``intake_lua.RECOVER``: messages over the limit go to the dead letters (metadata
only, the worker never reads them), the batch is cut at the byte budget and the rest goes back to
the head of the queue. The same script serves the lane after a take whose reply was lost.

Poison pills (Sidekiq Pro's reliable fetch; SQS's ``maxReceiveCount``): a message given back
because its worker died, hung or shut down without storing a result counts one delivery in
``imgq:deliveries:<sha1 of the message>`` (unless its result exists: it was answered, and only
the lease was lost, e.g. to a Redis outage). Counted messages are *suspects*: they go to the list
``imgq:suspect:<queue>``, and a take that brings a suspect brings it alone (the rest goes back
to the queue head), so a message that kills its worker takes no batch-mate with it again. At
``max_deliveries`` a message goes to ``imgq:poison:<queue>`` instead; each take moves one poison
message along, flagged, and the engine ends it in FAILURE (``redelivered_too_often``) with a
dead letter. So a message that crashes, OOM-kills or hangs workers costs at most
``max_deliveries`` worker lives, fleet-wide, and its first batch-mates one delivery each.

Leases: each worker holds ``imgq:lease:<worker_id>`` with a time to live of ``lease_ttl_s``,
renewed while its runners make progress; taking it makes the worker a fleet member, and a
member whose lease lapses without a release is recorded lost (``worker/broker/fleet.py``). Every
worker runs :meth:`Intake.restore_dead` every ``restore_interval_s``: each lane whose worker's
lease has expired goes back to the right end of its queue (served next, in the original order).
A worker does not take while its own lease may have expired (it knows when it last renewed it).

Keys::

    <queue>                                  list of messages (Celery/kombu's own key)
    <queue>\x06\x16<step>                     the same at priority steps 3, 6, 9 (kombu's)
    imgq:lanes                               hash lane key -> queue: lanes that may hold messages
    imgq:lease:<worker_id>                   lease, expires after lease_ttl_s
    imgq:inflight:<worker_id>:<runner>:b<seq>  one batch's messages, newest left
    imgq:deliveries:<sha1>                   deliveries without a result, expires after a day
    imgq:suspect:<queue>                     messages given back counted, taken one at a time
    imgq:poison:<queue>                      messages delivered max_deliveries times
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import redis

from imgq.worker.broker import fleet
from imgq.worker.broker import intake_lua as lua
from imgq.worker.broker.capped import ReplyTooLarge, capped_client
from imgq.worker.broker.priority import LOWER_SHARE, URGENT_WINDOW_S, is_urgent, plan_take

__all__ = [
    "DELIVERIES_TTL_S",
    "Intake",
    "Lane",
    "LeaseLost",
    "LANES_KEY",
    "Oversized",
    "Taken",
    "deliveries_key",
    "lane_key",
    "lease_key",
    "poison_key",
    "suspect_key",
]

LANES_KEY = "imgq:lanes"
#: How long a message's delivery count is remembered.
DELIVERIES_TTL_S = 86_400
#: Room in a take's reply beyond the messages' bytes (RESP framing, and the ends of up to a
#: batch of oversized messages).
_REPLY_SLACK_BYTES = 256 << 10


class LeaseLost(RuntimeError):
    """This worker's lease has expired (it stalled, or was never renewed): it may not take
    messages until the lease is renewed, or other workers would redeliver them at once."""


def lane_key(worker_id: str, runner: int, seq: int) -> str:
    """List of the messages batch ``seq`` of runner ``runner`` of ``worker_id`` holds."""
    return f"imgq:inflight:{worker_id}:{runner}:b{seq}"


def lease_key(worker_id: str) -> str:
    """Key whose existence means ``worker_id`` is alive."""
    return f"imgq:lease:{worker_id}"


def deliveries_key(sha1_hex: str) -> str:
    """Counter of a message's deliveries that ended without a result."""
    return f"imgq:deliveries:{sha1_hex}"


def poison_key(queue: str) -> str:
    """List of ``queue``'s messages delivered ``max_deliveries`` times."""
    return f"imgq:poison:{queue}"


def suspect_key(queue: str) -> str:
    """List of ``queue``'s messages given back without a result, served one per batch."""
    return f"imgq:suspect:{queue}"


@dataclasses.dataclass(frozen=True)
class Oversized:
    """A message over the size limit, moved from the lane to the dead letters inside Redis.

    Attributes:
        length: Its length in bytes.
        sha1: Hex SHA-1 of the message ("" when Redis did not compute it).
        head: Its first bytes; tail: its last bytes (where kombu puts the headers and task id).
    """

    length: int
    sha1: str
    head: bytes
    tail: bytes


@dataclasses.dataclass
class Taken:
    """What one take brought: messages (oldest first), which of them are poison pills, the
    oversized messages Redis dead-lettered instead of returning, and whether it is a suspect
    served alone."""

    messages: list[bytes] = dataclasses.field(default_factory=list)
    poisoned: list[bool] = dataclasses.field(default_factory=list)
    oversized: list[Oversized] = dataclasses.field(default_factory=list)
    suspect: bool = False

    def __len__(self) -> int:
        return len(self.messages)

    def extend(self, other: Taken) -> None:
        self.messages += other.messages
        self.poisoned += other.poisoned
        self.oversized += other.oversized
        self.suspect = self.suspect or other.suspect


class Intake:
    """One worker process's access to one queue: its lease, its lanes, redelivery.

    Args:
        redis_client: Client of the broker's Redis.
        queue: Queue name: the Redis list served first, where given-back messages go.
        worker_id: Unique per process start, e.g. ``"imgq1@host:4242:9f3c"``.
        lease_ttl_s: Lease lifetime in seconds.
        runners: How many batch runners (threads) this worker has.
        max_message_bytes: Longest message a valid task can have; a take never reads a longer
            one (see the module docstring).
        max_deliveries: Deliveries without a result that make a message a poison pill.
        dead_letters: ``(ttl_s, max_entries, max_body_bytes)`` of the queue's dead letters,
            for the messages the take itself dead-letters.
        result_key_prefix: Celery's result key prefix when results live in this Redis (a
            message whose result exists is not counted when given back), else "".
        lists: Every list of the queue, highest priority first (``worker/broker/priority.py``);
            ``queue`` is served first whether or not it is among them.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        queue: str,
        worker_id: str,
        lease_ttl_s: float,
        runners: int = 1,
        *,
        max_message_bytes: int = 64 << 20,
        max_deliveries: int = 3,
        dead_letters: tuple[int, int, int] = (7 * 86400, 10_000, 64 << 20),
        result_key_prefix: str = "celery-task-meta-",
        lists: Sequence[str] = (),
    ) -> None:
        self.redis = redis_client
        self.queue = queue
        self.lists = [queue, *(name for name in lists if name != queue)]
        self.poison = poison_key(queue)
        self.suspect = suspect_key(queue)
        self.result_key_prefix = result_key_prefix
        self.worker_id = worker_id
        self.lease_ttl_s = lease_ttl_s
        self.lease_key = lease_key(worker_id)
        self.max_message_bytes = max_message_bytes
        self.max_deliveries = max_deliveries
        self.dead_letters = dead_letters
        self.take_redis = capped_client(redis_client, max_message_bytes + _REPLY_SLACK_BYTES)
        # Takes stop this long before the lease could expire: a take must reach Redis while the
        # lease is certainly alive.
        self._lease_margin_s = lease_ttl_s / 10
        self._lease_until = -float("inf")
        self.lanes = [Lane(self, i) for i in range(runners)]
        #: Every lane of each runner: its first (``lanes``) and those taken ahead (``Lane.twin``).
        self._runner_lanes: list[list[Lane]] = [[lane] for lane in self.lanes]
        self._restore = redis_client.register_script(lua.RESTORE)
        self._give_back_unknown = redis_client.register_script(lua.GIVE_BACK_UNKNOWN)
        self._give_back_newest = redis_client.register_script(lua.GIVE_BACK_NEWEST)
        self._give_back_all = redis_client.register_script(lua.GIVE_BACK_ALL)
        self._release = redis_client.register_script(lua.RELEASE)
        self._recover = self.take_redis.register_script(lua.RECOVER)

    def renew_lease(self) -> None:
        """Set (or extend) this worker's lease to ``lease_ttl_s`` from now. Extending is a
        ``PEXPIRE``, which a Redis at ``maxmemory`` still accepts (a ``SET`` it refuses): a full
        Redis does not make live workers look dead to each other."""
        sent = time.monotonic()
        ttl_ms = int(self.lease_ttl_s * 1000)
        if not self.redis.pexpire(self.lease_key, ttl_ms):
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.lease_key, self.worker_id, px=ttl_ms)
            fleet.join(pipe, self.worker_id, self.queue)  # a member while it holds the lease
            # Only the lease's own reply counts: fleet keys Redis refuses (say, of another
            # type) cost the fleet's record, never the lease.
            lease_reply = pipe.execute(raise_on_error=False)[0]
            if isinstance(lease_reply, Exception):
                raise lease_reply
        # Redis counts the time to live from when it ran the SET, after `sent`.
        self._lease_until = sent + self.lease_ttl_s

    def check_lease(self) -> None:
        """Raises:
        LeaseLost: the lease was not renewed recently enough to be certainly alive."""
        if time.monotonic() > self._lease_until - self._lease_margin_s:
            raise LeaseLost(f"worker {self.worker_id} has no lease ({self.lease_key})")

    def queued(self) -> bool:
        """True when the queue (any priority), its suspects or its poison list hold a message;
        reads only (a wait that wrote, like ``BLMOVE``, is refused by a Redis at ``maxmemory``
        or a read-only replica)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in (*self.lists, self.suspect, self.poison):
            pipe.llen(name)
        return any(pipe.execute())

    def restore_dead(self) -> tuple[int, int]:
        """Give every dead worker's in-flight messages back to their queues (counting a
        delivery each), and this worker's lanes of batches already acked (Redis came back with
        older data).

        Returns:
            ``(moved, stale)``: messages of dead workers, messages of stale own lanes.
        """
        # Per runner, its oldest batch not yet acked: anything older of this worker's was acked.
        # Read before Redis looks: each lane's seq only grows.
        seqs = [min(lane.seq for lane in lanes) for lanes in self._runner_lanes]
        args: list[int | str] = [self.max_deliveries, DELIVERIES_TTL_S, self.result_key_prefix,
                                 self.worker_id, *seqs]  # fmt: skip
        moved, stale = self._restore(keys=[LANES_KEY], args=args)
        return int(moved), int(stale)

    def release(self) -> int:
        """At shutdown, after the runners stopped: give back every unacked message (counted as
        a delivery without a result), drop the lease, the registrations and the fleet
        membership (a clean shutdown: ``worker/broker/fleet.py`` records no loss).

        Returns:
            How many messages were given back.
        """
        args: list[int | str] = [self.queue, self.max_deliveries, DELIVERIES_TTL_S, self.worker_id,
                                 self.result_key_prefix]  # fmt: skip
        keys = [LANES_KEY, self.lease_key, fleet.MEMBERS_KEY, fleet.MISSING_KEY]
        moved = int(self._release(keys=keys, args=args))
        for lanes in self._runner_lanes:
            for lane in lanes:
                lane.settled()
        return moved


@dataclasses.dataclass
class _Runner:
    """What a runner's lanes share: the sequence of its batch numbers (acks come in that order)
    and what the last takes learnt about the queue."""

    next_seq: int = 0
    short: bool = False  # the last take found fewer messages than it asked for
    recent_max_bytes: int = 0  # largest message of the last takes, to size the next one
    urgent_until: float = -float("inf")  # see worker/broker/priority.py's URGENT_WINDOW_S
    takes: int = 0

    def seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1


class Lane:
    """The in-flight list of one runner's batch: one batch at a time, a new list for each.

    A runner that takes its next batch while it serves this one has a second lane,
    :meth:`twin`; the two share the runner's batch numbers, which its acks follow in order.
    Used by one thread at a time.

    Attributes:
        key: The current batch's list.
        seq: The current batch's number; moves on when the batch is acked (:meth:`settled`).
        held: How many messages of this batch the runner knows it holds (the right end).
        unsure: A take's outcome is unknown (its reply was lost): the list may hold more than
            ``held``; the next take sorts it out (``intake_lua.RECOVER``), or the ack gives it back.
    """

    def __init__(self, intake: Intake, index: int, runner: _Runner | None = None) -> None:
        self.intake = intake
        self.index = index
        self._runner = runner if runner is not None else _Runner()
        self.seq = self._runner.seq()
        self.key = lane_key(intake.worker_id, index, self.seq)
        self.held = 0
        self.unsure = False

    def twin(self) -> Lane:
        """A second lane of the same runner, for the batch taken while this one is served."""
        twin = Lane(self.intake, self.index, self._runner)
        self.intake._runner_lanes[self.index].append(twin)
        return twin

    def probe(self, pipe: redis.client.Pipeline) -> int:
        """Queue on ``pipe`` the reads a take plans with (how many messages each list holds), so
        that a round trip made anyway (the previous batch's settle) brings them: pass its
        replies from the returned index on to :meth:`take` as ``lengths``."""
        index = len(pipe)
        for name in (*self.intake.lists, self.intake.suspect, self.intake.poison):
            pipe.llen(name)
        return index

    def take(self, max_n: int, lengths: Sequence[int] | None = None) -> Taken:
        """Move up to ``max_n`` messages, oldest first, from the queue's lists (shared between
        priority levels by :func:`~imgq.worker.broker.priority.plan_take`; and one from the poison
        list) into this lane, atomically, reading at most one size-limit's worth of bytes; or,
        when there is a suspect, that suspect alone (the queue's messages go straight back).

        Args:
            max_n: The most messages to take.
            lengths: The replies of :meth:`probe`, read just before (else read here when the
                plan needs them: one more round trip).

        Returns:
            The messages, oldest first; empty when the queue is empty.

        Raises:
            LeaseLost: this worker's lease may have expired.
            redis.RedisError: the take failed; when its outcome is unknown, ``unsure`` is set
                and the next take sorts out the lane first.
        """
        self.intake.check_lease()
        if self.unsure:
            recovered = self._recover()
            if recovered.messages or recovered.oversized:
                return recovered
        intake = self.intake
        budget = intake.max_message_bytes
        runner = self._runner
        max_n = max(1, min(max_n, budget // max(1, runner.recent_max_bytes)))
        plan = [max_n]
        if lengths is None and (runner.short or len(intake.lists) > 1):
            # Ask how much each level holds: the plan shares the batch between priority levels
            # (worker/broker/priority.py), and after a short take it spares max_n LMOVEs for
            # nothing.
            pipe = intake.redis.pipeline(transaction=False)
            self.probe(pipe)
            lengths = pipe.execute()
        if lengths is not None:
            *levels, suspects, poisoned = (int(n) for n in lengths)
            if not any(levels) and not suspects and not poisoned:
                return Taken()
            now = time.monotonic()
            runner.takes += 1
            plan = plan_take(levels, max_n, recently_urgent=now < runner.urgent_until,
                             lower_turn=runner.takes % round(1 / LOWER_SHARE) == 0)  # fmt: skip
            if is_urgent(levels, plan):
                runner.urgent_until = now + URGENT_WINDOW_S
            max_n = sum(plan)
        pipe = intake.take_redis.pipeline(transaction=True)
        pipe.hset(LANES_KEY, self.key, intake.queue)  # registered before it can hold anything
        pipe.lmove(intake.poison, self.key, "RIGHT", "LEFT")
        pipe.lmove(intake.suspect, self.key, "RIGHT", "LEFT")
        for name, count in zip(intake.lists, plan, strict=False):
            for _ in range(count):
                pipe.lmove(name, self.key, "RIGHT", "LEFT")
        try:
            replies = pipe.execute()
        except ReplyTooLarge:
            self.unsure = True
            return self._recover()
        except redis.RedisError:
            self.unsure = True
            raise
        poison, suspect = replies[1], replies[2]
        moved = [m for m in replies[3:] if m is not None]
        everything = [m for m in (poison, suspect) if m is not None] + moved
        if any(len(m) > budget for m in everything):
            # Under the reply cap but over the limit: let Redis dead-letter it and sort the rest.
            self.unsure = True
            return self._recover()
        self.held += len(everything)
        if suspect is not None and moved:
            # A suspect may be what killed its last worker: it is served alone.
            self.give_back_newest(len(moved))
            moved = []
        messages = [m for m in (poison, suspect) if m is not None] + moved
        taken = Taken(messages, [poison is not None and i == 0 for i in range(len(messages))],
                      suspect=suspect is not None)  # fmt: skip
        runner.short = len(moved) < max_n
        runner.recent_max_bytes = max((len(m) for m in moved), default=0)
        return taken

    def _recover(self) -> Taken:
        """Serve what the lane holds beyond ``held`` (see ``intake_lua.RECOVER``)."""
        intake = self.intake
        ttl_s, max_entries, max_body = intake.dead_letters
        args: list[int | str] = [self.held, intake.max_message_bytes, intake.max_message_bytes,
                intake.max_deliveries, intake.worker_id, ttl_s, max_entries, max_body]  # fmt: skip
        entries = intake._recover(keys=[self.key, intake.queue, LANES_KEY], args=args)
        self.unsure = False
        taken = Taken()
        for entry in entries:
            if entry[0] == b"big":
                length, sha1, head, tail = entry[1:]
                taken.oversized.append(Oversized(int(length), sha1.decode(), head, tail))
            else:
                taken.messages.append(entry[2])
                taken.poisoned.append(entry[1] == b"1")
        self.held += len(taken.messages)
        self._runner.short = False
        self._runner.recent_max_bytes = max(
            [len(m) for m in taken.messages] + [o.length for o in taken.oversized], default=0
        )
        return taken

    def give_back_newest(self, count: int) -> int:
        """Give the newest ``count`` messages of the batch back to the head of the queue (not
        counted as a delivery): the batch is served in parts. Returns how many moved."""
        self._settle_unknown()
        moved = int(self.intake._give_back_newest(keys=[self.key, self.intake.queue], args=[count]))
        self.held -= moved
        return moved

    def give_back_all(self) -> None:
        """The whole batch, not started, back to the head of the queue (not counted as a
        delivery), and the lane unregistered: the next batch takes into a new lane."""
        self._settle_unknown()
        self.intake._give_back_all(keys=[self.key, self.intake.queue, LANES_KEY])
        self.settled()

    def prepare_ack(self) -> None:
        """Before the batch's ack: after a lost take reply, give back whatever the lane holds
        beyond ``held`` (it was never served), so that the ack deletes only served messages."""
        self._settle_unknown()

    def settled(self) -> None:
        """The batch is acked (or given back): the next take starts a new lane."""
        self.held = 0
        self.unsure = False
        self.seq = self._runner.seq()
        self.key = lane_key(self.intake.worker_id, self.index, self.seq)

    def _settle_unknown(self) -> None:
        if self.unsure:
            self.intake._give_back_unknown(keys=[self.key, self.intake.queue], args=[self.held])
            self.unsure = False
