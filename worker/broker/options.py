"""Celery transport options, as a hostile environment variable gives them (a JSON object):
their types checked at start, and their secrets masked wherever they are shown."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["masked_options", "transport_problem"]

_SECRET = re.compile("password|secret|token|credential", re.IGNORECASE)

#: Transport options whose value kombu or redis-py use as a number, a flag or a name: checked at
#: start, so that a wrong type stops the worker with its name instead of a TypeError deep in
#: Celery once it runs (others pass through: kombu ignores what it does not know).
_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(
        ("visibility_timeout", "socket_timeout", "socket_connect_timeout", "polling_interval",
         "brpop_timeout", "health_check_interval", "reauth_check_interval", "max_connections",
         "unacked_mutex_expire", "unacked_restore_limit", "unacked_restore_interval",
         "unacked_restore_throttle", "max_retries", "interval_start", "interval_step",
         "interval_max", "min_other_sentinels"),
        (int, float),
    ),
    **dict.fromkeys(
        ("socket_keepalive", "retry_on_timeout", "ack_emulation", "fanout_patterns",
         "sentinel_fanout_compat"),
        (bool,),
    ),
    **dict.fromkeys(
        ("client_name", "master_name", "unacked_key", "unacked_index_key", "unacked_mutex_key",
         "global_keyprefix", "username", "password"),
        (str,),
    ),
    "fanout_prefix": (bool, str),
    "sentinel_kwargs": (dict,),
}  # fmt: skip


def transport_problem(options: Any) -> str | None:
    """What is wrong with Celery transport options (a JSON object), or None.

    >>> transport_problem({"visibility_timeout": "x"})
    "visibility_timeout must be a number >= 0, got 'x'"
    """
    if not isinstance(options, dict):
        return f"must be a JSON object, got {type(options).__name__}"
    for key, value in options.items():
        kinds = _OPTION_TYPES.get(key)
        if kinds is None:
            continue
        numeric = kinds == (int, float)
        negative = isinstance(value, int | float) and (
            isinstance(value, bool) or not 0 <= value < math.inf  # JSON reads 1e400 as inf
        )
        if not isinstance(value, kinds) or (numeric and negative):
            want = "a number >= 0" if numeric else " or ".join(k.__name__ for k in kinds)
            return f"{key} must be {want}, got {value!r:.40}"
        if key == "sentinel_kwargs" and (problem := transport_problem(value)):
            return f"sentinel_kwargs: {problem}"
    return None


def masked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Transport options with the values of secret-looking keys masked, at any depth
    (``sentinel_kwargs`` holds the sentinels' password).

    >>> masked_options({"master_name": "m", "sentinel_kwargs": {"password": "pw"}})
    {'master_name': 'm', 'sentinel_kwargs': {'password': '***'}}
    """
    return {
        k: "***" if _SECRET.search(str(k)) else masked_options(v) if isinstance(v, Mapping) else v
        for k, v in options.items()
    }
