"""One webhook POST: the signature, the request bounded in time and bytes, and what its answer
means for a retry. No Redis here; :mod:`~imgq.worker.drift.notify` decides what to send, when,
and by whom.

The signature is Stripe's scheme: ``X-Imgq-Signature: t=<unix seconds>,v1=<hex>``, where
``<hex>`` is HMAC-SHA256 with the shared secret over ``"<t>." + body`` (the exact bytes sent).
A receiver recomputes it, compares in constant time, and refuses a ``t`` older than a few
minutes, so a captured request cannot be replayed later (``docs/operations.md`` has the code).
Each attempt is signed afresh, so a retry after a long back-off still carries a recent ``t``.

Hostile receivers are expected: a redirect is not followed (a webhook that moved is a
configuration error, and following it would send the signed body elsewhere), at most
:data:`RESPONSE_BYTES_READ` bytes of an answer are read, and the whole attempt, connect to last
byte, is bounded by ``timeout_s``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import http.client
import random
import socket
import threading
import time
from urllib.parse import unquote, urlsplit

__all__ = [
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "Attempt",
    "backoff_s",
    "header_safe",
    "post",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "X-Imgq-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Most bytes of a receiver's answer read (kept, cut, in the dead letter); the rest is dropped.
RESPONSE_BYTES_READ = 1024
#: Longest header value sent (an idempotency key made of hostile parts stays bounded).
HEADER_MAX_CHARS = 200
#: Answers that mean "try again later": request timeout, too many requests.
_RETRY_4XX = (408, 429)


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What one POST came to.

    Attributes:
        outcome: ``"delivered"`` (2xx), ``"retry"`` (5xx, 408, 429, no answer) or
            ``"reject"`` (other 4xx, a redirect: retrying would not help).
        reason: ``http_<status>``, ``timeout``, ``connection_refused``, ``connection_error``,
            ``bad_response`` or ``redirect_<status>``.
        status: The HTTP status, or None without an answer.
        retry_after_s: The receiver's ``Retry-After`` in seconds, when it sent one.
        body: The start of the answer (at most :data:`RESPONSE_BYTES_READ` bytes, as text).
    """

    outcome: str
    reason: str
    status: int | None = None
    retry_after_s: float | None = None
    body: str = ""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (Unix seconds).

    >>> sign("whsec_0123456789abcdef", b'{"a":1}', 1700000000)[:16]
    't=1700000000,v1='
    """
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, body: bytes, header: str, *, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_s`` of ``now``: what
    a receiver does (the tests check imgq's own requests with it).

    >>> header = sign("whsec_0123456789abcdef", b"{}", 1700000000)
    >>> verify("whsec_0123456789abcdef", b"{}", header, now=1700000100)
    True
    >>> verify("whsec_0123456789abcdef", b"{}", header, now=1700000400)  # a replay, too late
    False
    """
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


def backoff_s(
    attempt: int,
    base_s: float,
    max_s: float,
    rng: random.Random,
    retry_after_s: float | None = None,
) -> float:
    """The wait after failed attempt ``attempt`` (1 = the first): ``base_s`` doubled per attempt
    up to ``max_s``, half of it random ("equal jitter", so that senders that failed together do
    not retry together), and never shorter than the receiver's ``Retry-After`` (also capped).

    >>> rng = random.Random(0)
    >>> [round(backoff_s(n, 1.0, 60.0, rng), 2) for n in (1, 2, 3, 8)]
    [0.92, 1.76, 2.84, 37.77]
    >>> backoff_s(1, 1.0, 60.0, rng, retry_after_s=3600)
    60.0
    """
    step = min(max_s, base_s * 2.0 ** min(attempt - 1, 60))
    wait = step / 2 + rng.uniform(0, step / 2)
    if retry_after_s is not None:
        wait = max(wait, min(retry_after_s, max_s))
    return wait


