"""The JSON of messages, results and events: orjson's speed, the standard library's rules.

Whatever orjson refuses (NaN, lone surrogates, nesting deeper than 1024, integers beyond 64
bits) goes to the standard library, which decides and words the error, so a hostile message
fails the way ``json`` would make it fail. orjson comes with imgq[worker]; without it the
standard library does everything.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson comes with imgq[worker]
    orjson = None  # type: ignore[assignment]

__all__ = ["json_dumps", "json_loads"]


def json_loads(text: bytes | str) -> Any:
    """JSON text to Python as ``json.loads`` reads it, at orjson's speed.

    Whatever orjson refuses (NaN, lone surrogates, nesting deeper than 1024) goes to the standard
    library, which decides and words the error, so a hostile message fails the way it always did.
    Bytes are UTF-8 or refused.

    >>> json_loads(b'{"a": [1, 2.5]}'), json_loads("[NaN]")
    ({'a': [1, 2.5]}, [nan])
    >>> json_loads('[1]'.encode("utf-16"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte
    """
    if orjson is not None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    if isinstance(text, bytes):
        # UTF-8 only, as orjson: the standard library would also read UTF-16 and UTF-32, whose
        # quote bytes the bound on a message's JSON containers does not see.
        text = text.decode("utf-8")
    return json.loads(text)


def json_dumps(value: Any) -> bytes:
    """Compact JSON of results and events, as Celery's JSON backend would store them, at
    orjson's speed (10x). What orjson refuses (integers beyond 64 bits, lone surrogates) the
    standard library writes.

    >>> json_dumps({"label": "cat", "score": 0.5, "big": 2**70})
    b'{"label": "cat", "score": 0.5, "big": 1180591620717411303424}'
    """
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(value).encode()
