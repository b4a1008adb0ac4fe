"""The loop back to training: a bounded sample of each window's inputs with the model's answers,
kept in Redis by the workers, and written out as a folder a person labels and ``imgq train``
reads next to the old data (``imgq drift samples --alert ID --out DIR``).

Workers (:class:`SampleWriter`, called from the drift recorder's ``extras``, after the batch's
settle script on the same round trip): at most one image per batch and ``samples_per_s`` per
worker, chosen at random within the batch, stored as a PNG of the model's input (the image as
the model saw it, at its input size) with its answer, in the capped stream
``imgq:drift:<drift_id>:samples``. The stream's entry ids are Redis server milliseconds, the same
clock as a window's start and end, so a window's samples are one ``XRANGE``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis

from imgq.shared.manifest import Manifest
from imgq.worker.drift.layout import DriftKeys, _iso

__all__ = [
    "SAMPLES_BYTES",
    "SampleWriter",
    "samples_kept",
    "window_samples",
    "write_samples",
]

#: Raw pixel bytes of the samples a model keeps in Redis, at most (PNG stores less).
SAMPLES_BYTES = 32 << 20
#: Top answers stored with each sample.
_TOP_K = 5
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
_README = "README.txt"
_CSV = "samples.csv"


def samples_kept(height: int, width: int) -> int:
    """How many samples a model keeps: :data:`SAMPLES_BYTES` of raw pixels, 100 to 5,000.

    >>> samples_kept(32, 32), samples_kept(224, 224)
    (5000, 222)
    """
    return int(min(5_000, max(100, SAMPLES_BYTES // (height * width * 3))))


class SampleWriter:
    """Stores sampled inputs with the model's answers, rate limited per worker.

    Args:
        keys: The model's drift keys.
        manifest: The served model (labels, name, hash, input size).
        samples_per_s: Most samples this worker stores per second (one per batch at most).
        ttl_s: Lifetime of the stream after the model was last served.
    """

    def __init__(
        self, keys: DriftKeys, manifest: Manifest, samples_per_s: float, ttl_s: int
    ) -> None:
        if not samples_per_s >= 0:
            raise ValueError(f"samples_per_s must be >= 0, got {samples_per_s!r}")
        self.keys = keys
        self.labels = manifest.labels
        self.model = {"name": manifest.name, "sha256": manifest.model_sha256}
        self.kept = samples_kept(manifest.preprocess.height, manifest.preprocess.width)
        self.ttl_s = ttl_s
        self._interval_s = 1.0 / samples_per_s if samples_per_s > 0 else math.inf
        self._last_s = -math.inf

    def due(self) -> bool:
        """Whether this batch may keep a sample (and, if so, the rate limit counts it taken)."""
        now = time.monotonic()
        if self._interval_s == math.inf or now - self._last_s < self._interval_s:
            return False
        self._last_s = now
        return True

    def add(
        self,
        pipe: Any,
        model_input: np.ndarray,
        probs: np.ndarray,
        out_of_range: list[str],
        novelty: float | None = None,
    ) -> bool:
        """Queue one sample on ``pipe`` (``XADD MAXLEN ~`` and ``EXPIRE``); False when the PNG
        could not be made. ``novelty``: the image's, when the bundle has a novelty model."""
        ok, png = cv2.imencode(".png", cv2.cvtColor(model_input, cv2.COLOR_RGB2BGR))
        if not ok:
            return False
        order = np.argsort(-probs)[:_TOP_K]
        top = [{"label": self.labels[j], "score": round(float(probs[j]), 6)} for j in order]
        answer = {
            "label": top[0]["label"],
            "score": top[0]["score"],
            "top_k": top,
            "time": _iso(time.time()),
            "model": self.model,
            "out_of_range": out_of_range,
        }
        if novelty is not None:
            answer["novelty"] = round(novelty, 4)
        pipe.xadd(
            self.keys.samples,
            {"json": json.dumps(answer), "png": png.tobytes()},
            maxlen=self.kept,
            approximate=True,
        )
        pipe.expire(self.keys.samples, self.ttl_s)
        return True


# ----------------------------------------------------------------------------- reading


#: Samples stored this long after a window's end still count as the window's.
_SLACK_MS = 1000


def _ms(iso: str) -> int:
    """ISO 8601 time (as windows store them) to Unix milliseconds."""
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


def window_samples(
    client: redis.Redis, keys: DriftKeys, window: dict[str, Any], limit: int = 5_000
) -> list[tuple[str, dict[str, Any], bytes]]:
    """The samples stored during ``window`` (a verdict's or alert's ``window``: ``start`` and
    ``end``), oldest first, as ``(id, answer, png)``. The last batches' samples are written
    just after the window's end time, and those between two windows belong to neither, hence a
    second of slack. Entries that are not a sample (hostile or damaged) are skipped.

    Raises:
        ValueError: the window's times are not ISO 8601 (a damaged record).
    """
    start, end = _ms(str(window.get("start"))), _ms(str(window.get("end"))) + _SLACK_MS
    found = []
    entries: Any = client.xrange(keys.samples, start, end, count=limit)
    for raw_id, fields in entries or ():
        entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        try:
            answer = json.loads(fields[b"json"])
            png = fields[b"png"]
            if not (_STREAM_ID.fullmatch(entry_id) and isinstance(answer, dict)):
                continue
            if not (isinstance(answer.get("label"), str) and isinstance(png, bytes)):
                continue
        except (KeyError, TypeError, ValueError):
            continue
        found.append((entry_id, answer, png))
    return found


def _number_or_blank(value: Any) -> str:
    """A stored number for the CSV; anything else (absent, text, NaN) as blank."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return ""
    return str(value)


def _safe_folder(label: str, labels: tuple[str, ...]) -> bool:
    """A class folder name that stays inside the output folder and is one of the model's."""
    return (
        label in labels
        and label not in ("", ".", "..")
        and not label.startswith(".")
        and not any(c in label for c in "/\\\0")
    )


def write_samples(
    samples: list[tuple[str, dict[str, Any], bytes]], labels: tuple[str, ...], out: Path
) -> tuple[int, int]:
    """Write ``out/<predicted label>/<id>.png``, ``out/samples.csv`` and ``out/README.txt``.

    Returns:
        Images written, and samples skipped (a label the model does not have, or bytes that are
        not a PNG).

    Raises:
        FileExistsError: ``out`` exists and is not empty (samples of two windows would mix).
    """
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with open(out / _CSV, "w", newline="", encoding="utf-8") as f:
        table = csv.writer(f)
        table.writerow(["id", "time", "predicted_label", "score", "out_of_range", "novelty"])
        for entry_id, answer, png in samples:
            label = answer["label"]
            image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            if not _safe_folder(label, labels) or image is None or not png.startswith(b"\x89PNG"):
                skipped += 1
                continue
            (out / label).mkdir(exist_ok=True)
            (out / label / f"{entry_id}.png").write_bytes(png)
            outside = answer.get("out_of_range")
            table.writerow([
                entry_id,
                str(answer.get("time", "")),
                label,
                answer.get("score", ""),
                ";".join(map(str, outside)) if isinstance(outside, list) else "",
                _number_or_blank(answer.get("novelty")),
            ])  # fmt: skip
            written += 1
    (out / _README).write_text(
        "Each image is in the folder of the class the model predicted. Move every misfiled "
        "image into the folder of its right class (one of the model's classes), delete the "
        "ones you cannot label, then train on the old data and this folder: "
        f"`imgq train OLD_DATA {out} --out NEW_MODEL`.\n",
        "utf-8",
    )
    return written, skipped
