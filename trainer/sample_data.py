"""`imgq sample-data`: a labelled image data set drawn offline, for the demo and the tests.

Each class is a shape (circle, square, triangle, ...). Everything else varies at random and
independently of the class: position, scale, rotation, the object's colour and fill texture
(solid, stripes, checks), a background of coloured low-frequency texture with clutter lines,
uneven lighting, sensor noise, blur, source resolution and aspect, and the encoding (JPEG of
varied quality, or PNG). So no single pixel statistic separates the classes, the model has to
learn shape, and the drift features see a realistic spread. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CLASS_NAMES", "generate", "main"]

#: Class names in order; ``generate(classes=N)`` uses the first N.
CLASS_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "hexagon", "ring", "crescent",
)  # fmt: skip

_Outline = Callable[[float], np.ndarray]  # rotation (radians) -> (P, 2) unit-radius polygon


def _regular(n: int, inner: float | None = None) -> _Outline:
    """A regular n-gon, or an n-pointed star when ``inner`` (radius ratio) is given."""

    def outline(rotation: float) -> np.ndarray:
        k = 2 * n if inner else n
        angles = rotation + np.arange(k) * 2 * math.pi / k
        radii = np.where(np.arange(k) % 2, inner, 1.0) if inner else np.ones(k)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)

    return outline


def _cross(rotation: float) -> np.ndarray:
    a = 0.33  # half the arm width, in radii
    pts = np.array(
        [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
         (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)], dtype=np.float64,
    )  # fmt: skip
    c, s = math.cos(rotation), math.sin(rotation)
    return pts @ np.array([[c, s], [-s, c]])


_OUTLINES: dict[str, _Outline] = {
    "circle": _regular(48),
    "square": _regular(4),
    "triangle": _regular(3),
    "star": _regular(5, inner=0.45),
    "cross": _cross,
    "hexagon": _regular(6),
}


def _shape_mask(
    name: str, h: int, w: int, cx: float, cy: float, r: float, rot: float
) -> np.ndarray:
    """A float32 0..1 anti-aliased mask of one shape."""
    mask = np.zeros((h, w), np.uint8)
    shift = 4  # sub-pixel precision of cv2's polygon drawing
    if name in _OUTLINES:
        pts = _OUTLINES[name](rot) * r + (cx, cy)
        cv2.fillPoly(mask, [np.round(pts * (1 << shift)).astype(np.int32)], 255, cv2.LINE_AA, shift)
    else:
        center = (round(cx * 16), round(cy * 16))
        cv2.circle(mask, center, round(r * 16), 255, -1, cv2.LINE_AA, 4)
        if name == "ring":
            cv2.circle(mask, center, round(r * 0.55 * 16), 0, -1, cv2.LINE_AA, 4)
        else:  # crescent: a disc with an offset disc removed
            off = (
                round((cx + 0.45 * r * math.cos(rot)) * 16),
                round((cy + 0.45 * r * math.sin(rot)) * 16),
            )
            cv2.circle(mask, off, round(r * 0.85 * 16), 0, -1, cv2.LINE_AA, 4)
    return mask.astype(np.float32) / 255.0


def _smooth_field(
    rng: np.random.Generator, h: int, w: int, channels: int, cells: int
) -> np.ndarray:
    """Low-frequency random texture, 0..1, from a small random grid upsampled smoothly."""
    grid = rng.random((cells, cells, channels), dtype=np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return field.reshape(h, w, channels)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour 0..255 with any hue, saturation and value."""
    hsv = np.array(
        [[[rng.integers(0, 180), rng.integers(0, 256), rng.integers(30, 256)]]], np.uint8
    )
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray | None:
    """Where the object shows its second colour: stripes or checks at a random angle and period,
    or None for a solid fill; float32 0/1."""
    kind = rng.choice(3, p=[0.6, 0.2, 0.2])
    if kind == 0:
        return None
    period = rng.uniform(4, 12) * max(h, w) / 128
    theta = rng.uniform(0, math.pi)
    xx = np.arange(w, dtype=np.float32)[None, :] / period
    yy = np.arange(h, dtype=np.float32)[:, None] / period
    pattern = (xx * math.cos(theta) + yy * math.sin(theta)).astype(np.int32)
    if kind == 2:
        pattern += (yy * math.cos(theta) - xx * math.sin(theta)).astype(np.int32)
    return (pattern & 1).astype(np.float32)


