"""The worst images a worker accepts at the default limits: CPU and peak memory of each decode.

Run from the repository root::

    .venv/bin/python bench/worst_image.py             # every image, 3 runs of each
    .venv/bin/python bench/worst_image.py --only png_rgba_flat --repeat 1

Every image is built in memory and is accepted by ``probe_image`` at ``DEFAULT_LIMITS``
(20 MiB, 40 million pixels, aspect <= 20): 8000 x 5000 pixels, either flat (a few hundred kB,
like the 167 kB RGBA PNG that cost 1.1 GB and 3 s) or noise made as expensive as the byte limit
allows (PNG: one Huffman-coded literal per byte, Paeth-filtered; JPEG and WebP: noise at the
highest quality that fits). Each image is measured in a fresh subprocess, so the peak is its
own: CPU seconds of ``decode_image``, of ``decode_image`` + ``resize_image`` to 224 x 224 (a
default ``PreprocessSpec``), and the peak RSS increase over the process after imports and a
warm-up (``VmHWM`` reset through ``/proc/self/clear_refs``). OpenCV runs on one thread, as in
the worker.

Both columns come from this run: "before" is a private copy of the Pillow path as it was before
it worked in bands (whole-frame ``convert``, ``np.asarray`` and uint16 compositing), "after" is
``shared.decode.decode_image``. Images on OpenCV's path run the same code in both columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from imgq.shared import decode
from imgq.shared.decode import DEFAULT_LIMITS, decode_image, probe_image
from imgq.shared.preprocess import PreprocessSpec, resize_image

WIDTH, HEIGHT = 8000, 5000
assert WIDTH * HEIGHT <= DEFAULT_LIMITS.max_pixels
#: Encoded sizes aim below this share of the byte limit.
_FILL = 0.95
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PAETH = 4


# ---------------------------------------------------------------------------------------------
# "before": the Pillow path as it was, kept here as the baseline.


def _decode_before(data: bytes) -> np.ndarray:
    """``decode_image`` before the banded Pillow path (same probe, same OpenCV path)."""
    info = probe_image(data)
    if (
        info.format in decode._OPENCV_FORMATS
        and info.mode in decode._OPENCV_MODES
        and not decode._has_alpha(data, info)
    ):
        return np.ascontiguousarray(decode._decode_opencv(data, info))
    return np.ascontiguousarray(_decode_pillow_before(data))


def _decode_pillow_before(data: bytes) -> np.ndarray:
    """Before: ``exif_transpose`` copies, ``convert`` copies, ``np.asarray`` copies twice."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)
        if upright.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in upright.info:
            return _over_white_before(np.asarray(upright.convert("RGBA")))
        if upright.mode.startswith("I;16"):
            return np.repeat((np.asarray(upright) >> 8).astype(np.uint8)[..., None], 3, axis=2)
        return np.asarray(upright.convert("RGB"))


