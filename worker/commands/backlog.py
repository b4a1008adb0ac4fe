"""`imgq backlog [--json] [--queue Q ...]`: a queue's backlog, read once
(``worker/broker/backlog.py``): what waits, what is in workers' batches, what is due and
scheduled, and how long the oldest ready message has waited.

Only redis and the standard library are imported (no model, no Celery), so it answers in a
fraction of a second. Exit status: 0 read, 1 Redis failed, 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imgq.worker.broker.backlog import Backlog, BacklogReader
from imgq.worker.logs import mask_url
from imgq.worker.settings import WorkerSettings

__all__ = ["main", "readers", "redis_client"]

#: Seconds to connect and to wait for a reply: a command (or a scrape) fails, never hangs.
SOCKET_TIMEOUT_S = 5.0
_SOURCES = {
    "sent_at": "from its imgq_sent_at header",
    "eta": "from its eta, which came after it was sent",
    "observed": "since first seen",
    "": "",
}


def redis_client(settings: WorkerSettings) -> redis.Redis:
    """A client of the broker's Redis (its master, through Sentinel) for reads that must fail
    fast (one retry, short timeouts)."""
    return settings.broker_client(
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def readers(
    settings: WorkerSettings, queues: Sequence[str] | None, client: redis.Redis
) -> list[BacklogReader]:
    """One reader per queue (``settings.queue`` when none is named; one named twice is read
    once), each name checked as ``IMGQ_QUEUE`` is.

    Raises:
        ValueError: a queue name a worker would refuse.
    """
    names = list(dict.fromkeys(queues or [settings.queue]))
    for name in names:
        WorkerSettings.from_env({}, queue=name)  # the same check as IMGQ_QUEUE's
    return [BacklogReader(client, name, settings.queue_lists) for name in names]


def main(args: argparse.Namespace) -> int:
    """``imgq backlog``: print each queue's backlog; ``--json``: one JSON object per queue."""
    try:
        settings = WorkerSettings.from_env()
        client = redis_client(settings)
        queue_readers = readers(settings, args.queue, client)
    except ValueError as exc:
        print(f"imgq backlog: {exc}", file=sys.stderr)
        return 2
    try:
        backlogs = [reader.read() for reader in queue_readers]
    except redis.RedisError as exc:
        print(
            f"imgq backlog: cannot read Redis at {mask_url(settings.broker_url)}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        client.close()
    for backlog in backlogs:
        if args.json:
            print(json.dumps(backlog.as_json(), sort_keys=True))
        else:
            print(describe(backlog))
    return 0


def describe(backlog: Backlog) -> str:
    """The backlog for people: one line per state, then the oldest ready message's wait.

    >>> print(describe(Backlog("imgq", 5, 2, 1, 0, 3.25, "sent_at", 0, {"imgq": 5}, 0.0)))
    queue imgq at 1970-01-01T00:00:00Z (Redis's clock)
      ready          5  imgq: 5
      in_flight      2
      due            1
      scheduled      0
      total          8
      oldest_age  3.2 s  from its imgq_sent_at header
    """
    at = datetime.fromtimestamp(backlog.read_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lists = ", ".join(f"{key}: {n}" for key, n in backlog.as_json()["ready_lists"].items() if n)
    total = sum(backlog.states().values())
    lines = [f"queue {backlog.queue} at {at} (Redis's clock)"]
    lines.append(f"  ready      {backlog.ready:>5}  {lists}".rstrip())
    for state in ("in_flight", "due", "scheduled"):
        lines.append(f"  {state:<10} {getattr(backlog, state):>5}")
    lines.append(f"  total      {total:>5}")
    age = f"  oldest_age {backlog.oldest_age_s:>4.1f} s  {_SOURCES[backlog.oldest_age_from]}"
    if backlog.untimed:
        age += (f"; {backlog.untimed} message(s) at the ends of the lists carry no time: "
                "their wait is unknown")  # fmt: skip
    lines.append(age.rstrip())
    return "\n".join(lines)