def _paint(img: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``img`` blended towards a flat ``colour`` by the per-pixel ``weight`` (0..1)."""
    flat = np.empty_like(img)
    flat[:] = colour
    return cv2.blendLinear(img, flat, 1 - weight, weight)


def _draw(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One RGB uint8 image of the class ``name``."""
    side = size * rng.uniform(0.6, 1.6)
    aspect = rng.uniform(0.75, 1.33)
    w, h = max(16, round(side * math.sqrt(aspect))), max(16, round(side / math.sqrt(aspect)))

    base = _random_colour(rng)
    texture = _smooth_field(rng, h, w, 3, int(rng.integers(2, 5)))
    img: np.ndarray = np.clip(base + (texture - 0.5) * np.float32(rng.uniform(20, 80)), 0, 255)
    for _ in range(rng.integers(0, 3)):  # clutter lines
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p1, p2, _random_colour(rng).tolist(), 1, cv2.LINE_AA)

    r = min(w, h) * rng.uniform(0.25, 0.45)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    mask = _shape_mask(name, h, w, cx, cy, r, rng.uniform(0, 2 * math.pi))
    colour = _random_colour(rng)
    # Keep the object visible: its value differs from the background under it by >= 60.
    under = np.asarray(cv2.mean(img, mask=(mask > 0.5).astype(np.uint8))[:3], np.float32)
    if abs(float(colour.mean()) - float(under.mean())) < 60:
        colour = np.where(under.mean() > 127, colour * 0.3, 255 - (255 - colour) * 0.3)
        colour = colour.astype(np.float32)
    img = _paint(img, colour, mask)
    pattern = _pattern(rng, h, w)
    if pattern is not None:
        second = np.clip(colour * rng.uniform(0.6, 0.85) + rng.uniform(0, 40), 0, 255)
        img = _paint(img, second.astype(np.float32), mask * pattern)

    # Uneven lighting (0.55..1.35 across the image, times a global exposure) and sensor noise.
    light = (0.55 + 0.8 * _smooth_field(rng, h, w, 1, 2)) * np.float32(rng.uniform(0.7, 1.2))
    img = cv2.multiply(img, cv2.cvtColor(light, cv2.COLOR_GRAY2RGB))
    noise = np.empty_like(img)
    cv2.setRNGSeed(int(rng.integers(2**31)))  # OpenCV's Gaussian noise is ~4x numpy's speed
    sigma = np.full(3, rng.uniform(0, 8))  # per channel: a scalar would reach channel 0 only
    cv2.randn(noise, np.zeros(3), sigma)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5))
    return img


def _encode(rgb: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """JPEG (quality 40..95) two times in three, else PNG."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if rng.random() < 2 / 3:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 96))])
        ext = ".jpg"
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        ext = ".png"
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {rgb.shape} image as {ext}")
    return buf.tobytes(), ext


def generate(
    out_dir: str | Path, *, classes: int = 4, per_class: int = 300, size: int = 128, seed: int = 0
) -> Path:
    """Write a labelled data set: ``out_dir/<class>/<class>_<i>.jpg|png``.

    Args:
        out_dir: Folder to write into (created; existing files of the same names are replaced).
        classes: Number of classes, 2..8 (the first of :data:`CLASS_NAMES`). Defaults to 4.
        per_class: Images per class. Defaults to 300.
        size: Typical image side in pixels; each image is 0.6x..1.6x of it with an aspect of
            0.75..1.33. Defaults to 128.
        seed: Random seed; the same seed writes the same files. Defaults to 0.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: an argument is out of range.
    """
    if not 2 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"classes must be 2..{len(CLASS_NAMES)}, got {classes}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be 32..1024 pixels, got {size}")
    out = Path(out_dir)
    for k, name in enumerate(CLASS_NAMES[:classes]):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # One generator per image: the file does not depend on how many others are made.
            rng = np.random.default_rng([seed, k, i])
            data, ext = _encode(_draw(name, rng, size), rng)
            (folder / f"{name}_{i:04d}{ext}").write_bytes(data)
    return out


def main(args: argparse.Namespace) -> int:
    """`imgq sample-data OUT_DIR [--classes N] [--per-class N] [--size PX] [--seed S]`."""
    start = time.perf_counter()
    try:
        out = generate(
            args.out_dir, classes=args.classes, per_class=args.per_class, size=args.size,
            seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        print(f"imgq sample-data: {exc}")
        return 2
    names = ", ".join(CLASS_NAMES[: args.classes])
    print(
        f"wrote {args.classes * args.per_class} images ({args.per_class} per class: {names}) "
        f"to {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
