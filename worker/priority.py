"""A queue's Redis lists, the way kombu's Redis transport names them, and how a take shares a
batch between its priority levels.

kombu puts a message of priority ``p`` on the list of the largest step ``<= p`` of
``priority_steps`` (``[0, 3, 6, 9]`` by default): the queue's own name for step 0, else
``<queue>\\x06\\x16<step>``; its consumers pop the lists in step order, so 0 is the highest
priority. A Celery user changes this with ``broker_transport_options`` (``priority_steps``,
``sep``, ``global_keyprefix``); the worker reads the same dictionary
(``IMGQ_BROKER_TRANSPORT_OPTIONS``), so client and worker agree on the list names.

kombu pops one message at a time, always from the highest non-empty level: a steady flow of
urgent tasks starves the rest forever. A take here fills a batch from the highest levels first
but keeps :data:`LOWER_SHARE` of its places for lower levels that have messages waiting, so under
any load every level moves at least at that share of the throughput, and urgent tasks wait at
most for the batch in hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["LOWER_SHARE", "PRIORITY_STEPS", "QueueLists", "plan_take"]

#: kombu's defaults (``kombu.transport.redis``).
PRIORITY_STEPS = (0, 3, 6, 9)
SEP = "\x06\x16"
#: Places of a batch (at least one, from batches of two) kept for lower priority levels.
LOWER_SHARE = 1 / 8
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
        """Every list of ``queue``, in the order they are served."""
        return [self._name(queue, step) for step in self.steps]

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


def plan_take(lengths: Sequence[int], n: int) -> list[int]:
    """How many messages to take from each level (highest first) for a batch of ``n``.

    Higher levels first, except that :data:`LOWER_SHARE` of the batch (at least one place when
    ``n >= 2``) is kept for the levels below while they have messages; places nobody below
    needs go back to the higher levels.

    >>> plan_take([100, 0, 0, 100], 32)
    [28, 0, 0, 4]
    >>> plan_take([3, 0, 0, 100], 32)
    [3, 0, 0, 29]
    >>> plan_take([100, 0, 0, 2], 32)
    [30, 0, 0, 2]
    >>> plan_take([5, 7], 1)
    [1, 0]
    """
    n = max(0, n)
    lengths = [max(0, int(x)) for x in lengths]
    keep = max(1, int(n * LOWER_SHARE)) if n >= 2 else 0
    waiting_below = [sum(lengths[i + 1 :]) for i in range(len(lengths))]
    plan = [0] * len(lengths)
    left = n
    for i, length in enumerate(lengths):
        reserved = min(keep, waiting_below[i])
        plan[i] = min(length, max(0, left - reserved))
        left -= plan[i]
    for i, length in enumerate(lengths):
        more = min(length - plan[i], left)
        plan[i] += more
        left -= more
    return plan
