"""`imgq health`: can this fleet serve right now? For container healthchecks and scripts.

Three checks, in order, one printed line each; the first that fails ends the run with exit 1
and names itself, so `docker inspect` or a script's log says what is wrong:

    redis   the broker (IMGQ_BROKER_URL) answers PING
    worker  imgq workers answer the ``imgq_status`` remote-control command (with ``--local``:
            those on this host); the line names every one that answered
    model   one of them at least has its model loaded; the line says what each serves

The whole run stays within ``--timeout`` seconds, so a dead Redis or an absent worker is reported
instead of hanging a healthcheck.

The worker side is the ``imgq_status`` remote-control command
(``worker/celeryapp/status.py``).
"""

from __future__ import annotations

import argparse
import re
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry

from imgq.worker.celeryapp.status import STATUS_COMMAND

if TYPE_CHECKING:
    from imgq.worker.settings import WorkerSettings

__all__ = ["local_node_pattern", "main"]


def local_node_pattern(hostname: str | None = None) -> str:
    """A regular expression matching Celery node names of workers on this host.

    Celery names a node ``name@host`` (``%h`` is the full host name); the pattern accepts the
    short host name with or without a domain.

    >>> bool(re.match(local_node_pattern("box7.example.com"), "imgq@box7.example.com"))
    True
    >>> bool(re.match(local_node_pattern("box7"), "imgq@box70"))
    False
    """
    short = (hostname or socket.gethostname()).split(".")[0]
    return rf"^[^@]+@{re.escape(short)}(\..*)?$"


def _check_redis(settings: WorkerSettings, timeout_s: float) -> str:
    client = settings.broker_client(
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # one attempt: the caller's deadline is the budget
    )
    try:
        start = time.perf_counter()
        client.ping()
        return f"answered PING in {(time.perf_counter() - start) * 1000:.1f} ms"
    finally:
        client.close()


#: After the first answer, how long the worker check waits for the next one before it stops
#: listening (``celery inspect``'s own default): workers answer within milliseconds of each
#: other unless one is busy, and a healthy fleet's check should not wait out ``--timeout``.
ANSWER_GAP_S = 1.0


class _Enough(Exception):
    """Raised from a reply callback to stop listening (kombu has no other way to end a collect
    early that does not count stray messages, see :func:`_ask_workers`)."""


def _ask_workers(app: Celery, deadline: float, local: bool) -> dict[str, Any]:
    """Every worker's answer to ``imgq_status``, by node name: the first answer within the
    deadline, then every answer that follows the previous one within :data:`ANSWER_GAP_S`.

    The command is the ping too: any Celery worker answers it (one that is not imgq's with an
    error, as for any unknown command), so a worker is named by what it answered, never by an
    earlier round trip. No ``limit=``: kombu counts every message it drains from this process's
    reply queue towards the limit, late replies to an earlier broadcast included, which can end
    the wait before any asked worker's answer arrived. The callback stops listening instead,
    also where one more quiet wait could run past the deadline.
    """
    where: dict[str, Any] = {"pattern": local_node_pattern(), "matcher": "pcre"} if local else {}
    answers: dict[str, Any] = {}

    def listen(gap_s: float, first_only: bool) -> None:
        def take(reply: Any) -> None:
            if isinstance(reply, dict):  # {node: answer}; anything else is no worker's
                answers.update(reply)
            if first_only or deadline - time.monotonic() < gap_s:
                raise _Enough

        try:
            app.control.broadcast(STATUS_COMMAND, reply=True, timeout=gap_s, callback=take, **where)
        except _Enough:
            pass

    listen(deadline - time.monotonic(), first_only=True)
    left_s = deadline - time.monotonic()
    if answers and left_s > 0:
        listen(min(ANSWER_GAP_S, left_s), first_only=False)
    return answers


def _names(nodes: Iterable[str]) -> str:
    return ", ".join(sorted(nodes))


