"""The drift records read back from Redis (window verdicts, alerts), made safe to show.

Anything in Redis is hostile input: an entry written by another imgq version, by hand, or by
an attacker with write access. Readers keep an entry only when it is a JSON object with a
window, and see every field they print with its type checked: a string that is not one reads
as ``"?"``, a number that is not a finite one as None, a list that is not one as empty.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

__all__ = [
    "MAX_RECORD_BYTES",
    "accuracy",
    "clean_alert",
    "clean_verdict",
    "finite",
    "json_line",
    "parse",
    "printable",
]

#: A record past this size is not read (the detector writes a few KiB).
MAX_RECORD_BYTES: Final = 256 * 1024
_TIERS: Final = ("page", "notice", "ok")


def parse(raw: Any) -> dict[str, Any] | None:
    """The JSON object in ``raw`` (bytes or str), or None when it is not one or too large."""
    if not isinstance(raw, bytes | str) or len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None.

    >>> finite(0.5), finite(float("nan")), finite(True), finite("1")
    (0.5, None, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def printable(text: str) -> str:
    r"""``text`` without control characters (no escape sequence reaches a terminal).

    >>> printable("ok\x1b[2J\r\n")
    'ok?[2J??'
    """
    return "".join(c if c.isprintable() else "?" for c in text)


def _text(value: Any, default: str = "?") -> str:
    return printable(value[:500]) if isinstance(value, str) else default


def _window(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("id"), int):
        return None
    n = value.get("n_images")
    return value | {
        "n_images": n if isinstance(n, int) and not isinstance(n, bool) else None,
        "start": _text(value.get("start")),
        "end": _text(value.get("end")),
    }


def accuracy(value: Any) -> float | None:
    """An estimated accuracy: a finite number in [0, 1], else None (missing)."""
    number = finite(value)
    return number if number is not None and 0.0 <= number <= 1.0 else None


def _feature(f: dict[str, Any], name_key: str) -> dict[str, Any]:
    out = f | {name_key: _text(f.get(name_key)), "summary": _text(f.get("summary"), "")}
    for key in ("p_value", "p_threshold", "psi", "psi_floor", "effect", "effect_floor"):
        out[key] = finite(f.get(key))
    out["tier"] = f.get("tier") if f.get("tier") in _TIERS else None
    out["drifting"] = f.get("drifting") is True
    return out


def clean_verdict(verdict: dict[str, Any]) -> dict[str, Any] | None:
    """A window verdict with every shown field checked; None without a window. A verdict
    without a tier reads as ``page`` (marked ``tier_assumed``: older data)."""
    window = _window(verdict.get("window"))
    if window is None:
        return None
    features = verdict.get("features")
    out = verdict | {
        "window": window,
        "estimated_accuracy": accuracy(verdict.get("estimated_accuracy")),
        "features": [_feature(f, "name") for f in features if isinstance(f, dict)]
        if isinstance(features, list)
        else [],  # fmt: skip
    }
    if verdict.get("tier") not in _TIERS:
        out.update(tier="page", tier_assumed=True)
    return out


def clean_alert(event: dict[str, Any]) -> dict[str, Any] | None:
    """An alert event with every shown field checked; None when it is not an alert with a
    string id and a window."""
    window = _window(event.get("window"))
    if event.get("type") != "alert" or not isinstance(event.get("id"), str) or window is None:
        return None
    features = event.get("features")
    still = event.get("still_open")
    return event | {
        "window": window,
        "tier": event.get("tier") if event.get("tier") in ("page", "notice") else "page",
        "time": _text(event.get("time")),
        "model": _text(event.get("model")),
        "estimated_accuracy": accuracy(event.get("estimated_accuracy")),
        "features": [_feature(f, "feature") for f in features if isinstance(f, dict)]
        if isinstance(features, list)
        else [],  # fmt: skip
        "still_open": [s for s in still if isinstance(s, str)] if isinstance(still, list) else [],
    }


def json_line(record: dict[str, Any]) -> str:
    """One record as strict JSON (a non-finite number, which ``json.dumps`` would write as
    ``NaN``, is null)."""

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(record), allow_nan=False)
