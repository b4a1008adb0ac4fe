"""`imgq dlq list | show ID | requeue ID | purge`: the dead letters of a queue, for operators.

The broker URL, the queue (``--queue`` wins over ``IMGQ_QUEUE``) and the dead-letter limits come
from :meth:`WorkerSettings.from_env`, so the command sees what the workers write. Only redis and
the standard library are imported. What is printed is escaped: a dead letter's text comes from
whoever sent the message. Exit status: 0 done, 1 failed (Redis, unknown id, message not kept),
2 usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imgq.shared.errors import ImgqError
from imgq.worker.broker.deadletters import (
    BODY_STATES,
    DeadLetter,
    DeadLetterLimits,
    DeadLetters,
    escape_bytes,
)
from imgq.worker.logs import mask_url
from imgq.worker.settings import WorkerSettings

__all__ = ["list_main", "show_main", "requeue_main", "purge_main"]

_PROG = "imgq dlq"
#: Seconds to connect and to wait for a reply: an operator's command should fail, not hang.
_SOCKET_TIMEOUT_S = 10.0


class _Usage(ImgqError):
    """What the user asked for cannot be done as asked; exit status 2."""


def list_main(args: argparse.Namespace) -> int:
    """``imgq dlq list [--count N] [--json]``: newest first, then a summary."""
    if args.count < 1:
        return _fail(f"--count must be >= 1, got {args.count}", 2)
    return _run(args, _list)


def show_main(args: argparse.Namespace) -> int:
    """``imgq dlq show ID [--body FILE]``: one dead letter; its raw message into FILE."""
    return _run(args, _show)


def requeue_main(args: argparse.Namespace) -> int:
    """``imgq dlq requeue ID``: the kept raw message goes back onto the queue."""
    return _run(args, _requeue)


def purge_main(args: argparse.Namespace) -> int:
    """``imgq dlq purge --yes``: delete every dead letter of the queue and its kept messages."""
    return _run(args, _purge)


def _run(
    args: argparse.Namespace, action: Callable[[argparse.Namespace, DeadLetters], None]
) -> int:
    """Build the dead letters of the configured queue, run ``action``, map failures to exits."""
    try:
        settings = WorkerSettings.from_env(queue=args.queue)
    except ValueError as exc:
        return _fail(str(exc), 2)
    timeouts = {"socket_connect_timeout": _SOCKET_TIMEOUT_S, "socket_timeout": _SOCKET_TIMEOUT_S}
    client = settings.broker_client(retry=Retry(NoBackoff(), 1), **timeouts)
    results = client
    if not settings.results_in_broker:
        results = settings.results_client(retry=Retry(NoBackoff(), 1), **timeouts)
    limits = DeadLetterLimits.from_settings(settings)
    try:
        action(args, DeadLetters(client, settings.queue_list, limits, results=results))
        return 0
    except _Usage as exc:
        return _fail(str(exc), 2)
    except ImgqError as exc:
        return _fail(str(exc), 1)
    except redis.RedisError as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return _fail(f"Redis at {mask_url(settings.broker_url)}: {detail}", 1)
    except OSError as exc:
        return _fail(str(exc), 1)
    finally:
        client.close()
        if results is not client:
            results.close()


def _fail(message: str, status: int) -> int:
    print(f"{_PROG}: {message}", file=sys.stderr)
    return status


# ------------------------------------------------------------------------------- actions


def _list(args: argparse.Namespace, dead: DeadLetters) -> None:
    letters = dead.list(args.count)
    stats = dead.stats()
    if args.json:
        print(json.dumps({"entries": [d.to_dict() for d in letters], "stats": stats}, indent=2))
        return
    for letter in letters:
        print(_line(letter))
    print(_summary(stats))


def _show(args: argparse.Namespace, dead: DeadLetters) -> None:
    letter, body = dead.show(args.id)
    rows = letter.to_dict()
    for name in ("id", "time", "reason", "detail", "task_id", "length", "sha1", "worker", "body"):
        value = rows[name]
        print(f"{name:<8} {'-' if value is None else _printable(str(value))}")
    print(f"{'head':<8} {rows['head']}")
    print(f"{'':<8} ({letter.body}: {BODY_STATES.get(letter.body, 'unknown state')})")
    if args.body is None:
        return
    if body is None:
        raise ImgqError(f"the message is not kept ({letter.body}); nothing written to {args.body}")
    Path(args.body).write_bytes(body)
    print(f"wrote the {len(body)}-byte message to {args.body}")


def _requeue(args: argparse.Namespace, dead: DeadLetters) -> None:
    letter = dead.requeue(args.id)
    task = _printable(letter.task_id or "-")
    print(f"requeued {letter.id} (task {task}, {letter.length} B) onto queue {dead.queue!r}")


def _purge(args: argparse.Namespace, dead: DeadLetters) -> None:
    if not args.yes:
        raise _Usage(
            f"purge deletes every dead letter of queue {dead.queue!r} and its kept messages; "
            "nothing was deleted: run it again with --yes"
        )
    print(f"purged {dead.purge()} dead letters of queue {dead.queue!r}")


# ------------------------------------------------------------------------------- output


def _printable(text: str) -> str:
    """The text, with anything a terminal would act on escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _time(time_s: float | None) -> str:
    if time_s is None:
        return "-"
    return datetime.fromtimestamp(time_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(letter: DeadLetter) -> str:
    head = escape_bytes(letter.head[:60])
    return (
        f"{letter.id:<16} {_time(letter.time_s)} {_printable(letter.reason):<21} "
        f"task={_printable(letter.task_id or '-')} {letter.length} B body={letter.body} "
        f"head={head}{'...' if len(letter.head) > 60 else ''}"
    )


def _size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} B"
    size = n_bytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _summary(stats: dict[str, Any]) -> str:
    return (
        f"queue {stats['queue']!r}: {stats['entries']} dead letters (at most "
        f"{stats['max_entries']}, each for {stats['ttl_s']} s), {stats['kept_bodies']} raw "
        f"messages kept in {_size(stats['kept_bytes'])} of {_size(stats['max_body_bytes'])}; "
        f"oldest {_time(stats['oldest_time_s'])}, newest {_time(stats['newest_time_s'])}"
    )
