"""The one place a Redis URL becomes a client: ``redis://``, ``rediss://``, ``unix://`` and
kombu's Sentinel list, ``sentinel://[:password@]h1:26379[/db];sentinel://h2:26379``.

A Sentinel URL names the sentinels, not the master: the client asks them for the master of
``master_name`` (a transport option, as in kombu and Celery) whenever it opens a connection, so
a client that loses its master finds the new one by itself (redis-py's
``SentinelManagedConnection``; a ``READONLY`` reply from a demoted master is a reconnect). A
master demoted while alive (``SENTINEL FAILOVER``, a partition) keeps accepting writes on the
connections it has until Sentinel turns it into a replica, seconds later, and those writes are
lost: every Sentinel-managed pool made here is therefore also checked once a second by a
background thread, and drops its connections to a master the sentinels no longer name.

Redis Cluster is refused, by URL scheme and by ``INFO cluster`` on every new connection: kombu
has no Cluster transport, and imgq's Lua scripts touch keys that Cluster would put in different
hash slots. A refusal is :class:`RedisRefused`, a ``RedisError`` that is not a connection error:
redis-py does not retry it, and every command prints it as the one line it is.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

__all__ = [
    "FOLLOW_INTERVAL_S",
    "SENTINEL_OPTIONS",
    "RedisRefused",
    "SentinelURL",
    "connect",
    "follow",
    "parse_sentinel_url",
    "results_options",
    "sibling",
    "url_problem",
]

#: kombu's default port of a sentinel.
SENTINEL_PORT = 26379
#: How often Sentinel-managed pools are checked against the master the sentinels name.
FOLLOW_INTERVAL_S = 1.0
#: The transport options that say how to reach a master through Sentinel (kombu's names).
SENTINEL_OPTIONS = ("master_name", "sentinel_kwargs", "min_other_sentinels")
_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
_SENTINEL_ADVICE = (
    "for failover use Redis Sentinel: IMGQ_BROKER_URL=sentinel://h1:26379;sentinel://h2:26379;"
    "sentinel://h3:26379 with master_name in IMGQ_BROKER_TRANSPORT_OPTIONS (docs/operations.md)"
)
#: What ``sentinel_kwargs`` may hold: a sentinel's client takes redis-py's connection options,
#: but where it is, redis-py's Sentinel says.
_CONNECTION_OPTIONS = frozenset(inspect.signature(redis.Redis.__init__).parameters) - {
    "self", "host", "port", "unix_socket_path", "connection_pool"}  # fmt: skip
_CLUSTER_WHY = (
    "imgq needs a single Redis: kombu has no Redis Cluster transport, and imgq's Lua scripts "
    "touch keys that Cluster would put in different hash slots"
)


class RedisRefused(redis.exceptions.RedisError):
    """A Redis imgq cannot use (a Cluster node), or a Sentinel group that monitors no master of
    the name given: a mistake in the configuration, not an outage, so nothing retries it."""


@dataclasses.dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` list: the sentinels, and the master's database and credentials
    (from the first URL of the list, as kombu and Celery read them)."""

    hosts: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelURL:
    """The sentinels, database and credentials of a ``sentinel://`` URL list.

    Raises:
        ValueError: not such a list, or its parts disagree (a later URL with another database
            or password, which kombu would ignore); the message says which part.

    >>> parsed = parse_sentinel_url("sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2")
    >>> parsed.hosts, parsed.db, parsed.password
    ((('10.0.0.1', 26379), ('10.0.0.2', 26379)), 2, 'pw')
    """
    hosts: list[tuple[str, int]] = []
    first: tuple[int, str | None, str | None] | None = None
    for i, chunk in enumerate(url.split(";")):
        where = f"part {i + 1} of the sentinel URL list"
        if not chunk.startswith("sentinel://"):
            raise ValueError(f"{where} must start with sentinel://")
        try:
            parts = urlsplit(chunk)
            port = parts.port or SENTINEL_PORT
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not parts.hostname:
            raise ValueError(f"{where} names no host")
        if parts.query or parts.fragment:
            raise ValueError(f"{where} has a query; put options in the transport options instead")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{where}: the database must be a number, got {path!r}")
        stated = (
            int(path or 0),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None,
        )
        if first is None:
            first = stated
        elif (path and stated[0] != first[0]) or (
            parts.password is not None and stated[1:] != first[1:]
        ):
            raise ValueError(
                f"{where} gives another database or password than the first; kombu and Celery "
                "read them from the first URL only"
            )
        hosts.append((parts.hostname, port))
    assert first is not None
    return SentinelURL(tuple(hosts), *first)