def _model_line(statuses: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """Whether any answering imgq worker has its model loaded, and the model line: what each
    group of workers serves, then those still loading."""
    serving: dict[str, list[str]] = {}
    loading = []
    for node, status in sorted(statuses.items()):
        if not status.get("loaded"):
            loading.append(node)
            continue
        sha = str(status.get("sha256", ""))[:12]
        what = f"{status.get('model')} ({sha}) on {status.get('provider')}"
        serving.setdefault(what, []).append(node)
    parts = [
        f"{_names(nodes)} {'serve' if len(nodes) > 1 else 'serves'} {what}"
        for what, nodes in serving.items()
    ]
    if loading:
        parts.append(
            f"{_names(loading)} {'have' if len(loading) > 1 else 'has'} no model loaded yet"
        )
    return bool(serving), "; ".join(parts)


def main(args: argparse.Namespace) -> int:
    """Run the checks of ``imgq health [--timeout S] [--local]``; 0 when all pass, else 1."""
    from imgq.worker.celeryapp.app import make_app
    from imgq.worker.logs import mask_url
    from imgq.worker.settings import WorkerSettings

    if args.timeout <= 0:
        raise SystemExit(f"imgq health: --timeout must be > 0 seconds, got {args.timeout}")
    deadline = time.monotonic() + args.timeout

    def left_s() -> float:
        return max(0.1, deadline - time.monotonic())

    def report(check: str, ok: bool, detail: str) -> None:
        print(f"{check:<7} {'ok' if ok else 'FAIL'}  {detail}", flush=True)

    try:
        settings = WorkerSettings.from_env()
    except ValueError as exc:
        report("config", False, str(exc))
        return 1
    url = mask_url(settings.broker_url)
    try:
        detail = _check_redis(settings, left_s())
    except (redis.RedisError, OSError) as exc:
        report("redis", False, f"{url}: {type(exc).__name__}: {exc}")
        return 1
    report("redis", True, f"{url} {detail}")

    app = make_app(settings)
    where = f"on this host ({socket.gethostname()})" if args.local else "on the broker"
    try:
        answers = _ask_workers(app, deadline, args.local)
    except (OperationalError, redis.RedisError, OSError) as exc:
        report("worker", False, f"{url}: {type(exc).__name__}: {exc}")
        return 1
    statuses = {
        node: dict(s) for node, s in answers.items() if isinstance(s, dict) and "loaded" in s
    }
    others = sorted(answers.keys() - statuses.keys())
    if not statuses:
        if others:
            report("worker", False, f"{_names(others)} answered, but none is an imgq worker")
        else:
            report("worker", False, f"no imgq worker {where} answered in {args.timeout:g} s")
        return 1
    count = f"{len(statuses)} imgq worker{'s' if len(statuses) > 1 else ''}"
    extra = f" (not imgq: {_names(others)})" if others else ""
    report("worker", True, f"{count} answered: {_names(statuses)}{extra}")
    ok, detail = _model_line(statuses)
    report("model", ok, detail)
    if not ok:
        return 1
    _report_routing(settings)
    return 0


def _report_routing(settings: Any) -> None:
    """A warning line (the exit status stays 0: a client's mistake is not the worker's health)
    for imgq tasks waiting in Celery's default queue."""
    from imgq.worker.celeryapp.misrouting import advice, misrouted
    from imgq.worker.handlers import HANDLERS

    names = sorted(HANDLERS[h].task_name for h in settings.handlers if h in HANDLERS)
    client = settings.broker_client(socket_timeout=5, socket_connect_timeout=5)
    try:
        found = misrouted(client, names, settings.queue, lists=settings.queue_lists)
    except redis.RedisError as exc:
        print(f"{'routing':<7} ?     could not look: {exc}", flush=True)
        return
    finally:
        client.close()
    for queue, count in found.items():
        print(f"{'routing':<7} WARN  {advice(queue, count, settings.queue, '/'.join(names))}")
    if not found:
        print(f"{'routing':<7} ok    no imgq task waits in Celery's default queue", flush=True)
