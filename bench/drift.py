"""Drift detection matrix: how often each shift is caught per window size, and how often
in-distribution (and horizontally flipped) windows raise a false alarm.

Runs in-process, without Redis, on the functions the workers run: images from
``trainer.sample_data``, decoded by ``shared.decode``, features from ``shared.imagestats``, counts
on the reference's bins, and ``worker.drift.evaluate_window``. The reference comes from a data set
of another seed than the traffic, as a trained bundle's reference comes from its training split.
The predicted class is the true label (a perfect model), so the class-mix shift is judged on
``predicted_class`` alone; the model's confidence and margin are left out.

    .venv/bin/python bench/drift.py                 # about 2 minutes on one core
    .venv/bin/python bench/drift.py --trials 20 --false-alarm-windows 200 --per-class 300

The shifts are in ``imgq/shifts.py``, shared with the worker drift test and the demo.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from imgq.shared.decode import decode_image
from imgq.shared.imagestats import IMAGE_FEATURES, decoded_image_features
from imgq.shared.preprocess import PreprocessSpec
from imgq.shared.reference import ReferenceStats, bin_counts, build_reference
from imgq.shifts import BENIGN, EXPECTED, SHIFTS, shift_image
from imgq.trainer.sample_data import CLASS_NAMES, generate
from imgq.worker.drift import Window, evaluate_window


def _files(data_dir: Path, classes: int) -> list[tuple[Path, int]]:
    return [
        (p, k)
        for k, name in enumerate(CLASS_NAMES[:classes])
        for p in sorted((data_dir / name).iterdir())
    ]


def _features(payloads: list[bytes], spec: PreprocessSpec) -> np.ndarray:
    """Image features as a worker serving a model with ``spec``'s input computes them."""
    images = [decode_image(b) for b in payloads]
    return decoded_image_features(images, [len(b) for b in payloads], spec)


def _alerts(
    reference: ReferenceStats, values: np.ndarray, names: list[str], alpha: float, psi_floor: float
) -> list[str]:
    """Drifting features of one window, largest PSI first."""
    counts = bin_counts(reference, values, names)
    sums = dict(zip(names, values.sum(axis=0).tolist(), strict=True))
    window = Window(id=0, n_images=len(values), start_s=0, end_s=0, counts=counts, sums=sums)
    results = evaluate_window(reference, window, alpha=alpha, psi_floor=psi_floor)
    return [r.name for r in results if r.drifting]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=600, help="traffic images per class")
    p.add_argument("--reference-per-class", type=int, default=250)
    p.add_argument("--shifted-per-class", type=int, default=150)
    p.add_argument("--trials", type=int, default=40, help="windows per shift and size")
    p.add_argument("--false-alarm-windows", type=int, default=1000, help="per window size")
    p.add_argument("--sizes", default="50,100,200,500")
    p.add_argument("--alpha", type=float, default=0.001, help="family-wise, per window")
    p.add_argument("--psi-floor", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="model input side: the pixel features are of the model's input (`imgq train`'s "
        "default is 32)",
    )
    args = p.parse_args()
    spec = PreprocessSpec(height=args.image_size, width=args.image_size)
    sizes = [int(s) for s in args.sizes.split(",")]
    classes = 4
    rng = np.random.default_rng(args.seed)
    names = [*IMAGE_FEATURES, "predicted_class"]
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = generate(
            Path(tmp, "ref"),
            classes=classes,
            per_class=args.reference_per_class,
            size=128,
            seed=1000 + args.seed,
        )
        ref_files = _files(ref_dir, classes)
        ref_values = np.column_stack(
            [_features([f.read_bytes() for f, _ in ref_files], spec), [k for _, k in ref_files]]
        )
        reference = build_reference(ref_values, names, categorical={"predicted_class": classes})
        traffic_dir = generate(
            Path(tmp, "traffic"),
            classes=classes,
            per_class=args.per_class,
            size=128,
            seed=2000 + args.seed,
        )
        files = _files(traffic_dir, classes)
        payloads = [f.read_bytes() for f, _ in files]
        labels = np.array([k for _, k in files])
    pool = np.column_stack([_features(payloads, spec), labels])
    # The shifted pools: the first `shifted_per_class` traffic images of each class.
    subset = np.flatnonzero(np.arange(len(files)) % args.per_class < args.shifted_per_class)
    pools: dict[str, np.ndarray] = {}
    for name in SHIFTS:
        shifted = [shift_image(name, payloads[i]) for i in subset]
        pools[name] = np.column_stack([_features(shifted, spec), labels[subset]])
    for name in BENIGN:  # the whole traffic: false-alarm windows must not overlap much
        pools[name] = np.column_stack(
            [_features([shift_image(name, b) for b in payloads], spec), labels]
        )
    pools["class_mix"] = pool[labels == 0]
    prep_s = time.perf_counter() - start
    print(
        f"reference: {len(ref_files)} images (seed {1000 + args.seed}); traffic: {len(files)} "
        f"images (seed {2000 + args.seed}), {len(subset)} per shifted pool; model input "
        f"{args.image_size}x{args.image_size}; "
        f"alpha={args.alpha}, psi_floor={args.psi_floor}; prepared in {prep_s:.0f} s\n"
    )

    def run(
        values: np.ndarray, size: int, trials: int, expected: frozenset[str] = frozenset()
    ) -> tuple[float, Counter[str], float]:
        """Alert rate, how often each feature ranked first, rate of a right top-two feature."""
        alerted, first, right = 0, Counter[str](), 0
        for _ in range(trials):
            window = values[rng.choice(len(values), size=min(size, len(values)), replace=False)]
            drifting = _alerts(reference, window, names, args.alpha, args.psi_floor)
            alerted += bool(drifting)
            if drifting:
                first[drifting[0]] += 1
                right += bool(set(drifting[:2]) & expected)
        return alerted / trials, first, right / trials

    header = f"{'shift':<16}" + "".join(f"{f'n={s}':>10}" for s in sizes)
    print("Detection rate (alert raised), and [rate with a right feature in the top two]")
    print(header)
    tops: dict[str, Counter[str]] = {}
    for current in [*SHIFTS, "class_mix"]:
        cells = []
        for size in sizes:
            rate, first, right = run(pools[current], size, args.trials, EXPECTED[current])
            tops.setdefault(current, Counter()).update(first)
            cells.append(f"{rate:>5.0%} [{right:>3.0%}]")
        print(f"{current:<16}" + "".join(f"{c:>10}" for c in cells))
    print("\nFalse-alarm rate (windows with any alert)")
    print(header)
    for current, values in (("in-distribution", pool), ("flip", pools["flip"])):
        trials = args.false_alarm_windows
        cells = []
        for size in sizes:
            rate, first, _ = run(values, size, trials)
            tops.setdefault(current, Counter()).update(first)
            cells.append(f"{rate:.1%} ({trials})")
        print(f"{current:<16}" + "".join(f"{c:>14}" for c in cells))
    print("\nFeature ranked first in alerting windows (all sizes):")
    for current, counter in tops.items():
        print(f"  {current:<16} " + ", ".join(f"{f} {c}" for f, c in counter.most_common(4)))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
