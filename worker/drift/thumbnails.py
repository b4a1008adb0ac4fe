"""Inputs a reviewer should see: small JPEGs of recent out-of-range and novel inputs, kept by the
workers in capped Redis lists for the review page and ``imgq drift report``.

Each kind is rate limited per worker (the first such image of a batch, at most ``per_s`` a
second) and queued on the batch's own pipeline, after its settle script: no extra round trip.
A novel input's entry names the training images nearest to it in the model's features (positions
in the manifest's novelty gallery), so the page shows it beside them.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from imgq.worker.drift.layout import THUMBNAIL_PX, THUMBNAILS_KEPT, DriftKeys, _iso

__all__ = ["ThumbnailWriter", "jpeg_thumbnail"]


def jpeg_thumbnail(rgb: np.ndarray) -> bytes | None:
    """An RGB image as a JPEG of :data:`THUMBNAIL_PX` on its longer side (None if OpenCV
    cannot encode it)."""
    h, w = rgb.shape[:2]
    scale = THUMBNAIL_PX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(
        ".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85]
    )
    return jpeg.tobytes() if ok else None


class ThumbnailWriter:
    """Keeps thumbnails of out-of-range and of novel inputs, each kind rate limited.

    Args:
        keys: The model's drift keys (``out_of_range`` and ``novel`` lists).
        per_s: Most thumbnails of each kind this worker stores per second.
        ttl_s: Lifetime of the lists after the model was last served.
    """

    def __init__(self, keys: DriftKeys, per_s: float, ttl_s: int) -> None:
        if not per_s > 0:
            raise ValueError(f"thumbnails_per_s must be > 0, got {per_s!r}")
        self.keys = keys
        self.ttl_s = ttl_s
        self._interval_s = 1.0 / per_s
        self._last_s = {"out_of_range": -math.inf, "novel": -math.inf}

    def _due(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._last_s[kind] < self._interval_s:
            return False
        self._last_s[kind] = now
        return True

    def _push(self, pipe: Any, key: str, rgb: np.ndarray, item: dict[str, Any]) -> bool:
        jpeg = jpeg_thumbnail(rgb)
        if jpeg is None:
            return False
        item |= {
            "time": _iso(time.time()),
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "jpeg_b64": base64.b64encode(jpeg).decode("ascii"),
        }
        pipe.lpush(key, json.dumps(item))
        pipe.ltrim(key, 0, THUMBNAILS_KEPT - 1)
        pipe.expire(key, self.ttl_s)
        return True

    def out_of_range(
        self, pipe: Any, rgb: np.ndarray, features: list[str], label: str | None = None
    ) -> bool:
        """Keep an out-of-range input (``features``: those out of range; ``label``: the class
        the model predicted, whose training samples the page shows beside it).

        Returns:
            True when a thumbnail was queued, False when the rate limit skipped it.
        """
        if not self._due("out_of_range"):
            return False
        item: dict[str, Any] = {"features": features}
        if label is not None:
            item["label"] = label
        return self._push(pipe, self.keys.out_of_range, rgb, item)

    def novel(
        self,
        pipe: Any,
        rgb: np.ndarray,
        novelty: float,
        label: str,
        neighbours: Sequence[int],
    ) -> bool:
        """Keep a novel input: its novelty, the class the model predicted, and the positions of
        its nearest training images in the manifest's novelty gallery.

        Returns:
            True when a thumbnail was queued, False when the rate limit skipped it.
        """
        if not self._due("novel"):
            return False
        item = {
            "novelty": round(float(novelty), 4),
            "label": label,
            "neighbours": [int(i) for i in neighbours],
        }
        return self._push(pipe, self.keys.novel, rgb, item)
