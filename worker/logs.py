"""Log lines for operators: one JSON object per line, and no secrets in them.

Log collectors (Loki, CloudWatch, ``docker logs | jq``) parse one JSON object per line without
configuration, so the worker writes its own lines and Celery's in that form. Anything that can
hold a Redis password goes through :func:`mask_url` before it is logged or printed.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging", "mask_url"]

#: Values of ``IMGQ_LOG_FORMAT``.
LOG_FORMATS = ("json", "text")

_MASK = "***"
#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, for logs and printed settings.

    >>> mask_url("redis://:s3cret@redis.internal:6379/0")
    'redis://:***@redis.internal:6379/0'
    >>> mask_url("rediss://user:pw@host/1")
    'rediss://user:***@host/1'
    >>> mask_url("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:{_MASK}@{host}"))


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