def url_problem(url: str, transport_options: Mapping[str, Any], options_name: str) -> str | None:
    """What keeps ``url`` (with its transport options, the variable ``options_name``) from
    being a Redis imgq can use, in one line; None when nothing does. Refuses Redis Cluster
    URLs with the reason and the Sentinel alternative.

    >>> url_problem("redis+cluster://h:7000", {}, "IMGQ_BROKER_TRANSPORT_OPTIONS")[:40]
    'redis+cluster:// is Redis Cluster, which'
    >>> url_problem("sentinel://h:26379", {}, "IMGQ_BROKER_TRANSPORT_OPTIONS")[:60]
    'a sentinel:// URL needs master_name in IMGQ_BROKER_TRANSPORT'
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if "cluster" in scheme:
        why = f"{_CLUSTER_WHY}; {_SENTINEL_ADVICE}"
        return f"{scheme}:// is Redis Cluster, which imgq refuses: {why}"
    if not url.startswith(_SCHEMES):
        return f"must be a Redis URL ({', '.join(_SCHEMES)})"
    if not url.startswith("sentinel://"):
        return None
    try:
        parse_sentinel_url(url)
    except ValueError as exc:
        return str(exc)
    name = transport_options.get("master_name")
    if not isinstance(name, str) or not name:
        return (
            f"a sentinel:// URL needs master_name in {options_name}, e.g. "
            '{"master_name": "mymaster"}'
        )
    kwargs = transport_options.get("sentinel_kwargs", {})
    if not isinstance(kwargs, dict):
        return f"sentinel_kwargs in {options_name} must be a JSON object"
    unknown = sorted(set(kwargs) - _CONNECTION_OPTIONS)
    if unknown:
        return (
            f"sentinel_kwargs in {options_name} has options redis-py does not know: "
            f"{', '.join(repr(k)[:40] for k in unknown[:5])}"
        )
    return None


def results_options(
    broker_url: str,
    broker_options: Mapping[str, Any],
    result_url: str,
    result_options: Mapping[str, Any],
) -> dict[str, Any]:
    """The result backend's transport options, with the broker's Sentinel options when both
    URLs name the same sentinels and the backend's options name no master of their own: the
    results follow the broker unless told otherwise, as the result backend's URL does.

    >>> results_options("sentinel://h", {"master_name": "m"}, "sentinel://h", {})
    {'master_name': 'm'}
    """
    out = dict(result_options)
    if result_url == broker_url and "master_name" not in out:
        out |= {k: broker_options[k] for k in SENTINEL_OPTIONS if k in broker_options}
    return out


def connect(
    url: str,
    transport_options: Mapping[str, Any] | None = None,
    *,
    options_name: str = "IMGQ_BROKER_TRANSPORT_OPTIONS",
    **kwargs: Any,
) -> redis.Redis:
    """A client of the Redis at ``url`` (of its master, for a Sentinel URL); connects lazily.

    Args:
        url: ``redis://``, ``rediss://``, ``unix://`` or a ``sentinel://`` list.
        transport_options: Celery's transport options of that URL: ``master_name`` (required
            with Sentinel), ``sentinel_kwargs`` (how to talk to the sentinels: a password,
            timeouts) and ``min_other_sentinels``, as in kombu.
        options_name: The variable those options come from, for error messages.
        **kwargs: redis-py connection options (``socket_timeout``, ``retry``, ...).

    Raises:
        ValueError: the URL or its options are refused (:func:`url_problem`).
    """
    options = transport_options or {}
    problem = url_problem(url, options, options_name)
    if problem:
        raise ValueError(problem)
    kwargs["redis_connect_func"] = _refuse_cluster
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    master_name = str(options["master_name"])
    # redis-py's default for the sentinels' connections is the socket options; kombu's
    # sentinel_kwargs (a password, other timeouts) win over them.
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    sentinel_kwargs |= options.get("sentinel_kwargs") or {}
    manager = _Sentinel(
        parsed.hosts,
        url=url,
        options_name=options_name,
        min_other_sentinels=int(options.get("min_other_sentinels", 0)),
        sentinel_kwargs=sentinel_kwargs,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **kwargs,
    )
    client = manager.master_for(master_name)
    follow(client)
    return client


def sibling(client: redis.Redis, connection_class: type, **overrides: Any) -> redis.Redis:
    """A new client with a pool of its own, to the same server as ``client`` (for a
    Sentinel-managed client: to the same master, rediscovered on each connection), whose
    connections are ``connection_class`` (a subclass of ``client``'s) with ``overrides``."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs, **overrides)
    if isinstance(pool, SentinelConnectionPool):
        kwargs.pop("connection_pool", None)  # the new pool's own proxy takes its place
        managed = SentinelConnectionPool(
            pool.service_name,
            pool.sentinel_manager,
            connection_class=connection_class,
            is_master=pool.is_master,
            check_connection=pool.check_connection,
            **kwargs,
        )
        _watch.add(managed)
        return redis.Redis(connection_pool=managed)
    new = redis.ConnectionPool(connection_class=connection_class, **kwargs)
    return redis.Redis(connection_pool=new)


def follow(client: redis.Redis) -> None:
    """Have ``client``'s connections follow the master the sentinels name (checked every
    :data:`FOLLOW_INTERVAL_S`); nothing for a client of a plain Redis URL. For clients made
    elsewhere too (Celery's result backend)."""
    if isinstance(client.connection_pool, SentinelConnectionPool):
        _watch.add(client.connection_pool)


def _refuse_cluster(connection: Any) -> None:
    """On every new connection, after redis-py's own handshake: refuse a Redis Cluster node."""
    connection.on_connect()
    connection.send_command("INFO", "cluster")
    try:
        info = connection.read_response()
    except redis.ResponseError:
        return  # a user not allowed INFO, a proxy without it: nothing to tell by
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    if "cluster_enabled:1" in text:
        where = f"{connection.host}:{connection.port}" if hasattr(connection, "port") else "it"
        raise RedisRefused(
            f"the Redis at {where} is a Redis Cluster node (cluster_enabled:1), which imgq "
            f"refuses: {_CLUSTER_WHY}; {_SENTINEL_ADVICE}"
        )


class _Sentinel(Sentinel):
    """redis-py's Sentinel, whose "no master" tells a name no sentinel monitors (a mistake,
    :class:`RedisRefused`) from a master that is down or being failed over (an outage)."""

    def __init__(self, hosts: Any, *, url: str, options_name: str, **kwargs: Any) -> None:
        super().__init__(hosts, **kwargs)
        self._where = ", ".join(f"{h}:{p}" for h, p in hosts)
        self._options_name = options_name

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)
        except MasterNotFoundError:
            known, errors = self._monitored()
            # redis-py's own message holds the repr of every sentinel client (a kilobyte).
            if known is None:
                raise MasterNotFoundError(
                    f"no sentinel at {self._where} answers for master {service_name!r}: "
                    + "; ".join(errors)
                ) from None
            if service_name in known:
                raise MasterNotFoundError(
                    f"the sentinels at {self._where} name no master {service_name!r} now "
                    "(it is down, or being failed over)"
                ) from None
            names = ", ".join(sorted(known)) or "none"
            raise RedisRefused(
                f"no sentinel at {self._where} monitors a master named {service_name!r} "
                f"(master_name in {self._options_name}); they monitor: {names}"
            ) from None

    def _monitored(self) -> tuple[set[str] | None, list[str]]:
        """The master names the answering sentinels monitor (None when none answers), and why
        each that did not answer did not."""
        names: set[str] | None = None
        errors = []
        for sentinel in self.sentinels:
            try:
                masters = sentinel.sentinel_masters()
            except redis.RedisError as exc:
                kwargs = sentinel.connection_pool.connection_kwargs
                errors.append(f"{kwargs.get('host')}:{kwargs.get('port')}: {exc}")
                continue
            names = (names or set()) | {str(name) for name in masters}
        return names, errors


class _MasterWatch:
    """A daemon thread, while the process has Sentinel-managed pools, that asks the sentinels
    every :data:`FOLLOW_INTERVAL_S` for each pool's master. redis-py's pool then drops its idle
    connections to an old master, and the busy ones when they come back, so the next command
    reaches the new master even while the old one still accepts writes."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = 0  # the process whose thread runs; 0: none runs

    def add(self, pool: SentinelConnectionPool) -> None:
        with self._lock:
            self._pools.add(pool)
            if self._pid != os.getpid():  # none runs, or this is a forked child without it
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="imgq-sentinel-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(FOLLOW_INTERVAL_S)
            with self._lock:
                pools = list(self._pools)
                if not pools:  # every client was dropped: the next add() starts a thread
                    self._pid = 0
                    return
            for pool in pools:
                try:
                    pool.get_master_address()
                except redis.RedisError:
                    pass  # no master named right now: connections rediscover on their own


_watch = _MasterWatch()
