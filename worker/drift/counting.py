"""A batch's counts for the open drift window: every bin of every feature, the sums, and the
out-of-range, novel and calibrated-confidence counts, as the one text argument the settle
script adds (``worker/broker/settle.py``). Vectorised over the batch: it runs on the hot path."""

from __future__ import annotations

import numpy as np

from imgq.shared.calibration import calibrated_top1
from imgq.shared.imagestats import PIXEL_FEATURES, output_features
from imgq.shared.manifest import Manifest
from imgq.shared.reference import RangeCheck
from imgq.worker.broker.settle import WindowCounts
from imgq.worker.drift.layout import ALL_FEATURES, SUM_SCALE, WindowLayout

__all__ = ["WindowCounter"]


class WindowCounter:
    """Counts batches into the open window's slots (``WindowLayout``).

    Args:
        manifest: The served model's manifest (its reference bins and calibration).
        layout: The window's layout of slots.
        open_key: The open window's Redis key.
        state_ttl_s: The TTL each add refreshes.
    """

    def __init__(
        self, manifest: Manifest, layout: WindowLayout, open_key: str, state_ttl_s: int
    ) -> None:
        self.open_key = open_key
        self.state_ttl_s = state_ttl_s
        ref = manifest.reference.features
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
        # The page tier's out-of-range share: images with a pixel feature out of range.
        self._pixel_check = RangeCheck(manifest.reference, PIXEL_FEATURES)
        self._out_of_range_slot = layout.out_of_range_slot
        self._calibrated_slot = layout.calibrated_confidence_slot
        self._novel_slot = layout.novel_slot
        calibration = manifest.calibration
        self._temperature = None if calibration is None else calibration.temperature

    def counts_of(
        self,
        image_features: np.ndarray,
        probs: np.ndarray,
        *,
        novelty: np.ndarray | None = None,
        pixel_outside: np.ndarray | None = None,
    ) -> WindowCounts:
        """A batch's counts for the open window.

        Args:
            image_features: (N, len(IMAGE_FEATURES)) features of the batch's inferred images.
            probs: (N, K) their probabilities, in the same order.
            novelty: (N,) their novelty (the novel ones are counted), or None.
            pixel_outside: (N,) whether a pixel feature is out of range, if known (else
                checked here).
        """
        values = (
            np.hstack([image_features, output_features(probs)])
            if len(probs)
            else np.empty((0, len(ALL_FEATURES)))
        )
        increments = np.bincount(self._bin_numbers(values), minlength=self._n_slots)
        summed = values[:, self._sum_columns]
        summed = np.where(np.isfinite(summed), summed, 0.0)  # NaN is counted in the last bin
        increments[self._sum_slots] = np.rint(summed.sum(axis=0) * SUM_SCALE)
        if len(probs):
            increments[self._out_of_range_slot] = (
                np.count_nonzero(pixel_outside)
                if pixel_outside is not None
                else self._pixel_check.count(image_features[:, : len(PIXEL_FEATURES)])
            )
            if novelty is not None:
                increments[self._novel_slot] = np.count_nonzero(novelty > 1.0)
            if self._temperature is not None:
                calibrated = calibrated_top1(probs, self._temperature).sum()
                increments[self._calibrated_slot] = np.rint(calibrated * SUM_SCALE)
        slots = np.flatnonzero(increments)
        # "slot increment slot increment ...": one argument instead of ~2 per slot, which
        # redis-py would encode one by one (~1 ms per batch of 32); one % in C to write it.
        pairs = tuple(np.column_stack([slots, increments[slots]]).ravel().tolist())
        text = ("%d %d " * len(slots) % pairs)[:-1]
        return WindowCounts(self.open_key, len(image_features), text, self.state_ttl_s)

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