def _over_white_before(rgba: np.ndarray) -> np.ndarray:
    """Before: whole-frame uint16 temporaries."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    mixed = rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127
    return (mixed // 255).astype(np.uint8)


DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "before": _decode_before,
    "after": decode_image,
}


# ---------------------------------------------------------------------------------------------
# The images.


def _png(width: int, height: int, depth: int, colour: int, idat: bytes, *chunks: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + b"".join(chunks)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_flat(pixel: bytes, depth: int, colour: int, *chunks: bytes) -> bytes:
    """Every pixel ``pixel``, filter None, deflate level 9: ~1000:1."""
    row = b"\0" + pixel * WIDTH
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(HEIGHT)) + packer.flush()
    return _png(WIDTH, HEIGHT, depth, colour, idat, *chunks)


def _png_noise(
    channels: int, colour: int, symbols: int, p_zero: float, *chunks: bytes, seed: int = 0
) -> bytes:
    """8-bit PNG whose filtered bytes are random in ``0..symbols-1`` (``0`` with probability
    ``p_zero`` when ``symbols == 2``), Paeth-filtered rows, deflated with Huffman codes only: the
    inflater decodes one literal per byte and unfilters every byte, the most work per encoded
    byte a PNG can ask for."""
    rng = np.random.default_rng(seed)
    row_bytes = 1 + WIDTH * channels
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    parts = []
    for y0 in range(0, HEIGHT, 100):
        rows = min(100, HEIGHT - y0)
        if symbols == 2:
            block = (rng.random((rows, row_bytes), np.float32) >= p_zero).astype(np.uint8)
        else:
            block = rng.integers(0, symbols, (rows, row_bytes), np.uint8)
        block[:, 0] = _PAETH
        parts.append(packer.compress(block.tobytes()))
    return _png(WIDTH, HEIGHT, 8, colour, b"".join(parts) + packer.flush(), *chunks)


def _p_zero_to_fit(raw_bytes: int) -> float:
    """Share of zero bytes that Huffman-only coding of {0, 1} packs into the byte budget: the
    codes are 1 bit for 0 and 2 bits for 1 (the end-of-block code takes the third), so a byte
    costs ``2 - p_zero`` bits."""
    bits_per_byte = _FILL * DEFAULT_LIMITS.max_bytes * 8 / raw_bytes
    return min(0.999, max(0.0, 2.0 - bits_per_byte))


def _noise_rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)


def _highest_quality_that_fits(
    encode: Callable[[np.ndarray, int], bytes], rgb: np.ndarray
) -> bytes:
    """Encode at the highest quality (of 95, 90, ..., 5) whose size fits the byte budget, judged
    on a tenth of the rows first, then checked on the whole image."""
    budget = _FILL * DEFAULT_LIMITS.max_bytes
    sample = rgb[: HEIGHT // 10]
    qualities = [q for q in range(95, 0, -5) if len(encode(sample, q)) * 10 <= budget] or [5]
    for quality in qualities:
        data = encode(rgb, quality)
        if len(data) <= DEFAULT_LIMITS.max_bytes:
            return data
    raise RuntimeError("no quality fits the byte limit")


def _cv_jpeg(progressive: bool) -> Callable[[np.ndarray, int], bytes]:
    def encode(rgb: np.ndarray, quality: int) -> bytes:
        params = [
            cv2.IMWRITE_JPEG_QUALITY, quality,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
            cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive),
        ]  # fmt: skip
        return cv2.imencode(".jpg", rgb[..., ::-1], params)[1].tobytes()

    return encode


def _pil(mode: str, fmt: str, **options: object) -> Callable[[np.ndarray, int], bytes]:
    def encode(rgb: np.ndarray, quality: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, fmt, quality=quality, **options)
        return buf.getvalue()

    return encode


def _palette_png() -> bytes:
    """Palette PNG, 256 random colours each with its own alpha (tRNS), index noise."""
    rng = np.random.default_rng(1)
    plte = _png_chunk(b"PLTE", rng.integers(0, 256, 768, np.uint8).tobytes())
    trns = _png_chunk(b"tRNS", rng.integers(0, 256, 256, np.uint8).tobytes())
    # 15 symbols (and the rare end-of-block code): 4 bits a byte, 40 MB of indices in 19 MiB.
    return _png_noise(1, 3, 15, 0.0, plte, trns)


def _gif() -> bytes:
    """GIF, 8-colour index noise, one transparent colour (LZW does ~3.5 bits a pixel)."""
    rng = np.random.default_rng(2)
    im = Image.fromarray(rng.integers(0, 8, (HEIGHT, WIDTH), np.uint8), "L").convert("P")
    im.putpalette(rng.integers(0, 256, 24, np.uint8).tobytes())
    buf = io.BytesIO()
    im.save(buf, "GIF", transparency=3)
    return buf.getvalue()


def _pil_flat(mode: str, colour: tuple[int, ...], fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (WIDTH, HEIGHT), colour).save(buf, fmt, **options)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Worst:
    """One image kind: how to build it and what it is."""

    name: str
    what: str
    build: Callable[[], bytes]


WORST = [
    Worst("png_rgba_flat", "8-bit RGBA, one colour at alpha 128 (the adversary's)",
          lambda: _png_flat(bytes([200, 30, 40, 128]), 8, 6)),
    Worst("png_rgba_noise", "8-bit RGBA, Huffman-coded noise near the byte limit",
          lambda: _png_noise(4, 6, 2, _p_zero_to_fit(HEIGHT * (1 + 4 * WIDTH)))),
    Worst("png_rgba16_flat", "16-bit RGBA, one colour",
          lambda: _png_flat(bytes([200, 1, 30, 2, 40, 3, 128, 4]), 16, 6)),
    Worst("png_rgb16_flat", "16-bit RGB, one colour (OpenCV strips to 8 bits while decoding)",
          lambda: _png_flat(bytes([200, 1, 30, 2, 40, 3]), 16, 2)),
    Worst("png_palette_trns", "palette + tRNS (256 alphas), index noise", _palette_png),
    Worst("png_rgb_noise", "8-bit RGB, Huffman-coded noise near the byte limit",
          lambda: _png_noise(3, 2, 2, _p_zero_to_fit(HEIGHT * (1 + 3 * WIDTH)))),
    Worst("jpeg_baseline", "baseline 4:4:4, noise at the highest quality that fits",
          lambda: _highest_quality_that_fits(_cv_jpeg(False), _noise_rgb())),
    Worst("jpeg_progressive", "progressive 4:4:4, noise at the highest quality that fits",
          lambda: _highest_quality_that_fits(_cv_jpeg(True), _noise_rgb())),
    Worst("jpeg_cmyk", "CMYK (Pillow path), noise at the highest quality that fits",
          lambda: _highest_quality_that_fits(_pil("CMYK", "JPEG"), _noise_rgb())),
    Worst("webp_lossy", "lossy RGB, noise at the highest quality that fits",
          lambda: _highest_quality_that_fits(_pil("RGB", "WEBP", method=0), _noise_rgb())),
    Worst("webp_rgba", "lossless RGBA (Pillow path), one colour at alpha 128",
          lambda: _pil_flat("RGBA", (200, 30, 40, 128), "WEBP", lossless=True, exact=True,
                            method=0, quality=0)),
    Worst("gif_transparent", "8-colour index noise, one transparent colour", _gif),
    Worst("tiff_rgba_deflate", "RGBA, deflate, one colour at alpha 128",
          lambda: _pil_flat("RGBA", (200, 30, 40, 128), "TIFF", compression="tiff_adobe_deflate")),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Measuring, one subprocess per image and decoder.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _warm_up(decoder: Callable[[bytes], np.ndarray], spec: PreprocessSpec) -> None:
    """Load every codec and plugin once on tiny images, so that the measurement is the image's."""
    tiny = np.random.default_rng(0).integers(0, 256, (16, 16, 4), np.uint8)
    samples = [cv2.imencode(ext, tiny[..., :3])[1].tobytes() for ext in (".jpg", ".png", ".webp")]
    samples.append(cv2.imencode(".png", tiny)[1].tobytes())
    for fmt in ("GIF", "TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(tiny).save(buf, fmt)
        samples.append(buf.getvalue())
    for data in samples:
        resize_image(decoder(data), spec)


def _child(decoder_name: str, path: str) -> None:
    """Decode one image once; print CPU seconds and the peak RSS increase as JSON."""
    cv2.setNumThreads(1)  # as the worker does
    decoder = DECODERS[decoder_name]
    spec = PreprocessSpec(height=224, width=224)
    data = Path(path).read_bytes()
    _warm_up(decoder, spec)
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    rss_before = _status_kib("VmRSS")
    start = time.process_time()
    rgb = decoder(data)
    decoded = time.process_time()
    resize_image(rgb, spec)
    resized = time.process_time()
    peak = _status_kib("VmHWM")
    result = {
        "decode_s": decoded - start,
        "decode_resize_s": resized - start,
        "peak_mib": (peak - rss_before) / 1024,
        "peak_exact": exact,
        "shape": list(rgb.shape),
    }
    print(json.dumps(result))


def _measure(decoder_name: str, path: Path, repeat: int) -> dict[str, float]:
    """Median CPU and worst peak of ``repeat`` fresh subprocesses (the CPU of a decode that
    faults in a GB of fresh pages varies by 2x from run to run, with the kernel's state)."""
    runs = []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, __file__, "--child", decoder_name, str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "decode_s": statistics.median(r["decode_s"] for r in runs),
        "decode_resize_s": statistics.median(r["decode_resize_s"] for r in runs),
        "peak_mib": max(r["peak_mib"] for r in runs),
        "peak_exact": all(r["peak_exact"] for r in runs),
    }


