"""Log lines for operators: one JSON object per line, and no secrets in them.

Log collectors (Loki, CloudWatch, ``docker logs | jq``) parse one JSON object per line without
configuration, so the worker writes its own lines and Celery's in that form. Anything that can
hold a Redis password goes through :func:`mask_url` before it is logged or printed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any
from urllib.parse import unquote_plus, urlsplit

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging", "mask_url"]

#: Values of ``IMGQ_LOG_FORMAT``.
LOG_FORMATS = ("json", "text")

_MASK = "***"
#: Where a list of URLs (kombu's ``sentinel://h1;sentinel://h2``) has its next URL.
_URL_LIST = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")
#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def mask_url(url: str) -> str:
    """The URL with its passwords replaced by ``***``, for logs and printed settings.

    Both places a Redis URL can carry a password are masked: the user part
    (``redis://user:pw@host``) and a ``password`` query parameter (``?password=pw``, any case),
    which redis-py reads too. Everything else stays as written, byte for byte, for the reader.
    A password with an unencoded ``/``, ``?`` or ``#`` ends the user part early (Redis clients
    misread such a URL too, and then log the connection error): the URL is then masked from its
    scheme to its last ``@``. Never raises, even on what is not a URL.

    >>> mask_url("redis://:s3cret@redis.internal:6379/0")
    'redis://:***@redis.internal:6379/0'
    >>> mask_url("rediss://user:pw@host/1")
    'rediss://user:***@host/1'
    >>> mask_url("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    >>> mask_url("redis://redis:6379/0?password=s3cret")
    'redis://redis:6379/0?password=***'
    >>> mask_url("rediss://redis/0?ssl_cert_reqs=required&PassWord=s3cret&socket_timeout=5")
    'rediss://redis/0?ssl_cert_reqs=required&PassWord=***&socket_timeout=5'
    >>> mask_url("redis://:pa#ss@redis:6379/0")
    'redis://***@redis:6379/0'

    A list of URLs, as kombu spells Sentinel's, is masked URL by URL:

    >>> mask_url("sentinel://:pw@h1:26379/0;sentinel://u:pw@h2:26379/0")
    'sentinel://:***@h1:26379/0;sentinel://u:***@h2:26379/0'
    """
    urls = _URL_LIST.split(url)
    if len(urls) > 1:
        return ";".join(mask_url(one) for one in urls)
    # Split by hand, as urlsplit does, so that what is not masked comes back byte for byte.
    rest, hash_, fragment = url.partition("#")
    rest, qmark, query = rest.partition("?")
    scheme, sep, rest = rest.partition("://")
    netloc, slash, path = rest.partition("/") if sep else ("", "", rest)
    if sep and "@" in url and "@" not in netloc and ":" in netloc and not _is_host(netloc):
        # "user:pa" or ":pa" before an "@" further on: the password held a "/", "?" or "#".
        tail = mask_url(f"{scheme}://{url.rpartition('@')[2]}")
        return tail.replace("://", f"://{_MASK}@", 1)
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{host}"
    query = _mask_query(query)
    fragment = _MASK if fragment else ""  # Redis URLs have none: it is a password's tail
    return f"{scheme}{sep}{netloc}{slash}{path}{qmark}{query}{hash_}{fragment}"


def _mask_query(query: str) -> str:
    """``query`` with the value of every ``password`` parameter replaced by ``***``."""
    pieces = re.split(r"([&;])", query)
    for i in range(0, len(pieces), 2):
        key, eq, value = pieces[i].partition("=")
        if eq and value and unquote_plus(key).strip().lower() == "password":
            pieces[i] = f"{key}={_MASK}"
    return "".join(pieces)


def _is_host(netloc: str) -> bool:
    """Whether ``netloc`` (with no user part) reads as a host with, if any, a numeric port."""
    try:
        parts = urlsplit(f"//{netloc}")
        parts.port  # noqa: B018 (raises ValueError when the "port" is not a number)
    except ValueError:
        return False
    return bool(parts.hostname)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, and its ``extra`` fields.

    >>> record = logging.makeLogRecord({"msg": "batch", "levelname": "INFO", "size": 3})
    >>> json.loads(JsonFormatter().format(record))["size"]
    3
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: str = "json", level: str | int = "INFO") -> None:
    """Send every logger's records to stderr, one JSON object (or one text line) per record.

    Args:
        log_format: ``"json"`` or ``"text"``. Defaults to ``"json"``.
        level: Root log level name or number. Defaults to ``"INFO"``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
