"""Throughput of shared/'s decode + preprocess + image statistics, against naive baselines.

Run pinned to one core, as recorded in docs/benchmarks.md::

    taskset -c 0 .venv/bin/python bench/preprocess.py

The batch rows also count page faults per call; glibc's allocator settings decide them, e.g.
``MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456`` keeps freed batch buffers
in the process (see docs/benchmarks.md).

Every figure is measured in this run: the baselines (plain ``cv2.imdecode``; the textbook
``(x * scale - mean) / std``; Pillow's header probe, which ``probe_image`` falls back to) sit
beside the imgq path, so the ratios hold on any machine.
"""

from __future__ import annotations

import argparse
import functools
import resource
import time
from collections.abc import Callable

import cv2
import numpy as np

from imgq.shared.decode import decode_image, probe_image
from imgq.shared.imagestats import image_features
from imgq.shared.preprocess import PreprocessSpec, normalise_batch, preprocess_batch, resize_image
from imgq.shared.probe import _probe_pillow

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BATCH = 32


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth colour field, filled circles, sensor noise."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(30, 230, (6, 8, 3), dtype=np.uint8), (width, height),
                     interpolation=cv2.INTER_CUBIC)  # fmt: skip
    for _ in range(12):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(img, (int(rng.integers(0, width)), int(rng.integers(0, height))),
                   int(rng.integers(width // 64 + 1, width // 7 + 2)), colour, -1)  # fmt: skip
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def _jpeg_640x480(seed: int = 0) -> bytes:
    """A photo-like 640x480 JPEG, quality 90."""
    return cv2.imencode(".jpg", _photo(480, 640, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


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


def _page_faults(fn: Callable[[], object]) -> int:
    """Minor page faults of one call of ``fn``: memory the kernel had to map (and zero) anew
    because the allocator gave freed blocks back to it."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


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

        def batch_streamed(spec: PreprocessSpec = spec) -> object:
            # The same bytes as batch(): each frame is resized as soon as it is decoded, so only
            # one full-size frame is alive at a time instead of 32 (29 MB).
            resized = [resize_image(decode_image(jpeg), spec) for _ in range(BATCH)]
            return normalise_batch(np.stack(resized), spec)

        for label, fn, n in (
            ("per image", one, 1),
            (f"batch {BATCH}, decode all then preprocess_batch", batch, BATCH),
            (f"batch {BATCH}, resize_image after each decode", batch_streamed, BATCH),
        ):
            per_s = _per_s(fn, n, s)
            note = f"{per_s / base:.2f}x imdecode, {_page_faults(fn):,} page faults/call"
            rows.append((f"decode+resize+normalise {side}, {label}", per_s, note))

    spec = PreprocessSpec(height=224, width=224, mean=MEAN, std=STD)
    one_img = resize_image(rgb, spec)[None]
    many = np.repeat(one_img, BATCH, axis=0)
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    scale = np.float32(spec.scale)
    naive = _per_s(lambda: (one_img.astype(np.float32) * scale - mean) / std, 1, s)
    lut1 = _per_s(lambda: normalise_batch(one_img, spec), 1, s)
    lutb = _per_s(lambda: normalise_batch(many, spec), BATCH, s)
    originals = np.tile([rgb.shape[1], rgb.shape[0], len(jpeg)], (BATCH, 1))
    feats = _per_s(lambda: image_features(many, originals), BATCH, s)
    rows += [
        ("baseline: naive (x*scale-mean)/std 224, per image", naive, ""),
        ("normalise_batch (LUT) 224, per image", lut1, f"{lut1 / naive:.1f}x naive"),
        (f"normalise_batch (LUT) 224, batch {BATCH}", lutb, f"{lutb / naive:.1f}x naive"),
        (f"image_features 224, batch {BATCH}", feats,
         f"{1e3 / feats:.3f} ms/image = {100 * dec / feats:.0f}% of decode_image"),
    ]  # fmt: skip

    # Sample-data-sized inputs (128x128, ~10 kB): here the header probe used to cost more than
    # OpenCV's decode. The baseline is the Pillow probe that probe_image falls back to.
    small = _photo(128, 128, seed=1)
    small_files = {
        "JPEG": cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
        "PNG": cv2.imencode(".png", small[..., ::-1])[1].tobytes(),
    }
    for fmt, data in small_files.items():
        buf = np.frombuffer(data, np.uint8)
        pillow = _per_s(functools.partial(_probe_pillow, data), 1, s)
        probe = _per_s(functools.partial(probe_image, data), 1, s)
        small_base = _per_s(functools.partial(cv2.imdecode, buf, cv2.IMREAD_COLOR), 1, s)
        small_dec = _per_s(functools.partial(decode_image, data), 1, s)
        rows += [
            (f"128x128 {fmt} ({len(data) / 1e3:.0f} kB): baseline Pillow header probe", pillow,
             f"{1e3 / pillow:.3f} ms"),
            (f"128x128 {fmt}: probe_image", probe, f"{probe / pillow:.0f}x Pillow probe"),
            (f"128x128 {fmt}: cv2.imdecode alone", small_base, f"{1e3 / small_base:.3f} ms"),
            (f"128x128 {fmt}: decode_image", small_dec, f"{small_dec / small_base:.2f}x imdecode"),
        ]  # fmt: skip
    # The sample model's inputs: 32 x 32.
    small_inputs = np.repeat(
        resize_image(small, PreprocessSpec(height=32, width=32))[None], BATCH, 0
    )
    small_originals = np.tile([128, 128, len(small_files["JPEG"])], (BATCH, 1))
    small_feats = _per_s(lambda: image_features(small_inputs, small_originals), BATCH, s)
    rows.append((f"image_features 32, batch {BATCH} (128x128 originals)", small_feats,
                 f"{1e3 / small_feats:.3f} ms/image"))  # fmt: skip
    width = max(len(name) for name, _, _ in rows)
    print(f"{'measurement':<{width}}  {'images/s':>9}  note")
    for name, per_s, note in rows:
        print(f"{name:<{width}}  {per_s:>9,.0f}  {note}")


if __name__ == "__main__":
    main()