def header_safe(value: str) -> str:
    """``value`` as a header may carry it: printable ASCII only (CR, LF and the rest become
    ``_``, so an id from Redis cannot add headers or break the request), at most
    :data:`HEADER_MAX_CHARS` characters.

    >>> header_safe("7:x\\r\\nX-Evil: 1:é")
    '7:x__X-Evil: 1:_'
    """
    return "".join(c if " " <= c <= "~" else "_" for c in value[:HEADER_MAX_CHARS])


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Attempt:
    """POST ``body`` to ``url`` once, connect to last byte read within ``timeout_s``.

    A user part in the URL (``https://user:pw@host/...``) is sent as basic authentication.
    Never raises for what the network or the receiver does; returns what it came to.
    """
    deadline = time.monotonic() + timeout_s
    expired = threading.Event()
    watchdog: threading.Timer | None = None
    conn: http.client.HTTPConnection | None = None
    try:
        conn, path, headers = _connection(url, headers, timeout_s)
        conn.connect()
        # The socket timeout bounds each read; a receiver that trickles bytes would stretch
        # the attempt without end, so the socket is shut at the deadline whatever it is doing.
        # The socket itself is held: getresponse() drops conn.sock when the answer ends the
        # connection (HTTP/1.0, "Connection: close"), and the body is read after that.
        watchdog = threading.Timer(
            max(0.0, deadline - time.monotonic()), _expire, (conn.sock, expired)
        )
        watchdog.daemon = True
        watchdog.start()
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        status = response.status
        head = response.read(RESPONSE_BYTES_READ).decode("utf-8", "replace")
        retry_after = _retry_after_s(response.getheader("Retry-After"))
    except TimeoutError:
        return Attempt("retry", "timeout")
    except ConnectionRefusedError:
        return Attempt("retry", "connection_refused")
    except (OSError, http.client.HTTPException):
        reason = "timeout" if expired.is_set() else "connection_error"
        return Attempt("retry", reason)
    except ValueError:  # a header or URL http.client refuses (UnicodeEncodeError too)
        return Attempt("reject", "bad_request")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if conn is not None:
            conn.close()
    if expired.is_set():  # the shut socket ended the body early: the answer is not whole
        return Attempt("retry", "timeout", status)
    return _judge(status, retry_after, head)


def _connection(
    url: str, headers: dict[str, str], timeout_s: float
) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """The connection, path and headers of a POST to ``url`` (not connected yet)."""
    parts = urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = connection_class(parts.hostname or "", parts.port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", **headers}
    if parts.username is not None:
        user_pw = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user_pw.encode()).decode()
    return conn, path, headers


def _judge(status: int, retry_after_s: float | None, body: str) -> Attempt:
    """What an answer with ``status`` means for the alert.

    >>> [_judge(s, None, "").outcome for s in (200, 204, 301, 400, 408, 429, 500, 503)]
    ['delivered', 'delivered', 'reject', 'reject', 'retry', 'retry', 'retry', 'retry']
    """
    if 200 <= status < 300:
        return Attempt("delivered", f"http_{status}", status, body=body)
    if 300 <= status < 400:
        return Attempt("reject", f"redirect_{status}", status, body=body)
    if status >= 500 or status in _RETRY_4XX:
        return Attempt("retry", f"http_{status}", status, retry_after_s, body)
    return Attempt("reject", f"http_{status}", status, body=body)


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the date form is ignored: clocks disagree).

    >>> _retry_after_s("120"), _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT"), _retry_after_s(None)
    (120.0, None, None)
    """
    if value is None or not value.strip().isdigit():
        return None
    return float(min(int(value.strip()), 86_400))


def _expire(sock: socket.socket | None, expired: threading.Event) -> None:
    """Ends a request that outlived its deadline: the blocked read returns (an error, or the
    end of the body)."""
    expired.set()
    if sock is not None:
        try:  # the plain socket's shutdown, also under TLS: no TLS state touched from here
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass
