"""`imgq health`: can this fleet serve right now? For container healthchecks and scripts.

Three checks, in order, one printed line each; the first that fails ends the run with exit 1
and names itself, so `docker inspect` or a script's log says what is wrong:

    redis   the broker (IMGQ_BROKER_URL) answers PING
    worker  an imgq worker answers a Celery ping (with ``--local``: one on this host)
    model   that worker has its model loaded (the ``imgq_status`` remote-control command)

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
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
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


def _ping_worker(app: Celery, timeout_s: float, local: bool) -> list[str]:
    """Names of the workers that answer a ping: waits for the first, then up to a second more
    for the others (a plain Celery worker on the same Redis answers pings too)."""
    where: dict[str, Any] = {"pattern": local_node_pattern(), "matcher": "pcre"} if local else {}
    replies = app.control.ping(timeout=timeout_s, limit=1, **where)
    if not replies:
        return []
    replies += app.control.ping(timeout=min(1.0, timeout_s), **where)
    return sorted({name for reply in replies for name in reply})


def _model_status(app: Celery, nodes: list[str], timeout_s: float) -> tuple[str, dict[str, Any]]:
    """The first of ``nodes`` that answers as an imgq worker (its model status), preferring one
    whose model is loaded; ``("", {})`` when none does."""
    replies = app.control.broadcast(
        STATUS_COMMAND, destination=nodes, reply=True, timeout=timeout_s, limit=len(nodes)
    )
    found = [(node, dict(status)) for reply in replies for node, status in reply.items()
             if isinstance(status, dict) and "loaded" in status]  # fmt: skip
    found.sort(key=lambda item: (not item[1].get("loaded"), item[0]))
    return found[0] if found else ("", {})


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
    nodes = _ping_worker(app, left_s(), args.local)
    if not nodes:
        report("worker", False, f"no imgq worker {where} answered a ping in {args.timeout:g} s")
        return 1
    node, status = _model_status(app, nodes, left_s())
    if not node:
        report("worker", False, f"{', '.join(nodes)} answered a ping, but none is an imgq worker")
        return 1
    report("worker", True, f"{node} answered a ping")
    if not status.get("loaded"):
        report("model", False, f"{node} has no model loaded yet")
        return 1
    sha = str(status.get("sha256", ""))[:12]
    report(
        "model", True, f"{node} serves {status.get('model')} ({sha}) on {status.get('provider')}"
    )
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
