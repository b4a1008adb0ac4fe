"""Drift tiers against harm: per shift, the model's true accuracy, how often a window of 200
pages and how often it only notices, and the estimated accuracy beside the true one; per model,
how well novelty tells images of classes the model never saw from its own (issues 18 and 26).

Runs in-process, without Redis, on what the workers run: bundles trained by ``imgq train``
(small architecture) on four classes of ``imgq sample-data``, fresh traffic of another seed
decoded by ``shared.decode``, the model through ``shared.bundle.ModelBundle`` (onnxruntime:
probabilities and penultimate features, one pass), the features of ``shared.imagestats``, the
novelty of ``shared.novelty``, the window's counts as the recorder makes them (bins, pixel
features out of range, calibrated confidence, novel images), and
``worker.drift.evaluate_window`` with the detector's defaults. Windows are random draws of the
traffic pool of each case (harmful, foreign or unseen-class images mixed into in-distribution
traffic for the partial cases). The unseen classes are the sample data's other four shapes
(cross, hexagon, ring, crescent): held out of training.

    .venv/bin/python bench/drift.py                        # 3 models (seeds 0-2), ~12 min
    .venv/bin/python bench/drift.py --seeds 0 --compare-scores   # one model, + score AUROCs
    .venv/bin/python bench/drift.py --bundle MODEL_DIR     # an existing bundle of the sample data

Targets (issue 26, on top of issue 18's): in-distribution windows page in <= 0.5% (Wilson 95%
upper bound); the harmless shifts (noise 5 and 20, darken, blur, JPEG, gamma, contrast, colour
cast, re-encodes) page in <= 2% each; a tenth of the window from unseen classes pages in >= 60%,
a fifth in >= 90%; a tenth foreign inputs in >= 90%; whole-window harm in 100%; per image,
novelty separates unseen classes from the test split with AUROC >= 0.85. ``--compare-scores``
adds the AUROC of the other scores (``bench/novelty_scores.py``). The shifts of
``imgq/shifts.py`` are reused; the others are defined here.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from novelty_scores import auroc, compare
from PIL import Image

from imgq.shared.bundle import ModelBundle
from imgq.shared.calibration import calibrated_top1
from imgq.shared.decode import decode_image
from imgq.shared.imagestats import (
    IMAGE_FEATURES,
    PIXEL_FEATURES,
    decoded_image_features,
    output_features,
)
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
    "fifth_unseen_class": ("unseen_class", 0.2),
}
#: Issue 18's harmless shifts, which issue 26 wants to page in at most 2% of windows.
HARMLESS = (
    "noise_5", "noise_20", "darken", "blur", "jpeg_q15", "jpeg_q75", "gamma_0.8",
    "contrast_0.8", "colour_cast", "png_pillow",
)  # fmt: skip


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
    """What the recorder counts of each image of a traffic pool, whether the model was right,
    and its penultimate features and novelty: a window is a draw of rows."""

    def __init__(self, bundle: ModelBundle, payloads: list[bytes], labels: np.ndarray) -> None:
        manifest = bundle.manifest
        assert manifest.novelty is not None, "the bundle has no novelty model: re-export it"
        self.features = np.empty((len(payloads), manifest.novelty.n_features), np.float32)
        probs = np.empty((len(payloads), len(manifest.labels)), np.float32)
        image_values = np.empty((len(payloads), len(IMAGE_FEATURES)))
        for start in range(0, len(payloads), 256):  # bounded memory: 256 decoded images
            part = payloads[start : start + 256]
            images = [decode_image(b) for b in part]
            rows = slice(start, start + len(part))
            probs[rows], self.features[rows] = bundle.features_of_images(images)
            image_values[rows] = decoded_image_features(
                images, [len(b) for b in part], manifest.preprocess
            )
        self.probs = probs
        values = np.hstack([image_values, output_features(probs)])
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
            .outside(image_values[:, : len(PIXEL_FEATURES)])
            .any(axis=1)
        )
        assert manifest.calibration is not None, "the bundle has no calibration: re-export it"
        self.calibrated = calibrated_top1(probs, manifest.calibration.temperature)
        self.novelty = manifest.novelty.score(self.features)[0]
        self.novel = self.novelty > 1.0
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
        novel=int(sum(p.novel[rows].sum() for p, rows in parts)),
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


class Traffic:
    """The encoded traffic every model is judged on (made once, shared by the models): fresh
    in-distribution images of the four training classes, every whole-window shift of every
    other one, the unseen classes (every other image) and foreign inputs."""

    def __init__(self, root: Path, per_class: int, seed: int, classes: tuple[str, ...]) -> None:
        self.seed = 2000 + seed
        folder = root / f"traffic-{self.seed}-{per_class}"
        if not (folder / CLASS_NAMES[7]).is_dir():  # made whole before, in a --work-dir
            generate(folder, classes=8, per_class=per_class, seed=self.seed)
        files = [f for name in classes for f in sorted((folder / name).iterdir())]
        self.payloads = [f.read_bytes() for f in files]
        self.classes = [f.parent.name for f in files]
        self.shifted = {
            name: _shifted(folder.with_name(folder.name + "-" + name), self.payloads[::2], shift)
            for name, shift in WHOLE.items()
        }
        self.unseen = [
            f.read_bytes()
            for name in CLASS_NAMES[:8]
            if name not in classes
            for f in sorted((folder / name).iterdir())[::2]
        ]
        self.unseen_class = [
            name for name in CLASS_NAMES[:8] if name not in classes
            for _ in sorted((folder / name).iterdir())[::2]
        ]  # fmt: skip
        self.foreign = _foreign(len(self.payloads) // 8, seed)


def _shifted(folder: Path, payloads: list[bytes], shift: _Shift) -> list[bytes]:
    """``shift`` of every payload, kept in ``folder`` (a --work-dir's is reused)."""
    if folder.is_dir() and len(list(folder.iterdir())) == len(payloads):
        return [p.read_bytes() for p in sorted(folder.iterdir())]
    folder.mkdir(parents=True, exist_ok=True)
    out = [shift(b) for b in payloads]
    for i, data in enumerate(out):
        (folder / f"{i:05d}").write_bytes(data)
    return out


def _bundles(args: argparse.Namespace, work: Path) -> list[tuple[Path, Path | None]]:
    """The bundles to judge, each with its training data folder (None when given as
    ``--bundle`` without ``--data``); trained ones are reused from a --work-dir."""
    if args.bundle:
        data = Path(args.data) if args.data else None
        return [(Path(b), data) for b in args.bundle]
    made = []
    for seed in args.seeds:
        data = work / f"shapes-{seed}-{args.train_per_class}"
        model = work / f"model-{seed}-{args.train_per_class}"
        if not (model / "manifest.json").is_file():
            from imgq.trainer.train import train_bundle  # TensorFlow: only to make a model

            generate(data, classes=4, per_class=args.train_per_class, seed=seed)
            train_bundle(data, model, arch="small", seed=seed, progress=False)
        made.append((model, data))
    return made


def _split_files(bundle_dir: Path, data: Path | None, part: str) -> list[Path]:
    """The files of a split of the bundle's training data (``history.json``), if at hand."""
    history = bundle_dir / "history.json"
    if data is None or not history.is_file():
        return []
    names = json.loads(history.read_text())["split"][part]
    return [data / n for n in names if (data / n).is_file()]


def judge_model(
    bundle_dir: Path, data: Path | None, traffic: Traffic, args: argparse.Namespace
) -> dict[str, Any]:
    """Every case's rates for one bundle, printed as a table; returns the figures."""
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    bundle = ModelBundle.load(bundle_dir, device="cpu")
    manifest = bundle.manifest
    assert manifest.calibration is not None and manifest.novelty is not None
    labels = np.array([manifest.labels.index(c) for c in traffic.classes])
    pools = {"in-distribution": Pool(bundle, traffic.payloads, labels)}
    for name, payloads in traffic.shifted.items():
        pools[name] = Pool(bundle, payloads, labels[::2])
    pools["unseen_class"] = Pool(bundle, traffic.unseen, np.full(len(traffic.unseen), -1))
    pools["foreign"] = Pool(bundle, traffic.foreign, np.full(len(traffic.foreign), -1))
    test_files = _split_files(bundle_dir, data, "test")
    test_pool = (
        Pool(bundle, [f.read_bytes() for f in test_files], np.zeros(len(test_files), int))
        if test_files
        else None
    )
    prep_s = time.perf_counter() - started
    accuracy_test = AccuracyTest(manifest.calibration.held_out_confidence)
    reference = manifest.reference
    novel_reference = manifest.novelty.held_out_novel
    print(
        f"\n## bundle {manifest.name} ({manifest.short_sha}, {bundle_dir}): test accuracy "
        f"{manifest.training.get('test_accuracy', float('nan')):.3f}, output reference "
        f"{sum(reference.features['confidence'].counts)} held-out images, held-out out of range "
        f"{reference.held_out_out_of_range}, temperature {manifest.calibration.temperature:.3g}, "
        f"novelty: {manifest.novelty.projection.shape[1]} components, held-out novel "
        f"{novel_reference}; traffic {len(traffic.payloads)} images per pool (seed "
        f"{traffic.seed}); windows of {args.window}; pools in {prep_s:.0f} s\n"
    )
    base = pools["in-distribution"]
    base_accuracy = float(base.right.mean())

    def run(case: str, trials: int) -> dict[str, Any]:
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
                reference, window, labels=manifest.labels, accuracy_test=accuracy_test,
                novel_reference=novel_reference,
            )  # fmt: skip
            tiers[window_tier(results)] += 1
            fired.update(r.name for r in results if r.drifting and r.tier == "page")
            true_acc.append(accuracy)
            est_acc.append(window.calibrated_confidence_sum / window.n_images)
        errors = np.array(est_acc) - np.array(true_acc)
        return {
            "page": tiers["page"] / trials,
            "notice": tiers["notice"] / trials,
            "pages": tiers["page"],
            "trials": trials,
            "accuracy": float(np.mean(true_acc)),
            "estimated": float(np.mean(est_acc)),
            "within3": float(np.mean(np.abs(errors) <= 0.03)),
            "novel": float(pools[mixed].novel.mean()),
            "fired": ", ".join(f"{n} {c}" for n, c in fired.most_common(3)),
        }

    print(
        f"{'case':<22}{'accuracy':>9}{'change':>8}{'novel':>7}{'page':>7}{'notice':>8}"
        f"{'est.acc':>9}{'|err|<=3':>9}  target           page tests that fired (windows)"
    )
    figures: dict[str, Any] = {"bundle": str(bundle_dir), "name": manifest.name, "cases": {}}
    failed = []
    for case in ["in-distribution", *WHOLE, *PARTIAL]:
        trials = args.in_distribution_windows if case == "in-distribution" else args.windows
        r = run(case, trials)
        change = 100 * (r["accuracy"] - base_accuracy)
        target, ok = _target(case, change, r["page"], r["pages"], trials)
        r |= {"change": change, "target": target, "reached": ok}
        figures["cases"][case] = r
        if not ok:
            failed.append(case)
        novel = f"{r['novel']:.1%}" if case in pools or case in PARTIAL else ""
        print(
            f"{case:<22}{r['accuracy']:>9.1%}{change:>+8.1f}{novel:>7}{r['page']:>7.1%}"
            f"{r['notice']:>8.1%}{r['estimated']:>9.1%}{r['within3']:>9.0%}  {target:<16} "
            f"{r['fired']}"
        )
    unseen = pools["unseen_class"].novelty
    negatives = {"traffic": base.novelty}
    if test_pool is not None:
        negatives = {"test split": test_pool.novelty, **negatives}
    figures["auroc"] = {name: auroc(neg, unseen) for name, neg in negatives.items()}
    by_class = {
        name: auroc(next(iter(negatives.values())), unseen[np.array(traffic.unseen_class) == name])
        for name in dict.fromkeys(traffic.unseen_class)
    }
    first = next(iter(figures["auroc"]))
    reached = figures["auroc"][first] >= 0.85
    if not reached:
        failed.append("novelty AUROC")
    print(
        "\nper-image novelty AUROC, unseen classes vs "
        + ", ".join(f"{n} {v:.3f}" for n, v in figures["auroc"].items())
        + f" (target >= 0.85 vs the {first}: {'reached' if reached else 'NOT reached'}); by "
        "class vs the " + first + ": " + ", ".join(f"{n} {v:.3f}" for n, v in by_class.items())
    )
    figures["auroc_by_class"] = by_class
    if args.compare_scores:
        train_files = _split_files(bundle_dir, data, "train")
        if not train_files:
            print("--compare-scores needs the training data (--data DIR with --bundle)")
        else:
            y = np.array([manifest.labels.index(f.parent.name) for f in train_files])
            train = Pool(bundle, [f.read_bytes() for f in train_files], y)
            in_dist = {"traffic": (base.features, base.probs)}
            if test_pool is not None:
                in_dist = {"test split": (test_pool.features, test_pool.probs), **in_dist}
            unseen_pool = pools["unseen_class"]
            held = {"unseen": (unseen_pool.features, unseen_pool.probs)}
            print("\nnovelty scores compared (AUROC, unseen classes vs in-distribution):\n")
            print("\n".join(compare(bundle, (train.features, y), in_dist, held)))
    figures["missed"] = failed
    print(f"\nmissed targets: {', '.join(failed) or 'none'}; {time.perf_counter() - started:.0f} s")
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", help="a bundle trained on 4 classes of "
                   "`imgq sample-data` (repeatable; else one is trained per --seeds)")  # fmt: skip
    p.add_argument("--data", help="the --bundle's training data (for the test split's AUROC)")
    p.add_argument("--seeds", default="0,1,2", help="models to train, one per seed")
    p.add_argument("--train-per-class", type=int, default=500, help="sample images per class")
    p.add_argument("--traffic-per-class", type=int, default=600, help="traffic images per class")
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--windows", type=int, default=200, help="windows per shift")
    p.add_argument("--in-distribution-windows", type=int, default=2000)
    p.add_argument("--compare-scores", action="store_true", help="AUROC of other scores too")
    p.add_argument("--seed", type=int, default=0, help="traffic and window draws")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--work-dir", help="keep the models and traffic here (reused when re-run)")
    args = p.parse_args()
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in a log
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(args.work_dir or tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        bundles = _bundles(args, tmp)
        trained_s = time.perf_counter() - start
        classes = ModelBundle.load(bundles[0][0], device="cpu").manifest.labels
        traffic = Traffic(tmp, args.traffic_per_class, args.seed, tuple(classes))
        print(
            f"{len(bundles)} bundle(s) in {trained_s:.0f} s; traffic made in "
            f"{time.perf_counter() - start - trained_s:.0f} s"
        )
        for bundle_dir, data in bundles:
            results.append(judge_model(bundle_dir, data, traffic, args))
    print("\n## Issue 26's targets, every model\n")
    print(_summary(results))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _summary(results: list[dict[str, Any]]) -> str:
    """One row per target, one column per model."""
    head = "| target | " + " | ".join(r["name"] + " " + Path(r["bundle"]).name for r in results)
    lines = [head + " |", "|---|" + "---:|" * len(results)]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")

    def rate(case: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: (
            f"{r['cases'][case]['page']:.1%}" + ("" if r["cases"][case]["reached"] else " (missed)")
        )

    def in_distribution(r: dict[str, Any]) -> str:
        case = r["cases"]["in-distribution"]
        interval = case["target"].split(" ", 1)[-1]
        return f"{case['page']:.1%} {interval}" + ("" if case["reached"] else " (missed)")

    row("in-distribution pages <= 0.5% (Wilson 95%)", in_distribution)
    row("harmless shifts page <= 2% each (worst)", lambda r: max(
        (f"{r['cases'][c]['page']:.1%} {c}" for c in HARMLESS), key=lambda t: float(t.split("%")[0])
    ))  # fmt: skip
    row("a tenth unseen classes >= 60%", rate("tenth_unseen_class"))
    row("a fifth unseen classes >= 90%", rate("fifth_unseen_class"))
    row("a tenth foreign >= 90%", rate("tenth_foreign"))
    row("whole-window harm 100% (zoom, covered)", lambda r: ", ".join(
        f"{r['cases'][c]['page']:.0%}" for c in ("zoom_corner", "occlude_half")))  # fmt: skip
    row("novelty AUROC >= 0.85", lambda r: ", ".join(
        f"{v:.3f} vs {n}" for n, v in r["auroc"].items()))  # fmt: skip
    row("missed", lambda r: ", ".join(r["missed"]) or "none")
    return "\n".join(lines)


def _target(case: str, change: float, page: float, pages: int, trials: int) -> tuple[str, bool]:
    """The issues' target for this case, and whether it was reached. ``night`` (darker than
    any training image, accuracy within a point) has none: its inputs leave the pixel range,
    which with a novelty model is notice evidence unless the features or outputs agree."""
    if case == "night":
        return "-", True
    if case == "in-distribution":
        low, high = wilson(pages, trials)
        return f"<=0.5% [{low:.1%}, {high:.1%}]", high <= 0.005
    if case in HARMLESS:
        return "<=2%", page <= 0.02
    if case in ("tenth_unseen_class",):
        return ">=60%", page >= 0.6
    if case in ("fifth_unseen_class", "tenth_foreign"):
        return ">=90%", page >= 0.9
    if case.startswith("fifth"):
        return ">=80%", page >= 0.8
    if abs(change) <= 1.0:
        return "<=2%", page <= 0.02
    if change <= -10.0:
        return "100%", page >= 1.0
    return "-", True


if __name__ == "__main__":
    sys.exit(main())
