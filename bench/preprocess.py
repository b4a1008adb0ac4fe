"""Throughput of shared/'s decode + preprocess + image statistics, against naive baselines.

Run pinned to one core, as recorded in docs/benchmarks.md::

    taskset -c 0 .venv/bin/python bench/preprocess.py

Every figure is measured in this run: the baselines (plain ``cv2.imdecode``; the textbook
``(x * scale - mean) / std``) sit beside the imgq path, so the ratios hold on any machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cv2
import numpy as np

from shared.decode import decode_image
from shared.imagestats import image_features
from shared.preprocess import PreprocessSpec, normalise_batch, preprocess_batch, resize_image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BATCH = 32


def _jpeg_640x480(seed: int = 0) -> bytes:
    """A photo-like 640x480 JPEG (smooth colour field, shapes, sensor noise), quality 90."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(30, 230, (6, 8, 3), dtype=np.uint8), (640, 480),
                     interpolation=cv2.INTER_CUBIC)  # fmt: skip
    for _ in range(12):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(img, (int(rng.integers(0, 640)), int(rng.integers(0, 480))),
                   int(rng.integers(10, 90)), colour, -1)  # fmt: skip
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _per_s(fn: Callable[[], object], images_per_call: int, seconds: float) -> float:
    """Images per second of ``fn``: best of five timed rounds of about ``seconds / 5`` each."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(seconds / 5 / max(time.perf_counter() - start, 1e-9)))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return images_per_call / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core: OpenCV's own threads would only contend
    jpeg = _jpeg_640x480()
    raw = np.frombuffer(jpeg, np.uint8)
    rgb = decode_image(jpeg)
    s = args.seconds
    print(f"640x480 JPEG, {len(jpeg)} bytes; one thread; best of 5 rounds")

    base = _per_s(lambda: cv2.imdecode(raw, cv2.IMREAD_COLOR), 1, s)
    dec = _per_s(lambda: decode_image(jpeg), 1, s)
    rows = [
        ("baseline: cv2.imdecode alone", base, ""),
        ("decode_image (probe + decode)", dec, f"{dec / base:.2f}x imdecode"),
    ]
    for side in (224, 64):
        spec = PreprocessSpec(height=side, width=side, mean=MEAN, std=STD)

        def one(spec: PreprocessSpec = spec) -> object:
            return preprocess_batch([decode_image(jpeg)], spec)

        def batch(spec: PreprocessSpec = spec) -> object:
            return preprocess_batch([decode_image(jpeg) for _ in range(BATCH)], spec)

        for label, fn, n in (("per image", one, 1), (f"batch {BATCH}", batch, BATCH)):
            per_s = _per_s(fn, n, s)
            rows.append((f"decode+resize+normalise {side}, {label}", per_s,
                         f"{per_s / base:.2f}x imdecode"))  # fmt: skip

    spec = PreprocessSpec(height=224, width=224, mean=MEAN, std=STD)
    one_img = resize_image(rgb, spec)[None]
    many = np.repeat(one_img, BATCH, axis=0)
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    scale = np.float32(spec.scale)
    naive = _per_s(lambda: (one_img.astype(np.float32) * scale - mean) / std, 1, s)
    lut1 = _per_s(lambda: normalise_batch(one_img, spec), 1, s)
    lutb = _per_s(lambda: normalise_batch(many, spec), BATCH, s)
    feats = _per_s(lambda: image_features(rgb, len(jpeg)), 1, s)
    rows += [
        ("baseline: naive (x*scale-mean)/std 224, per image", naive, ""),
        ("normalise_batch (LUT) 224, per image", lut1, f"{lut1 / naive:.1f}x naive"),
        (f"normalise_batch (LUT) 224, batch {BATCH}", lutb, f"{lutb / naive:.1f}x naive"),
        ("image_features of the 640x480 image", feats,
         f"{1e3 / feats:.3f} ms/image = {100 * dec / feats:.0f}% of decode_image"),
    ]  # fmt: skip
    width = max(len(name) for name, _, _ in rows)
    print(f"{'measurement':<{width}}  {'images/s':>9}  note")
    for name, per_s, note in rows:
        print(f"{name:<{width}}  {per_s:>9,.0f}  {note}")


if __name__ == "__main__":
    main()
