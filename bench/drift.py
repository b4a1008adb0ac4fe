"""Drift tiers against harm: per shift, the model's true accuracy, how often a window of 200
pages and how often it only notices, and the estimated accuracy beside the true one.

Runs in-process, without Redis, on what the workers run: a bundle trained by ``imgq train``
(small architecture) on ``imgq sample-data``, fresh traffic of another seed decoded by
``shared.decode``, the model through ``shared.bundle.ModelBundle`` (onnxruntime), the features
of ``shared.imagestats``, the window's counts as the recorder makes them (bins, pixel features
out of range, calibrated confidence), and ``worker.drift.evaluate_window`` with the detector's
defaults. Windows are random draws of the traffic pool of each case (harmful or foreign images
mixed into in-distribution traffic for the partial cases).

    .venv/bin/python bench/drift.py                     # ~3 minutes on 2 cores, training included
    .venv/bin/python bench/drift.py --bundle MODEL_DIR  # an existing bundle of the sample data

Targets (issue 18): harmless shifts (accuracy within 1 point) page in <= 5% of windows; shifts
costing >= 10 points page in >= 95%; a fifth of the window harmed pages in >= 80%; a tenth of
the inputs out of distribution pages in >= 50%; in-distribution windows page in <= 1%
(Wilson 95% interval); estimated accuracy within 3 points where confidence stays calibrated.
The shifts of ``imgq/shifts.py`` are reused; the others are defined here.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from imgq.shared.bundle import ModelBundle
from imgq.shared.calibration import calibrated_top1
from imgq.shared.decode import decode_image
from imgq.shared.imagestats import PIXEL_FEATURES, decoded_image_features, output_features
from imgq.shared.reference import RangeCheck
from imgq.shifts import SHIFTS, reencode_like, shift_image
from imgq.trainer.sample_data import CLASS_NAMES, generate
from imgq.worker.drift import ALL_FEATURES, Window, evaluate_window, window_tier
from imgq.worker.drift.harm import AccuracyTest

_Shift = Callable[[bytes], bytes]


def _pixels(fn: Callable[[np.ndarray], np.ndarray]) -> _Shift:
    """A pixel change, re-encoded as the original was (only the pixels change)."""
    return lambda data: reencode_like(data, fn(decode_image(data)))


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _noise(sigma: float) -> _Shift:
    rng = np.random.default_rng(5)
    return _pixels(lambda rgb: _u8(rgb + rng.normal(0, sigma, rgb.shape)))


def _down_up(k: int) -> _Shift:
    def change(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        small = cv2.resize(rgb, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)

    return _pixels(change)


def _jpeg(quality: int) -> _Shift:
    def encode(data: bytes) -> bytes:
        bgr = cv2.cvtColor(decode_image(data), cv2.COLOR_RGB2BGR)
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()

    return encode


def _pil_png(data: bytes) -> bytes:
    """A lossless re-encode by another library (Pillow, compression 9): same pixels, other
    bytes per pixel."""
    buf = io.BytesIO()
    Image.fromarray(decode_image(data)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _from_shifts(name: str) -> _Shift:
    return lambda data: shift_image(name, data)


#: Whole-window shifts, each applied to every in-distribution traffic image.
WHOLE: dict[str, _Shift] = {
    "flip": _from_shifts("flip"),
    **{name: _from_shifts(name) for name in SHIFTS},
    "gamma_0.8": _pixels(lambda rgb: _u8(255 * (rgb / 255.0) ** 0.8)),
    "contrast_0.8": _pixels(lambda rgb: _u8((rgb.astype(np.float32) - 128) * 0.8 + 128)),
    "noise_5": _noise(5),
    "noise_20": _noise(20),
    "down_up_x2": _down_up(2),
    "jpeg_q75": _jpeg(75),
    "png_pillow": _pil_png,
    "noise_50": _noise(50),
    "down_up_x8": _down_up(8),
    "blur_sigma4": _pixels(lambda rgb: cv2.GaussianBlur(rgb, (0, 0), 4.0)),
    "night": _from_shifts("night"),
    "zoom_corner": _from_shifts("zoom_corner"),
    "occlude_half": _from_shifts("occlude_half"),
}
#: Partial cases: (pool mixed in, share of the window).
PARTIAL: dict[str, tuple[str, float]] = {
    "fifth_zoom_corner": ("zoom_corner", 0.2),
    "fifth_occlude_half": ("occlude_half", 0.2),
    "tenth_foreign": ("foreign", 0.1),
    "tenth_unseen_class": ("unseen_class", 0.1),
}


def _foreign(n: int, seed: int) -> list[bytes]:
    """Inputs of another kind than the training images, in turn: a covered lens (near black),
    an over-exposed frame, sensor noise, a text page."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(96, 160)), int(rng.integers(96, 160))
        kind = i % 4
        if kind == 0:
            rgb = _u8(rng.normal(8, 4, (h, w, 3)))
        elif kind == 1:
            rgb = _u8(rng.normal(248, 4, (h, w, 3)))
        elif kind == 2:
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            rgb = np.full((h, w, 3), 245, np.uint8)
            for y in range(8, h - 8, 12):
                cv2.putText(rgb, "lorem ipsum dolor", (4, y + 8), 0, 0.3, (20, 20, 20), 1)
        out.append(cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
    return out


class Pool:
    """What the recorder counts of each image of a traffic pool, and whether the model was
    right: a window is a draw of rows."""

    def __init__(self, bundle: ModelBundle, payloads: list[bytes], labels: np.ndarray) -> None:
        manifest = bundle.manifest
        images = [decode_image(b) for b in payloads]
        probs = bundle.classify_images(images)
        features = decoded_image_features(images, [len(b) for b in payloads], manifest.preprocess)
        values = np.hstack([features, output_features(probs)])
        reference = manifest.reference
        self.bins = {
            name: np.clip(
                np.searchsorted(np.asarray(reference.features[name].edges), values[:, j], "right")
                - 1,
                0,
                len(reference.features[name].counts) - 1,
            )
            for j, name in enumerate(ALL_FEATURES)
        }
        self.values = values
        self.outside = (
            RangeCheck(reference, PIXEL_FEATURES)
            .outside(features[:, : len(PIXEL_FEATURES)])
            .any(axis=1)
        )
        assert manifest.calibration is not None, "the bundle has no calibration: re-export it"
        self.calibrated = calibrated_top1(probs, manifest.calibration.temperature)
        self.right = probs.argmax(axis=1) == labels
        self.n_bins = {name: len(reference.features[name].counts) for name in ALL_FEATURES}

    def __len__(self) -> int:
        return len(self.right)


def _window(parts: list[tuple[Pool, np.ndarray]]) -> tuple[Window, float]:
    """The window the workers would sum from these rows, and its true accuracy."""
    counts = {
        name: sum(np.bincount(p.bins[name][rows], minlength=p.n_bins[name]) for p, rows in parts)
        for name in ALL_FEATURES
    }
    sums = {
        name: float(sum(p.values[rows, j].sum() for p, rows in parts))
        for j, name in enumerate(ALL_FEATURES)
    }
    n = sum(len(rows) for _, rows in parts)
    window = Window(
        id=0,
        n_images=n,
        start_s=0.0,
        end_s=0.0,
        counts=counts,  # type: ignore[arg-type]
        sums=sums,
        out_of_range=int(sum(p.outside[rows].sum() for p, rows in parts)),
        calibrated_confidence_sum=float(sum(p.calibrated[rows].sum() for p, rows in parts)),
    )
    return window, sum(p.right[rows].sum() for p, rows in parts) / n


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a rate ``k / n``.

    >>> [round(x, 4) for x in wilson(0, 1000)]
    [0.0, 0.0038]
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _bundle(args: argparse.Namespace, tmp: Path) -> Path:
    if args.bundle:
        return Path(args.bundle)
    from imgq.trainer.train import train_bundle  # TensorFlow: only when a model must be made

    data = generate(tmp / "shapes", classes=4, per_class=args.train_per_class, seed=args.seed)
    return train_bundle(data, tmp / "model", arch="small", seed=args.seed, progress=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="a bundle trained on `imgq sample-data` (else one is trained)")
    p.add_argument("--train-per-class", type=int, default=500, help="sample images per class")
    p.add_argument("--traffic-per-class", type=int, default=600, help="traffic images per class")
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--windows", type=int, default=200, help="windows per shift")
    p.add_argument("--in-distribution-windows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        bundle = ModelBundle.load(_bundle(args, tmp), device="cpu")
        trained_s = time.perf_counter() - start
        manifest = bundle.manifest
        traffic = generate(
            tmp / "traffic", classes=8, per_class=args.traffic_per_class, seed=2000 + args.seed
        )
        seen = [name for name in CLASS_NAMES[:8] if name in manifest.labels]
        unseen = [name for name in CLASS_NAMES[:8] if name not in manifest.labels]
        files = [f for name in seen for f in sorted((traffic / name).iterdir())]
        payloads = [f.read_bytes() for f in files]
        labels = np.array([manifest.labels.index(f.parent.name) for f in files])
        unseen_payloads = [
            f.read_bytes() for name in unseen for f in sorted((traffic / name).iterdir())[::2]
        ]
    assert manifest.calibration is not None
    accuracy_test = AccuracyTest(manifest.calibration.held_out_confidence)
    pools = {"in-distribution": Pool(bundle, payloads, labels)}
    # Shifted pools from every other traffic image: half the preparation, windows still drawn
    # from 1,200 images per case.
    for name, shift in WHOLE.items():
        pools[name] = Pool(bundle, [shift(b) for b in payloads[::2]], labels[::2])
    no_label = np.full(len(unseen_payloads), -1)
    pools["unseen_class"] = Pool(bundle, unseen_payloads, no_label)
    foreign = _foreign(len(payloads) // 8, args.seed)
    pools["foreign"] = Pool(bundle, foreign, np.full(len(foreign), -1))
    prep_s = time.perf_counter() - start - trained_s
    reference = manifest.reference
    print(
        f"bundle {manifest.name} ({manifest.short_sha}): test accuracy "
        f"{manifest.training.get('test_accuracy', float('nan')):.3f}, output reference "
        f"{sum(reference.features['confidence'].counts)} held-out images, held-out out of range "
        f"{reference.held_out_out_of_range}, temperature {manifest.calibration.temperature:.3g}; "
        f"traffic {len(payloads)} images per pool (seed {2000 + args.seed}); windows of "
        f"{args.window}; trained in {trained_s:.0f} s, pools in {prep_s:.0f} s\n"
    )
    base = pools["in-distribution"]
    base_accuracy = float(base.right.mean())

    def run(case: str, trials: int) -> dict[str, float | str]:
        """Page and notice rates, accuracies, and which page test fired most."""
        tiers: Counter[str] = Counter()
        fired: Counter[str] = Counter()
        true_acc, est_acc = [], []
        mixed, share = PARTIAL.get(case, (case, 1.0))
        k = round(args.window * share)
        for _ in range(trials):
            parts = [(pools[mixed], rng.choice(len(pools[mixed]), k, replace=False))]
            if k < args.window:
                parts.append((base, rng.choice(len(base), args.window - k, replace=False)))
            window, accuracy = _window(parts)
            results = evaluate_window(
                reference, window, labels=manifest.labels, accuracy_test=accuracy_test
            )
            tiers[window_tier(results)] += 1
            fired.update(r.name for r in results if r.drifting and r.tier == "page")
            true_acc.append(accuracy)
            est_acc.append(window.calibrated_confidence_sum / window.n_images)
        errors = np.array(est_acc) - np.array(true_acc)
        return {
            "page": tiers["page"] / trials,
            "notice": tiers["notice"] / trials,
            "pages": tiers["page"],
            "accuracy": float(np.mean(true_acc)),
            "estimated": float(np.mean(est_acc)),
            "within3": float(np.mean(np.abs(errors) <= 0.03)),
            "fired": ", ".join(f"{n} {c}" for n, c in fired.most_common(3)),
        }

    print(
        f"{'case':<22}{'accuracy':>9}{'change':>8}{'page':>7}{'notice':>8}{'est.acc':>9}"
        f"{'|err|<=3':>9}  target   page tests that fired (windows)"
    )
    failed = []
    cases = ["in-distribution", *WHOLE, *PARTIAL]
    for case in cases:
        trials = args.in_distribution_windows if case == "in-distribution" else args.windows
        r = run(case, trials)
        change = 100 * (float(r["accuracy"]) - base_accuracy)
        target, ok = _target(case, change, float(r["page"]), int(r["pages"]), trials)
        if not ok:
            failed.append(case)
        print(
            f"{case:<22}{r['accuracy']:>9.1%}{change:>+8.1f}{r['page']:>7.1%}{r['notice']:>8.1%}"
            f"{r['estimated']:>9.1%}{r['within3']:>9.0%}  {target:<8} {r['fired']}"
        )
    total_s = time.perf_counter() - start
    print(f"\nmissed targets: {', '.join(failed) or 'none'}; total {total_s:.0f} s")
    return 0


def _target(case: str, change: float, page: float, pages: int, trials: int) -> tuple[str, bool]:
    """The issue's target for this case, and whether it was reached. ``night`` puts inputs
    outside the training range, which is page evidence by design (docs/drift.md) whatever the
    accuracy: no target."""
    if case == "night":
        return "(range)", True
    if case == "in-distribution":
        low, high = wilson(pages, trials)
        return f"<=1% [{low:.1%}, {high:.1%}]", high <= 0.01
    if case.startswith("fifth"):
        return ">=80%", page >= 0.8
    if case.startswith("tenth"):
        return ">=50%", page >= 0.5
    if abs(change) <= 1.0:
        return "<=5%", page <= 0.05
    if change <= -10.0:
        return ">=95%", page >= 0.95
    return "-", True


if __name__ == "__main__":
    sys.exit(main())
