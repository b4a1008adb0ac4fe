"""The classification handler: ``imgq.classify`` tasks in, one model call per batch, top-k out.

Per request: the keyword arguments checked against the contract, the image's base64 decoded,
its header probed against the limits and against the batch's decoded-pixel budget (past it the
rest of the batch is :data:`~imgq.worker.handler.DEFERRED`: back to the head of the queue), the
image decoded and resized for the model right away (the full-size frame is freed at once). Then
one ``normalise_batch`` and one ``bundle.predict`` for the good images — if that fails, every
one of them fails visibly — and, with drift statistics on, what drift needs of the batch
(``DriftRecorder.observe_batch``: image features, out-of-range features, novelty from the
model's features output of the same forward pass), handed to the drift observer with each
success.

No I/O: the engine (``worker/engine.py``) takes, stores and acks.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgq.shared.bundle import ModelBundle
from imgq.shared.decode import decode_base64, decode_image, probe_image
from imgq.shared.errors import ImgqError, InvalidTask
from imgq.shared.imagestats import image_features
from imgq.shared.preprocess import normalise_batch, resize_image
from imgq.worker.drift.notify import AlertNotifier, notifier_for_model
from imgq.worker.drift.recorder import BatchDrift, DriftRecorder, Observation
from imgq.worker.handler import DEFERRED, Failure, HandlerContext, Outcome, Request, Success
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from imgq.worker.tracing import phase
from imgq.worker.wire import TASK_NAME

__all__ = ["ClassifyHandler", "build", "validate_kwargs"]

logger = logging.getLogger(__name__)

_ARGUMENTS = ("image", "top_k", "request_id")


@dataclass
class _Good:
    """A request whose image decoded: it goes into the model call."""

    index: int
    top_k: int
    request_id: str | int | None
    queue_ms: float | None


class ClassifyHandler:
    """Classifies a batch of images with one model call.

    Args:
        bundle: The loaded model bundle.
        settings: Decode limits and the batch's decoded-pixel budget.
        metrics: Batch size, images, preprocessing and inference time.
        drift: The drift recorder (an observer of the outcomes), or None.
        notifier: The thread that sends the model's drift pages to the webhook, or None.
    """

    task_name = TASK_NAME

    def __init__(
        self,
        bundle: ModelBundle,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        drift: DriftRecorder | None = None,
        notifier: AlertNotifier | None = None,
    ) -> None:
        self.bundle = bundle
        self.notifier = notifier
        manifest = bundle.manifest
        self._labels = manifest.labels
        self._spec = manifest.preprocess
        self._model = {"name": manifest.name, "sha256": manifest.model_sha256,
                       "version": bundle.version}  # fmt: skip
        self._limits = settings.decode_limits
        self._batch_pixels = settings.batch_pixels
        self.metrics = metrics
        self.drift = drift
        self.observers = [drift] if drift is not None else []
        self._rng = random.Random()

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider that runs the model (the engine waits for fuller
        batches only on CUDA)."""
        return self.bundle.provider

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        """One outcome per request: decode what fits the pixel budget, one model call."""
        t0 = time.perf_counter()
        outcomes: list[Outcome | None] = [None] * len(requests)
        good: list[_Good] = []
        images: list[np.ndarray] = []
        originals: list[tuple[int, int, int]] = []  # width, height, encoded bytes
        pixels = 0
        for i, req in enumerate(requests):
            tick()
            try:
                image_b64, top_k, request_id = validate_kwargs(req.kwargs, len(self._labels))
                data = decode_base64(image_b64, self._limits)
                info = probe_image(data, self._limits)
                if images and pixels + info.width * info.height > self._batch_pixels:
                    outcomes[i:] = [DEFERRED] * (len(requests) - i)  # served in parts
                    break
                pixels += info.width * info.height
                rgb = decode_image(data, self._limits, info)
                # Resize while the decoded frame is hot in cache; the big frame is freed at once.
                model_input = resize_image(rgb, self._spec)
            except ImgqError as exc:
                outcomes[i] = Failure(exc)
                continue
            except Exception as exc:  # a bug on one image must not cost its batch-mates
                logger.exception("unexpected error on task %s", req.task_id)
                outcomes[i] = Failure(exc)
                continue
            good.append(_Good(i, top_k, request_id, req.queue_ms))
            images.append(model_input)
            originals.append((rgb.shape[1], rgb.shape[0], len(data)))
            del rgb, data, image_b64
        if good:
            self._infer(outcomes, good, images, originals, t0)
        return [o if o is not None else Failure(RuntimeError("no outcome")) for o in outcomes]

    def _infer(
        self,
        outcomes: list[Outcome | None],
        good: list[_Good],
        images: list[np.ndarray],
        originals: list[tuple[int, int, int]],
        t0: float,
    ) -> None:
        """One model call for the good images; on failure every one of them fails."""
        # The features output only when drift judges novelty on it: a worker without drift
        # statistics asks onnxruntime for the probabilities alone, as before.
        novelty = self.drift is not None and self.drift.novelty is not None
        penultimate = None
        try:
            stacked = np.stack(images)
            batch = normalise_batch(stacked, self._spec)
            t1 = time.perf_counter()
            # Drift's image features now, while the inputs are in the CPU's caches: after the
            # model call they cost half as much again.
            statistics = self._image_statistics(stacked, originals)
            t_model = time.perf_counter()
            if novelty:
                probs, penultimate = self.bundle.predict_with_features(batch)
            else:
                probs = self.bundle.predict(batch)
            t2 = time.perf_counter()
            if probs.shape != (len(good), len(self._labels)):
                raise RuntimeError(
                    f"the model returned probabilities of shape {probs.shape} for {len(good)} "
                    f"images of {len(self._labels)} classes"
                )
        except Exception as exc:
            logger.exception("model call failed; failing all %d tasks of the batch", len(good))
            for g in good:
                outcomes[g.index] = Failure(exc)
            return
        n = len(good)
        phase("preprocess", t0, t1)  # the batch's spans, while it is traced (worker/tracing/)
        phase("inference", t1, t2)
        self.metrics.batch_size.observe(n)
        self.metrics.images.inc(n)
        self.metrics.preprocess.observe(t1 - t0)
        self.metrics.inference.observe(t2 - t_model)
        # One image of the batch, at random, kept as a sample of its window (rate limited).
        sampled = (
            self._rng.randrange(n) if self.drift is not None and self.drift.sample_due() else -1
        )
        drift = self._drift_statistics(images, statistics, probs, penultimate, sampled)
        preprocess_ms, infer_ms = round((t1 - t0) * 1000, 3), round((t2 - t_model) * 1000, 3)
        order = np.argsort(-probs, axis=1)
        for i, g in enumerate(good):
            p = probs[i]
            top = [{"label": self._labels[j], "score": float(p[j])} for j in order[i, : g.top_k]]
            result: dict[str, Any] = {
                "label": top[0]["label"],
                "score": top[0]["score"],
                "top_k": top,
                "model": self._model,
                "batch_size": n,
                "timings_ms": {"queue": g.queue_ms, "preprocess": preprocess_ms, "infer": infer_ms},
            }
            if g.request_id is not None:
                result["request_id"] = g.request_id
            observation = None
            if drift is not None:
                result["drift"] = drift.drift[i]
                observation = Observation(drift, i)
            outcomes[g.index] = Success(result, observation)

    def _image_statistics(
        self, stacked: np.ndarray, originals: list[tuple[int, int, int]]
    ) -> np.ndarray | None:
        """The batch's image features, or None without drift statistics (or when they fail:
        statistics are an extra, the batch is served without them)."""
        if self.drift is None:
            return None
        try:
            return image_features(stacked, np.asarray(originals, np.float64))
        except Exception:
            logger.exception("drift statistics failed; the batch is served without them")
            return None

    def _drift_statistics(
        self,
        images: list[np.ndarray],
        features: np.ndarray | None,
        probs: np.ndarray,
        penultimate: np.ndarray | None,
        sampled: int,
    ) -> BatchDrift | None:
        """What drift needs of the batch, or None without drift statistics (or when they
        fail, as above)."""
        if self.drift is None or features is None:
            return None
        try:
            return self.drift.observe_batch(images, features, probs, penultimate, sampled=sampled)
        except Exception:
            logger.exception("drift statistics failed; the batch is served without them")
            return None

    def close(self) -> None:
        if self.drift is not None:
            self.drift.close()
        if self.notifier is not None:
            self.notifier.close()


