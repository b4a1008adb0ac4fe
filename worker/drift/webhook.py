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
    "post",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "X-Imgq-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Most bytes of a receiver's answer read (kept, cut, in the dead letter); the rest is dropped.
RESPONSE_BYTES_READ = 1024
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


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Attempt:
    """POST ``body`` to ``url`` once, connect to last byte read within ``timeout_s``.

    A user part in the URL (``https://user:pw@host/...``) is sent as basic authentication.
    Never raises for what the network or the receiver does; returns what it came to.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = connection_class(host, parts.port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", **headers}
    if parts.username is not None:
        user_pw = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user_pw.encode()).decode()
    deadline = time.monotonic() + timeout_s
    watchdog: threading.Timer | None = None
    try:
        conn.connect()
        # The socket timeout bounds each read; a receiver that trickles bytes would stretch
        # the attempt without end, so the socket is shut at the deadline whatever it is doing.
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, (conn,))
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
        reason = "timeout" if time.monotonic() >= deadline else "connection_error"
        return Attempt("retry", reason)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()
    return _judge(status, retry_after, head)


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


def _shut(conn: http.client.HTTPConnection) -> None:
    """Ends a request that outlived its deadline: the blocked read returns with an error."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
