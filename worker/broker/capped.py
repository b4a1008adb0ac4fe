"""A Redis client whose replies are bounded in bytes, so a hostile message is never read whole.

A worker takes messages with ``LMOVE``s whose replies carry the messages themselves: one
message of 100 MiB in the queue would be read into the worker's memory before any check could
refuse it. Redis cannot report an element's length without returning it, so the bound is put
where the bytes arrive: the connection counts what it receives for the command it last sent and
raises :class:`ReplyTooLarge` (dropping the connection, unread bytes and all) once that exceeds
``max_reply_bytes``. The caller then asks Redis to sort the messages by size itself
(``worker/broker/intake.py``, a Lua script that sees each message's length inside Redis).

The count wraps the socket that redis-py's parsers read (``Connection._connect`` returns it), so
it works with the hiredis and the pure-Python parser, over TCP, TLS and Unix sockets, and with a
Sentinel-managed master (the counting class derives from redis-py's ``SentinelManagedConnection``).
"""

from __future__ import annotations

import socket
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imgq.worker.broker.connection import sibling

__all__ = ["ReplyTooLarge", "capped_client"]


class ReplyTooLarge(redis.RedisError):
    """A reply grew past the client's ``max_reply_bytes``; the connection was dropped.

    Not a ``ConnectionError``: redis-py must not resend the command (it ran), and the caller
    must know the reply was refused, not lost.
    """


class _CountingSocket:
    """A socket that counts the bytes received since the last send and refuses more than the cap."""

    __slots__ = ("_sock", "_cap", "_received")

    def __init__(self, sock: socket.socket, cap: int) -> None:
        self._sock = sock
        self._cap = cap
        self._received = 0

    def _count(self, n: int) -> None:
        self._received += n
        if self._received > self._cap:
            raise ReplyTooLarge(
                f"a reply exceeded {self._cap} bytes; the connection was dropped unread"
            )

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = self._sock.recv_into(buffer, nbytes, flags)
        if not flags & socket.MSG_PEEK:
            self._count(n)
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = self._sock.recv(bufsize, flags)
        if not flags & socket.MSG_PEEK:
            self._count(len(data))
        return data

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._received = 0  # a new command: its reply starts now
        self._sock.sendall(data, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _capped_class(base: type[redis.connection.AbstractConnection], cap: int) -> type:
    """A subclass of redis-py's connection class ``base`` whose sockets count their replies."""

    def _connect(self: Any) -> Any:
        return _CountingSocket(base._connect(self), cap)

    return type(f"Capped{base.__name__}", (base,), {"_connect": _connect})


def capped_client(client: redis.Redis, max_reply_bytes: int) -> redis.Redis:
    """A new client to the same server as ``client`` whose replies may not exceed
    ``max_reply_bytes``, and which never retries a command by itself (the caller owns retries:
    a retried take would move messages twice).

    Args:
        client: A client built by ``worker/broker/connection.py``; its connection settings
            (host or Sentinel master, TLS, password, database, timeouts) are copied.
        max_reply_bytes: Most bytes one reply (one command, or one pipeline) may have.

    Raises:
        ValueError: ``max_reply_bytes`` is not a positive integer.
    """
    if not isinstance(max_reply_bytes, int) or max_reply_bytes < 1:
        raise ValueError(f"max_reply_bytes must be a positive integer, got {max_reply_bytes!r}")
    capped = _capped_class(client.connection_pool.connection_class, max_reply_bytes)
    return sibling(client, capped, retry=Retry(NoBackoff(), 0))