def _size(n_bytes: int) -> str:
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.2f} MiB"
    return f"{n_bytes / 1024:.0f} KiB" if n_bytes >= 10 * 1024 else f"{n_bytes} bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="subprocesses per image and column")
    parser.add_argument("--only", nargs="*", default=[], help="image names to run")
    parser.add_argument("--child", nargs=2, metavar=("DECODER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    worst = [w for w in WORST if not args.only or w.name in args.only]
    print(
        f"{WIDTH}x{HEIGHT} = {WIDTH * HEIGHT / 1e6:.0f} MP images at DEFAULT_LIMITS; OpenCV on one "
        f"thread; CPU s: median of {args.repeat} fresh processes; peak: the RSS increase, worst of "
        f"{args.repeat}\n"
    )
    header = (
        "| image | encoded | decoder | decode s before | after | decode+resize s before | after "
        "| CPU ratio | peak MiB before | after | peak ratio |"
    )
    rows = [header, "|" + "---|" * header.count(" | ") + "---|"]
    notes = []
    with tempfile.TemporaryDirectory(prefix="imgq-worst-") as tmp:
        for w in worst:
            started = time.perf_counter()
            data = w.build()
            info = probe_image(data)  # accepted at the default limits, or this raises
            path = Path(tmp) / w.name
            path.write_bytes(data)
            kind = f"{info.format} {info.mode}, {_size(len(data))}"
            on_opencv = (
                info.format in decode._OPENCV_FORMATS
                and info.mode in decode._OPENCV_MODES
                and not decode._has_alpha(data, info)
            )
            del data
            before = _measure("before", path, args.repeat)
            after = _measure("after", path, args.repeat)
            path.unlink()
            rows.append(
                f"| {w.name} | {kind} | {'OpenCV' if on_opencv else 'Pillow'} "
                f"| {before['decode_s']:.2f} | {after['decode_s']:.2f} "
                f"| {before['decode_resize_s']:.2f} | {after['decode_resize_s']:.2f} "
                f"| {before['decode_resize_s'] / after['decode_resize_s']:.1f}x "
                f"| {before['peak_mib']:.0f} | {after['peak_mib']:.0f} "
                f"| {before['peak_mib'] / max(after['peak_mib'], 1):.1f}x |"
            )
            notes.append(f"- {w.name}: {w.what}")
            if not (before["peak_exact"] and after["peak_exact"]):
                notes.append("  (peak not exact: /proc/self/clear_refs was not writable)")
            print(f"{w.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("\n".join(rows))
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
