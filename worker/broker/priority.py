"""A queue's Redis lists, the way kombu's Redis transport names them, and how a take shares a
batch between its priority levels.

kombu puts a message of priority ``p`` on the list of the largest step ``<= p`` of
``priority_steps`` (``[0, 3, 6, 9]`` by default): the queue's own name for step 0, else
``<queue>\\x06\\x16<step>``; its consumers pop the lists in step order, so 0 is the highest
priority. A Celery user changes this with ``broker_transport_options`` (``priority_steps``,
``sep``, ``global_keyprefix``); the worker reads the same dictionary
(``IMGQ_BROKER_TRANSPORT_OPTIONS``), so client and worker agree on the list names.

kombu pops one message at a time, always from the highest non-empty level: a steady flow of
urgent tasks starves the rest forever. A take here (:func:`plan_take`) serves the highest level
with messages but keeps :data:`LOWER_SHARE` of the batch's places for the lower levels that have
messages waiting, one each in turn, so every level keeps moving under any load; and it does not
fill a batch of urgent tasks up with the backlog, so an urgent task waits for the batch in hand
and then rides in a small batch, not in a full one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["LOWER_SHARE", "PRIORITY_STEPS", "URGENT_WINDOW_S", "QueueLists", "is_urgent",
           "plan_take"]  # fmt: skip

#: kombu's defaults (``kombu.transport.redis``).
PRIORITY_STEPS = (0, 3, 6, 9)
SEP = "\x06\x16"
#: Places of a batch (at least one, from batches of two) kept for lower priority levels.
LOWER_SHARE = 1 / 8
#: For this long after a batch served a level above others that wait, a batch of the lowest
#: waiting level alone is at most half full: the next urgent task waits for half a batch.
URGENT_WINDOW_S = 1.0
_STRATEGIES = ("round_robin", "sorted", "priority")


@dataclasses.dataclass(frozen=True)
class QueueLists:
    """The Redis lists a queue's messages wait in, highest priority first.

    >>> QueueLists().names("imgq")[:2]
    ['imgq', 'imgq\\x06\\x163']
    >>> QueueLists((0, 5)).list_for("imgq", 7)
    'imgq\\x06\\x165'
    """

    steps: tuple[int, ...] = PRIORITY_STEPS
    sep: str = SEP
    prefix: str = ""

    def names(self, queue: str) -> list[str]:
        """Every list of ``queue``, in the order they are served: the queue's own first (where
        a message without a priority step goes, and what is given back), then the steps'."""
        home = self.home(queue)
        levels = [self._name(queue, step) for step in self.steps]
        return [home, *(name for name in levels if name != home)]

    def home(self, queue: str) -> str:
        """The queue's own list (under the key prefix): served first, where given-back and
        due messages go, and the name of imgq's keys for the queue (dead letters, ``eta``)."""
        return f"{self.prefix}{queue}"

    def list_for(self, queue: str, priority: int) -> str:
        """The list kombu puts a message of ``priority`` (0-9) on."""
        below = [s for s in self.steps if s <= priority]
        return self._name(queue, below[-1] if below else self.steps[-1])

    def _name(self, queue: str, step: int) -> str:
        return f"{self.prefix}{queue}{self.sep}{step}" if step else f"{self.prefix}{queue}"

    @classmethod
    def from_transport_options(cls, options: Mapping[str, Any]) -> QueueLists:
        """The lists as kombu derives them from Celery's ``broker_transport_options``.

        Raises:
            ValueError: an option kombu would not accept, or would read differently.

        >>> QueueLists.from_transport_options({"priority_steps": [0, 9]}).steps
        (0, 9)
        >>> QueueLists.from_transport_options({"priority_steps": [9, 0]})
        Traceback (most recent call last):
        ...
        ValueError: priority_steps must be distinct integers 0-9 in increasing order, got [9, 0]
        """
        steps = options.get("priority_steps", PRIORITY_STEPS)
        if (
            not isinstance(steps, list | tuple)
            or not steps
            or not all(type(s) is int and 0 <= s <= 9 for s in steps)
            or list(steps) != sorted(set(steps))
        ):
            raise ValueError(
                "priority_steps must be distinct integers 0-9 in increasing order, "
                f"got {steps!r:.80}"
            )
        sep = options.get("sep", SEP)
        prefix = options.get("global_keyprefix", "")
        for name, value in (("sep", sep), ("global_keyprefix", prefix)):
            if not isinstance(value, str) or len(value) > 64:
                raise ValueError(f"{name} must be a string of at most 64 characters")
        if not sep:
            raise ValueError("sep must not be empty")
        strategy = options.get("queue_order_strategy", "round_robin")
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"queue_order_strategy must be one of {_STRATEGIES}, got {strategy!r:.40}"
            )
        return cls(tuple(steps), sep, prefix)


def plan_take(
    lengths: Sequence[int], n: int, recently_urgent: bool = False, lower_turn: bool = False
) -> list[int]:
    """How many messages to take from each level (highest first) for a batch of up to ``n``.

    The highest level with messages gets up to ``n`` places less :data:`LOWER_SHARE` of them
    (at least one when ``n >= 2``), which go one by one, in turn, to the lower levels that have
    messages, so none of them starves. Places the highest level leaves empty are not filled
    with lower tasks: an urgent task rides in a small batch instead of a full batch of the
    backlog (it waits for the batch in hand, not for two). While ``recently_urgent`` (a batch
    served urgent tasks less than :data:`URGENT_WINDOW_S` ago), a batch of a single level is at
    most half full, so the next urgent task waits for half a batch in hand, not a whole one.
    A batch of one has no place to keep: it goes to a lower level when ``lower_turn`` (every
    eighth take, :data:`LOWER_SHARE`).

    >>> plan_take([100, 0, 0, 100], 32)
    [28, 0, 0, 4]
    >>> plan_take([3, 0, 0, 100], 32)
    [3, 0, 0, 4]
    >>> plan_take([3, 1, 0, 100], 32)
    [3, 1, 0, 3]
    >>> plan_take([0, 0, 0, 100], 32)
    [0, 0, 0, 32]
    >>> plan_take([0, 0, 0, 100], 32, recently_urgent=True)
    [0, 0, 0, 16]
    >>> plan_take([5, 7], 1), plan_take([5, 7], 1, lower_turn=True)
    ([1, 0], [0, 1])
    """
    lengths = [max(0, int(x)) for x in lengths]
    plan = [0] * len(lengths)
    waiting = [i for i, length in enumerate(lengths) if length > 0]
    if not waiting or n <= 0:
        return plan
    top, lower = waiting[0], waiting[1:]
    keep = max(1, int(n * LOWER_SHARE)) if n >= 2 else int(lower_turn)
    keep = min(keep, sum(lengths[i] for i in lower))
    if recently_urgent and not lower:
        n = max(1, n // 2)
    plan[top] = min(lengths[top], n - keep)
    while keep > 0:
        for i in lower:
            if keep > 0 and plan[i] < lengths[i]:
                plan[i] += 1
                keep -= 1
    return plan


def is_urgent(lengths: Sequence[int], plan: Sequence[int]) -> bool:
    """Whether a batch of ``plan`` served a level while a lower one had messages waiting.

    >>> is_urgent([3, 0, 9], [1, 0, 0]), is_urgent([0, 0, 9], [0, 0, 8])
    (True, False)
    """
    served = [i for i, count in enumerate(plan) if count]
    return bool(served) and any(lengths[i] for i in range(served[0] + 1, len(lengths)))
