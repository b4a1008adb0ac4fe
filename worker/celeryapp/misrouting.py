"""imgq tasks waiting in a queue that imgq workers do not serve: a client that sent without
``queue="imgq"`` (a plain Celery app sends a task it has no route for to Celery's default queue,
``celery``), where its task stays PENDING with nothing to say why.

:func:`misrouted` looks at the oldest and the newest message of each candidate queue, inside
Redis and only at their last 4 kB (kombu writes the headers, task name included, after the
body), so it ships no message and reads a bounded amount whatever is queued. The worker logs
what it finds at start, and ``imgq health`` reports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from imgq.worker.broker.priority import QueueLists

__all__ = ["CELERY_DEFAULT_QUEUE", "advice", "misrouted"]

#: Where a plain Celery app sends a task it has no route for.
CELERY_DEFAULT_QUEUE = "celery"

# KEYS: candidate queues. ARGV: task names. Per queue: its length when it is a list whose oldest
# or newest message names one of the tasks in its last 4 kB, else 0.
_SCAN = """
local out = {}
for i, q in ipairs(KEYS) do
  out[i] = 0
  if redis.call('TYPE', q).ok == 'list' then
    local n = redis.call('LLEN', q)
    for _, at in ipairs({-1, 0}) do
      local tail = string.sub(redis.call('LINDEX', q, at) or '', -4096)
      for _, name in ipairs(ARGV) do
        if string.find(tail, '"task": "' .. name .. '"', 1, true)
            or string.find(tail, '"task":"' .. name .. '"', 1, true) then
          out[i] = n
        end
      end
    end
  end
end
return out
"""


_KOMBU_LISTS = QueueLists()


def misrouted(
    client: redis.Redis,
    task_names: Sequence[str],
    serving: str,
    queues: Sequence[str] = (CELERY_DEFAULT_QUEUE,),
    lists: QueueLists = _KOMBU_LISTS,
) -> dict[str, int]:
    """Lists of queues other than ``serving`` (each priority level's, named as ``lists`` says)
    whose oldest or newest message is one of ``task_names``, with their lengths; empty when
    there is none."""
    candidates = [name for q in queues if q != serving for name in lists.names(q)]
    if not candidates or not task_names:
        return {}
    counts = client.eval(_SCAN, len(candidates), *candidates, *task_names)
    return {q: int(n) for q, n in zip(candidates, counts, strict=True) if int(n) > 0}


def advice(queue: str, count: int, serving: str, task_name: str) -> str:
    """What an operator reads: where the tasks wait, and the client setting that fixes it.

    >>> advice("celery", 3, "imgq", "imgq.classify")  # doctest: +ELLIPSIS
    "3 messages wait in queue 'celery' ... send with queue='imgq', or set task_routes=..."
    """
    return (
        f"{count} messages wait in queue {queue!r} with {task_name} tasks among them, and imgq "
        f"workers here serve {serving!r}: they stay PENDING unless a worker serves {queue!r}. "
        f"In the client, send with queue={serving!r}, or set task_routes="
        f"{{{task_name!r}: {{'queue': {serving!r}}}}} in its Celery app"
    )
