"""The worker's side of drift: each batch's counts for the open window (added by the batch's
settle script), out-of-range thumbnails, and a background thread that closes full or old
windows and has the detector judge them (never on the hot path).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import redis

from imgq.shared.calibration import calibrated_top1
from imgq.shared.errors import ManifestError
from imgq.shared.imagestats import (
    IMAGE_FEATURES,
    IMAGE_FEATURES_VERSION,
    PIXEL_FEATURES,
    output_features,
)
from imgq.shared.manifest import Manifest
from imgq.shared.reference import RangeCheck
from imgq.worker.broker.settle import WindowCounts
from imgq.worker.drift.detector import DriftDetector
from imgq.worker.drift.layout import (
    _ADD_LUA,
    _ADD_WINDOW_FUNCTION_LUA,
    _CLOSE_LUA,
    ALL_FEATURES,
    STATE_TTL_S,
    SUM_SCALE,
    THUMBNAIL_PX,
    THUMBNAILS_KEPT,
    DriftKeys,
    _check_ttl,
    _iso,
)
from imgq.worker.drift.samples import SampleWriter
from imgq.worker.drift.verdict import NOTICE_ALPHA, PAGE_ALPHA
from imgq.worker.metrics import WorkerMetrics

__all__ = ["DriftRecorder", "Observation"]

log = logging.getLogger("imgq.drift")


@dataclasses.dataclass(frozen=True)
class Observation:
    """What drift sees of one classified image (the classification handler makes it).

    Attributes:
        features: Its image features, in ``IMAGE_FEATURES`` order.
        probs: The model's probabilities for it.
        out_of_range: Its features outside the training range.
        model_input: The image as the model saw it, kept only when it is out of range (for a
            thumbnail in ``imgq drift report``) or :attr:`sampled`.
        sampled: Kept as a sample of the window (``worker/drift/samples.py``): the handler
            marks at most one image per batch when :meth:`DriftRecorder.sample_due` says so.
    """

    features: np.ndarray
    probs: np.ndarray
    out_of_range: list[str]
    model_input: np.ndarray | None = None
    sampled: bool = False


class DriftRecorder:
    """The worker side of drift: counts each batch into the open window, closes full or old
    windows, and judges them in a background thread (never on the hot path).

    Create it in the process that serves (its thread does not survive a fork); call
    :meth:`close` on shutdown.

    Args:
        redis_client: Client of the broker's Redis.
        manifest: The served model's manifest; its ``reference`` must cover
            :data:`ALL_FEATURES`.
        window_size: A window closes once it has this many images (all workers together).
        window_s: A window older than this closes: judged if it has at least
            ``min_window_size`` images, else dropped unjudged (see :meth:`close_window`).
        alpha: The notice tier's family-wise false-alarm probability per window. Defaults to
            :data:`~imgq.worker.drift.verdict.NOTICE_ALPHA` (see docs/drift.md).
        psi_floor: Smallest PSI of an image feature that may alert. Defaults to 0.1.
        page_alpha: The page tier's family-wise false-alarm probability per window. Defaults
            to :data:`~imgq.worker.drift.verdict.PAGE_ALPHA`.
        min_window_size: Fewest images the time closer judges (the chi-square approximation
            needs a few per bin). Defaults to ``min(50, window_size)``.
        thumbnails_per_s: Most out-of-range thumbnails this worker stores per second.
            Defaults to 5.
        samples_per_s: Most window samples (an input with its answer, for retraining) this
            worker stores per second, one per batch at most. Defaults to 5.
        window_ttl_s: How long closed windows stay in Redis. Defaults to one day.
        state_ttl_s: How long every other key of the model's drift state (the open window,
            ``seq``, ``latest``, ``alerts``, ``open_alerts``, ``acked``, ``out_of_range``)
            stays after the model was last served or reviewed; each write, and each window
            closed, refreshes it. Defaults to :data:`STATE_TTL_S` (30 days).
        metrics: Where the detector exports. Defaults to :func:`process_metrics`.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        manifest: Manifest,
        *,
        window_size: int,
        window_s: float,
        alpha: float = NOTICE_ALPHA,
        psi_floor: float = 0.1,
        page_alpha: float = PAGE_ALPHA,
        min_window_size: int | None = None,
        thumbnails_per_s: float = 5.0,
        samples_per_s: float = 5.0,
        window_ttl_s: int = 86_400,
        state_ttl_s: int = STATE_TTL_S,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        _check_ttl("state_ttl_s", state_ttl_s)
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
        missing = [n for n in ALL_FEATURES if n not in manifest.reference.features]
        if missing:
            raise ManifestError(
                f"the manifest's reference statistics lack {missing}; re-export the bundle with "
                "`imgq train` of this imgq version"
            )
        version = manifest.reference.image_features_version
        if version != IMAGE_FEATURES_VERSION:
            raise ManifestError(
                f"the manifest's reference statistics were computed by image statistics version "
                f"{version}; this imgq computes version {IMAGE_FEATURES_VERSION}, whose values "
                "differ, so every window would look drifted: re-export the bundle with `imgq "
                "train` of this imgq version, or serve without drift statistics (IMGQ_DRIFT=false)"
            )
        self.redis = redis_client
        self.manifest = manifest
        self.keys = DriftKeys(manifest.drift_id)
        self.detector = DriftDetector(
            redis_client,
            manifest,
            alpha=alpha,
            psi_floor=psi_floor,
            page_alpha=page_alpha,
            state_ttl_s=state_ttl_s,
            metrics=metrics,
        )
        self.window_size = window_size
        self.window_s = float(window_s)
        self.min_window_size = min(50, window_size) if min_window_size is None else min_window_size
        self.window_ttl_s = window_ttl_s
        self.state_ttl_s = state_ttl_s
        self._dropped_logged = False
        self._thumbnail_interval_s = 1.0 / thumbnails_per_s
        self._last_thumbnail_s = -math.inf
        self.samples = SampleWriter(self.keys, manifest, samples_per_s, state_ttl_s)
        ref = manifest.reference.features
        layout = self.detector.layout
        # Every bin of every feature numbered by its slot in the window's Redis string: the hot
        # path counts a batch with one bincount over these numbers.
        n_bins = np.array([len(ref[n].counts) for n in ALL_FEATURES])
        # Edges as one matrix, rows padded with +inf: a batch is binned in one comparison.
        self._edges = np.full((len(ALL_FEATURES), int(n_bins.max()) + 1), np.inf)
        for j, n in enumerate(ALL_FEATURES):
            self._edges[j, : len(ref[n].edges)] = ref[n].edges
        self._first_bin = np.array([layout.first_bin[n] for n in ALL_FEATURES])
        self._last_bin = n_bins - 1
        self._n_slots = layout.size
        # Columns of [image features | output features] that have a sum, and its slot.
        self._sum_columns = np.array(
            [j for j, n in enumerate(ALL_FEATURES) if n in layout.sum_slots]
        )
        self._sum_slots = np.array([layout.sum_slots[ALL_FEATURES[j]] for j in self._sum_columns])
        self._range_check = RangeCheck(manifest.reference, IMAGE_FEATURES)
        # The page tier's out-of-range share: images with a pixel feature out of range.
        self._pixel_check = RangeCheck(manifest.reference, PIXEL_FEATURES)
        self._out_of_range_slot = layout.out_of_range_slot
        self._calibrated_slot = layout.calibrated_confidence_slot
        calibration = manifest.calibration
        self._temperature = None if calibration is None else calibration.temperature
        self._requests: queue.Queue[str | None] = queue.Queue()
        self._tick_s = min(self.window_s / 4, 5.0)
        self._thread = threading.Thread(target=self._run, name="imgq-drift", daemon=True)
        self._thread.start()

    def out_of_range(self, image_features: np.ndarray) -> list[list[str]]:
        """Per image of an (N, len(IMAGE_FEATURES)) batch, its features outside the training
        range (the task result's ``drift.out_of_range``)."""
        return self._range_check(image_features)

    # -- the Observer protocol (imgq.worker.handler) ----------------------------------------------

    #: The Lua function ``add_window(key, n, pairs, ttl)`` that the batch's settle script
    #: (``worker/broker/settle.py``) includes, so that the counts go in with the results, once.
    lua_add_window = _ADD_WINDOW_FUNCTION_LUA

    def window_counts(self, observations: Sequence[Observation]) -> list[WindowCounts]:
        """The counts of these images for the open window, for the settle script."""
        if not observations:
            return []
        features = np.stack([o.features for o in observations])
        probs = np.stack([o.probs for o in observations])
        return [self.counts_of(features, probs)]

    def after_settle(self, counted: Mapping[str, int]) -> None:
        """:meth:`after_pipeline` with the open window's count."""
        if self.keys.open in counted:
            self.after_pipeline(counted[self.keys.open])

    def extras(self, pipe: Any, observations: Sequence[Observation]) -> None:
        """A thumbnail of the batch's first out-of-range input, rate limited, and the batch's
        sampled input with its answer."""
        for o in observations:
            if o.out_of_range and o.model_input is not None:
                label = self.manifest.labels[int(np.argmax(o.probs))]
                self.add_out_of_range_thumbnail(pipe, o.model_input, o.out_of_range, label)
                break
        for o in observations:
            if o.sampled and o.model_input is not None:
                self.samples.add(pipe, o.model_input, o.probs, o.out_of_range)

    def sample_due(self) -> bool:
        """Whether the handler should mark one image of this batch :attr:`Observation.sampled`
        (rate limited per worker; a True is counted as taken)."""
        return self.samples.due()

    # -- counts ---------------------------------------------------------------------------------

    def counts_of(self, image_features: np.ndarray, probs: np.ndarray) -> WindowCounts:
        """A batch's counts for the open window.

        Args:
            image_features: (N, len(IMAGE_FEATURES)) features of the batch's inferred images.
            probs: (N, K) their probabilities, in the same order.
        """
        values = (
            np.hstack([image_features, output_features(probs)])
            if len(probs)
            else np.empty((0, len(ALL_FEATURES)))
        )
        increments = np.bincount(self._bin_numbers(values), minlength=self._n_slots)
        finite = np.where(np.isfinite(values), values, 0.0)  # NaN is counted in the last bin
        increments[self._sum_slots] = np.rint(finite[:, self._sum_columns].sum(axis=0) * SUM_SCALE)
        if len(probs):
            increments[self._out_of_range_slot] = self._pixel_check.count(
                image_features[:, : len(PIXEL_FEATURES)]
            )
            if self._temperature is not None:
                calibrated = calibrated_top1(probs, self._temperature).sum()
                increments[self._calibrated_slot] = np.rint(calibrated * SUM_SCALE)
        slots = np.flatnonzero(increments)
        # "slot increment slot increment ...": one argument instead of ~2 per slot, which
        # redis-py would encode one by one (~1 ms per batch of 32).
        pairs = np.column_stack([slots, increments[slots]]).ravel().tolist()
        return WindowCounts(
            self.keys.open, len(image_features), " ".join(map(str, pairs)), self.state_ttl_s
        )

    def add_to_pipeline(self, pipe: Any, image_features: np.ndarray, probs: np.ndarray) -> int:
        """Queue this batch's counts on ``pipe`` as one EVAL of its own (for callers without a
        settle script: tests, benchmarks, tools).

        Returns:
            Index, in ``pipe.execute()``'s reply list, of the open window's new image count; pass
            that reply to :meth:`after_pipeline`.
        """
        counts = self.counts_of(image_features, probs)
        index = len(pipe)
        pipe.eval(_ADD_LUA, 1, counts.key, counts.images, counts.pairs, counts.ttl_s)
        return index

    def _bin_numbers(self, values: np.ndarray) -> np.ndarray:
        """Slot of the bin of every value of ``values``, whose columns are ``ALL_FEATURES``. The
        same bins as :func:`shared.imagestats.bin_counts` (``[edge_i, edge_i+1)``, beyond the
        ends into the outer bins) in one comparison for the whole batch: how many edges each
        value is not below (as ``searchsorted(side="right")`` counts; NaN is below none, so it
        lands in the last bin, where numpy sorts it), less one."""
        idx = (~(values[:, :, None] < self._edges[None])).sum(axis=2)
        np.clip(idx - 1, 0, self._last_bin, out=idx)
        idx += self._first_bin
        return idx.ravel()

    def add_out_of_range_thumbnail(
        self, pipe: Any, rgb: np.ndarray, features: list[str], label: str | None = None
    ) -> bool:
        """Keep a small JPEG of an out-of-range input for ``imgq drift report`` (LPUSH + LTRIM
        on ``pipe``), at most ``thumbnails_per_s`` per second per worker.

        Call it for the first image of a batch whose :meth:`out_of_range` is not empty;
        ``label`` is the class the model predicted for it (the review page shows training
        samples of that class beside it).

        Returns:
            True when a thumbnail was queued, False when the rate limit skipped it.
        """
        now = time.monotonic()
        if now - self._last_thumbnail_s < self._thumbnail_interval_s:
            return False
        self._last_thumbnail_s = now
        h, w = rgb.shape[:2]
        scale = THUMBNAIL_PX / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85]
        )
        if not ok:
            return False
        item = {
            "time": _iso(time.time()),
            "features": features,
            "width": w,
            "height": h,
            "jpeg_b64": base64.b64encode(jpeg.tobytes()).decode("ascii"),
        }
        if label is not None:
            item["label"] = label
        pipe.lpush(self.keys.out_of_range, json.dumps(item))
        pipe.ltrim(self.keys.out_of_range, 0, THUMBNAILS_KEPT - 1)
        pipe.expire(self.keys.out_of_range, self.state_ttl_s)
        return True

    def after_pipeline(self, window_count: int) -> None:
        """Ask the background thread to close the window when ``window_count`` (the reply at
        :meth:`add_to_pipeline`'s index) reached ``window_size``. Never blocks."""
        if int(window_count) >= self.window_size:
            self._requests.put("full")

    def close_window(
        self, *, min_images: int, min_age_s: float = 0.0, drop_smaller: bool = False
    ) -> int | None:
        """Atomically close the open window if it has ``min_images`` and is ``min_age_s`` old.

        With ``drop_smaller`` (the time closer), a window ``min_age_s`` old with fewer images
        is deleted instead: too few for the chi-square test to mean anything, and left open it
        would linger, mixing this traffic with traffic hours later. Its counts are discarded,
        not carried into the next window (which starts fresh) and not judged; it takes no
        window id, and a log line (``drift_window_dropped``, at INFO the first time in this
        process, since it means traffic below ``min_window_size`` per ``window_s`` is never
        judged, then at DEBUG) says so.

        Returns:
            The closed window's id, or None when it was not closed (not full, not old, another
            worker closed it first, or dropped).
        """
        if drop_smaller and not min_age_s > 0:
            raise ValueError(f"drop_smaller needs a min_age_s > 0, got {min_age_s!r}")
        window_id, n_images = self.redis.eval(
            _CLOSE_LUA,
            1 + len(self.keys.state),
            self.keys.open,
            *self.keys.state,
            min_images,
            min_age_s,
            self.keys.window_prefix,
            self.window_ttl_s,
            int(drop_smaller),
            self.state_ttl_s,
        )
        if window_id == -1:
            self._log_dropped(int(n_images), min_images, min_age_s)
        return int(window_id) if window_id > 0 else None

    def _log_dropped(self, n_images: int, min_images: int, min_age_s: float) -> None:
        """INFO the first time (it means slow traffic is not judged, and says the fix), then
        DEBUG: a slow model drops a window every ``window_s``."""
        level = logging.DEBUG if self._dropped_logged else logging.INFO
        self._dropped_logged = True
        log.log(
            level,
            "drift: dropped the open window of model %s unjudged: %d images after %g s, fewer "
            "than the %d a judged window needs (traffic this slow is never judged; to judge "
            "it, raise IMGQ_DRIFT_WINDOW_S)",
            self.manifest.name,
            n_images,
            min_age_s,
            min_images,
            extra={
                "event": "drift_window_dropped",
                "model": self.manifest.name,
                "n_images": n_images,
            },
        )

    def close(self) -> None:
        """Stop the background thread (a window being judged is finished first)."""
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                request = self._requests.get(timeout=self._tick_s)
            except queue.Empty:
                request = "tick"
            if request is None:
                return
            try:
                if request == "full":
                    window_id = self.close_window(min_images=self.window_size)
                else:
                    window_id = self.close_window(
                        min_images=self.min_window_size, min_age_s=self.window_s, drop_smaller=True
                    )
                if window_id is not None:
                    self.detector.evaluate(window_id)
            except redis.RedisError:
                log.warning("drift: Redis unavailable; will retry", exc_info=True)
            except Exception:  # a bug here must not kill the thread and stop drift detection
                log.exception("drift: evaluating a window failed")