def validate_kwargs(kwargs: Any, n_labels: int) -> tuple[str, int, str | int | None]:
    """Check the task's keyword arguments against the contract.

    Args:
        kwargs: As sent.
        n_labels: How many classes the model has (the largest ``top_k``).

    Returns:
        ``(image_b64, top_k, request_id)``.

    Raises:
        InvalidTask: ``missing_argument``, ``unknown_argument`` or ``bad_argument``.

    >>> validate_kwargs({"image": "aGk=", "top_k": 2}, n_labels=3)
    ('aGk=', 2, None)
    >>> validate_kwargs({"image": "aGk=", "top_k": True}, n_labels=3)
    Traceback (most recent call last):
    ...
    imgq.shared.errors.InvalidTask: bad_argument: top_k must be an integer in 1..3, got True
    """
    unknown = sorted(set(kwargs) - set(_ARGUMENTS))
    if unknown:
        raise InvalidTask(
            "unknown_argument",
            f"unexpected {', '.join(map(repr, unknown))}; "
            f"{TASK_NAME} takes {', '.join(_ARGUMENTS)}",
        )
    if "image" not in kwargs:
        raise InvalidTask("missing_argument", "`image` (base64 of the encoded image) is required")
    image = kwargs["image"]
    if not isinstance(image, str):
        raise InvalidTask(
            "bad_argument", f"image must be a base64 string, got {type(image).__name__}"
        )
    top_k = kwargs.get("top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_labels:
        raise InvalidTask(
            "bad_argument", f"top_k must be an integer in 1..{n_labels}, got {top_k!r:.40}"
        )
    request_id = kwargs.get("request_id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, (str, int))
    ):
        raise InvalidTask(
            "bad_argument",
            f"request_id must be a string or an integer, got {type(request_id).__name__}",
        )
    return image, top_k, request_id


def build(context: HandlerContext, folder: Path) -> ClassifyHandler:
    """The handler of the bundle in ``folder``: loaded and checked (sha256, signature, golden
    set on this worker's execution provider), its model calls sized, and drift statistics when
    on.

    Raises:
        BundleError, ManifestError: the bundle fails its checks.
    """
    settings = context.settings
    bundle = ModelBundle.load(folder, device=settings.device, threads=settings.threads)
    ms_per_image = _size_model_calls(bundle, settings)
    drift = None
    if settings.drift_enabled:
        drift = DriftRecorder(
            context.redis,
            bundle.manifest,
            window_size=settings.drift_window,
            window_s=settings.drift_window_s,
            metrics=context.metrics,
        )
    manifest = bundle.manifest
    context.metrics.model_info.labels(
        manifest.name, manifest.model_sha256, bundle.version, bundle.provider
    ).set(1)
    logger.info(
        "model loaded",
        extra={
            "model": manifest.name,
            "sha256": manifest.model_sha256,
            "version": bundle.version,
            "provider": bundle.provider,
            "bundle": str(bundle.directory),
            "max_wait_ms": settings.wait_ms_for(bundle.provider),
            "infer_batch": bundle.infer_batch,
            "ms_per_image_by_call_size": ms_per_image,
        },
    )
    notifier = None
    if drift is not None:  # pages of this model to the webhook, when one is set
        notifier = notifier_for_model(context.redis, settings, manifest.drift_id, context.metrics)
    return ClassifyHandler(bundle, settings, context.metrics, drift, notifier)


def _size_model_calls(bundle: ModelBundle, settings: WorkerSettings) -> dict[int, float] | None:
    """``IMGQ_INFER_BATCH``, or on CPU the call size measured cheapest per image (a few seconds
    at start, ``ModelBundle.calibrate_infer_batch``); on CUDA one call per batch.

    Returns:
        The measured milliseconds per image by call size, or None when nothing was measured.
    """
    if settings.infer_batch:
        bundle.infer_batch = min(settings.infer_batch, settings.max_batch)
    elif bundle.provider == "CPUExecutionProvider" and settings.max_batch > 1:
        return bundle.calibrate_infer_batch(settings.max_batch)
    return None
