"""Base64 the way every message and image is checked: strictly, fast.

Standard library and (when installed) pybase64 only, so the worker's message parser and the
decoder share it without importing numpy or OpenCV.
"""

from __future__ import annotations

import base64
import binascii

try:
    import pybase64
except ImportError:  # pragma: no cover - pybase64 comes with imgq[worker]
    pybase64 = None  # type: ignore[assignment]

__all__ = ["b64decode_strict"]


def b64decode_strict(text: str | bytes) -> bytes:
    """Standard base64 (RFC 4648, no line breaks) to bytes, exactly as
    ``base64.b64decode(text, validate=True)`` decodes it, errors included.

    Every task carries its image as base64 inside a base64 message body, so this runs twice per
    task: pybase64's SIMD decoder does it many times faster than the standard library
    (``docs/benchmarks.md``). It is stricter (it refuses surplus padding), so whatever it
    refuses goes to the standard library, which decides and words the error.

    >>> b64decode_strict("aW1n"), b64decode_strict("aW1n=")
    (b'img', b'img')
    """
    if pybase64 is not None:
        try:
            return pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass
    return base64.b64decode(text, validate=True)
