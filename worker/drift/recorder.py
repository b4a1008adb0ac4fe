"""The worker's side of drift: each batch's counts for the open window (added by the batch's
settle script), out-of-range thumbnails, and a background thread that closes full or old
windows and has the detector judge them (never on the hot path).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import redis

from imgq.shared.errors import ManifestError
from imgq.shared.imagestats import (
    IMAGE_FEATURES,
    IMAGE_FEATURES_VERSION,
    PIXEL_FEATURES,
)
from imgq.shared.manifest import Manifest
from imgq.shared.reference import RangeCheck
from imgq.worker.broker.settle import WindowCounts
from imgq.worker.drift.counting import WindowCounter
from imgq.worker.drift.detector import DriftDetector
from imgq.worker.drift.layout import (
    _ADD_LUA,
    _ADD_WINDOW_FUNCTION_LUA,
    _CLOSE_LUA,
    ALL_FEATURES,
    STATE_TTL_S,
    DriftKeys,
    _check_ttl,
)
from imgq.worker.drift.samples import SampleWriter
from imgq.worker.drift.thumbnails import ThumbnailWriter
from imgq.worker.drift.verdict import NOTICE_ALPHA, PAGE_ALPHA
from imgq.worker.metrics import WorkerMetrics

__all__ = ["BatchDrift", "DriftRecorder", "Observation"]

log = logging.getLogger("imgq.drift")


@dataclasses.dataclass(slots=True)
class BatchDrift:
    """What drift sees of one batch's classified images, computed once for the whole batch by
    :meth:`DriftRecorder.observe_batch`; each image's :class:`Observation` points into it.

    Attributes:
        features: ``(N, len(IMAGE_FEATURES))`` image features.
        probs: ``(N, K)`` the model's probabilities.
        pixel_outside: ``(N,)`` whether a pixel feature is out of range (the window's count).
        out_of_range: Per image, its features outside the training range.
        novelty: ``(N,)`` novelty (above 1: novel), or None without a novelty model.
        embedding: ``(N, r)`` the features on the novelty model's principal axes, or None.
        model_inputs: The images as the model saw them (thumbnails and samples are made of the
            few that are kept).
        sampled: The row kept as a sample of the window (``worker/drift/samples.py``), or -1.
        drift: Per image, the task result's ``drift`` entry.
    """

    features: np.ndarray
    probs: np.ndarray
    pixel_outside: np.ndarray
    out_of_range: list[list[str]]
    novelty: np.ndarray | None
    embedding: np.ndarray | None
    model_inputs: Sequence[np.ndarray]
    sampled: int
    drift: list[dict[str, Any]]


class Observation(NamedTuple):
    """What drift sees of one classified image: a row of its batch's :class:`BatchDrift`."""

    batch: BatchDrift
    row: int


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
        self.thumbnails = ThumbnailWriter(self.keys, thumbnails_per_s, state_ttl_s)
        self.samples = SampleWriter(self.keys, manifest, samples_per_s, state_ttl_s)
        self.novelty = manifest.novelty
        self.counter = WindowCounter(manifest, self.detector.layout, self.keys.open, state_ttl_s)
        self._range_check = RangeCheck(manifest.reference, IMAGE_FEATURES)
        # The estimated-accuracy test's null distribution for a full window (0.1-0.3 s): at
        # start-up, not in the middle of serving when the first window is judged.
        self.detector.prepare(window_size)
        self._requests: queue.Queue[str | None] = queue.Queue()
        self._tick_s = min(self.window_s / 4, 5.0)
        self._thread = threading.Thread(target=self._run, name="imgq-drift", daemon=True)
        self._thread.start()

    def out_of_range(self, image_features: np.ndarray) -> list[list[str]]:
        """Per image of an (N, len(IMAGE_FEATURES)) batch, its features outside the training
        range (the task result's ``drift.out_of_range``)."""
        return self._range_check(image_features)

    def observe_batch(
        self,
        model_inputs: Sequence[np.ndarray],
        features: np.ndarray,
        probs: np.ndarray,
        penultimate: np.ndarray | None,
        *,
        sampled: int = -1,
    ) -> BatchDrift:
        """Everything drift needs of a classified batch, vectorised over the batch: the
        out-of-range check, novelty (with ``penultimate``, the model's features output, when
        the bundle has a novelty model), and each result's ``drift`` entry.

        Args:
            model_inputs: The images as the model saw them (RGB uint8, its input size).
            features: ``(N, len(IMAGE_FEATURES))`` their :func:`~shared.imagestats.image_features`
                (the handler computes them before the model call, while the inputs are in the
                CPU's caches).
            probs: ``(N, K)`` the model's probabilities.
            penultimate: ``(N, D)`` the model's features output, or None.
            sampled: The row to keep as a sample of the window, or -1.
        """
        outside = self._range_check.outside(features)
        out_of_range = self._range_check.names_of(outside)
        pixel_outside = np.asarray(outside[:, : len(PIXEL_FEATURES)].any(axis=1))
        novelty = embedding = None
        if self.novelty is not None and penultimate is not None:
            novelty, embedding = self.novelty.score(penultimate)
            shown = np.round(novelty, 4).tolist()
            novel = (novelty > 1.0).tolist()
            drift = [
                {"out_of_range": o, "novelty": v, "novel": b}
                for o, v, b in zip(out_of_range, shown, novel, strict=True)
            ]
        else:
            drift = [{"out_of_range": o} for o in out_of_range]
        return BatchDrift(
            features, probs, pixel_outside, out_of_range, novelty, embedding, model_inputs,
            sampled, drift,
        )  # fmt: skip

    # -- the Observer protocol (imgq.worker.handler) ----------------------------------------------

    #: The Lua function ``add_window(key, n, pairs, ttl)`` that the batch's settle script
    #: (``worker/broker/settle.py``) includes, so that the counts go in with the results, once.
    lua_add_window = _ADD_WINDOW_FUNCTION_LUA

    def window_counts(self, observations: Sequence[Observation]) -> list[WindowCounts]:
        """The counts of these images for the open window, for the settle script: their
        batch's arrays as they are when all of its images count (the usual case), else the
        rows that do."""
        if not observations:
            return []
        batches: dict[int, tuple[BatchDrift, list[int]]] = {}
        for o in observations:
            batches.setdefault(id(o.batch), (o.batch, []))[1].append(o.row)
        parts = [
            (b.features, b.probs, b.pixel_outside, b.novelty)
            if len(rows) == len(b.probs)
            else (
                b.features[rows],
                b.probs[rows],
                b.pixel_outside[rows],
                None if b.novelty is None else b.novelty[rows],
            )
            for b, rows in batches.values()
        ]
        if len(parts) == 1:
            features, probs, outside, novelty = parts[0]
        else:
            features = np.concatenate([p[0] for p in parts])
            probs = np.concatenate([p[1] for p in parts])
            outside = np.concatenate([p[2] for p in parts])
            novelties = [p[3] for p in parts if p[3] is not None]
            novelty = np.concatenate(novelties) if len(novelties) == len(parts) else None
        return [self.counter.counts_of(features, probs, novelty=novelty, pixel_outside=outside)]

    def after_settle(self, counted: Mapping[str, int]) -> None:
        """:meth:`after_pipeline` with the open window's count."""
        if self.keys.open in counted:
            self.after_pipeline(counted[self.keys.open])

    def extras(self, pipe: Any, observations: Sequence[Observation]) -> None:
        """Thumbnails of the batch's first out-of-range input and of its first novel input
        (beside its nearest training images), each rate limited, and the batch's sampled input
        with its answer."""
        labels = self.manifest.labels
        for batch, row in _first(observations, lambda b, i: bool(b.out_of_range[i])):
            label = labels[int(np.argmax(batch.probs[row]))]
            self.thumbnails.out_of_range(
                pipe, batch.model_inputs[row], batch.out_of_range[row], label
            )
        novel = lambda b, i: b.novelty is not None and bool(b.novelty[i] > 1.0)  # noqa: E731
        for batch, row in _first(observations, novel):
            assert batch.novelty is not None and batch.embedding is not None
            assert self.novelty is not None
            label = labels[int(np.argmax(batch.probs[row]))]
            neighbours = self.novelty.nearest_gallery(batch.embedding[row])
            self.thumbnails.novel(
                pipe, batch.model_inputs[row], float(batch.novelty[row]), label, neighbours
            )
        for batch, row in _first(observations, lambda b, i: b.sampled == i):
            novelty = None if batch.novelty is None else float(batch.novelty[row])
            self.samples.add(
                pipe, batch.model_inputs[row], batch.probs[row], batch.out_of_range[row], novelty
            )

    def sample_due(self) -> bool:
        """Whether the handler should mark one image of this batch :attr:`Observation.sampled`
        (rate limited per worker; a True is counted as taken)."""
        return self.samples.due()

    # -- counts ---------------------------------------------------------------------------------

    def add_to_pipeline(self, pipe: Any, image_features: np.ndarray, probs: np.ndarray) -> int:
        """Queue this batch's counts on ``pipe`` as one EVAL of its own (for callers without a
        settle script: tests, benchmarks, tools).

        Returns:
            Index, in ``pipe.execute()``'s reply list, of the open window's new image count; pass
            that reply to :meth:`after_pipeline`.
        """
        counts = self.counter.counts_of(image_features, probs)
        index = len(pipe)
        pipe.eval(_ADD_LUA, 1, counts.key, counts.images, counts.pairs, counts.ttl_s)
        return index

    def add_out_of_range_thumbnail(
        self, pipe: Any, rgb: np.ndarray, features: list[str], label: str | None = None
    ) -> bool:
        """Keep a small JPEG of an out-of-range input for the review page and ``imgq drift
        report``, at most ``thumbnails_per_s`` per second per worker
        (:meth:`ThumbnailWriter.out_of_range`).

        Returns:
            True when a thumbnail was queued, False when the rate limit skipped it.
        """
        return self.thumbnails.out_of_range(pipe, rgb, features, label)

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


def _first(
    observations: Sequence[Observation], wanted: Callable[[BatchDrift, int], bool]
) -> list[tuple[BatchDrift, int]]:
    """The first observation whose row is ``wanted``, as ``[(batch, row)]``, or ``[]``."""
    for batch, row in observations:
        if wanted(batch, row):
            return [(batch, row)]
    return []
