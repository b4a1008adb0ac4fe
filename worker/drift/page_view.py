"""What the review page shows, shaped from hostile stored entries (``worker/drift/page.py``).

Verdicts, alerts and thumbnails come from Redis and may be anything: too large, NaN, a number
where a list belongs. Each function here returns plain, bounded values the HTML renders as is,
and skips what it cannot read rather than fail the page.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from imgq.shared.labelled import IMAGE_SUFFIXES
from imgq.shared.manifest import Manifest
from imgq.worker.drift.records import MAX_RECORD_BYTES, accuracy, finite
from imgq.worker.drift.review import _bin_labels

__all__ = [
    "gallery_images",
    "histograms",
    "json_entry",
    "novel_thumbnails",
    "thumbnails",
    "training_samples",
    "verdict",
]

#: Training images per class and their largest file; a thumbnail's largest base64.
_SAMPLES_PER_CLASS, _SAMPLE_MAX_BYTES, _THUMB_MAX_B64 = 4, 256 << 10, 64 << 10
_JPEG_MAGIC = b"\xff\xd8\xff"
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def json_entry(raw: Any) -> Any:
    """Parsed JSON, or None when empty, not JSON, or too large to parse for a page."""
    if not raw or len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _number(value: Any) -> float:
    """A finite number as float; anything else (NaN, inf, text, bool) as 0.0."""
    number = finite(value)
    return 0.0 if number is None else number


def _features(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """An entry's feature objects; a ``features`` that is not a list counts as none."""
    features = entry.get("features")
    return [f for f in features if isinstance(f, dict)] if isinstance(features, list) else []


def _drifting(f: dict[str, Any]) -> bool:
    """Whether a verdict's feature drifts: its ``drifting``; older data without a ``tier``:
    significant with PSI at least 0.1. (``tier`` is the test's group, not its state.)"""
    if "tier" not in f and "drifting" not in f:
        return f.get("significant") is True and _number(f.get("psi")) >= 0.1
    return f.get("drifting") is True


def _feature_tier(f: dict[str, Any]) -> str:
    return str(f["tier"]) if f.get("tier") in ("page", "notice") else "page"


def verdict(v: dict[str, Any]) -> dict[str, Any]:
    """A stored verdict as the page shows it: a missing tier is ``page`` (older data), a
    missing or impossible estimated accuracy is null, and the drifting features, by PSI."""
    tier = v.get("tier")
    flagged = [
        {"name": str(f.get("name")), "tier": _feature_tier(f), "psi": _number(f.get("psi"))}
        for f in _features(v)
        if _drifting(f)
    ]
    return {
        "window": v["window"],
        "tier": tier if tier in ("page", "notice", "ok") else "page",
        "tier_assumed": tier is None or v.get("tier_assumed") is True,
        "estimated_accuracy": accuracy(v.get("estimated_accuracy")),
        "flagged": sorted(flagged, key=lambda f: -f["psi"]),
    }


def histograms(manifest: Manifest, latest: dict[str, Any]) -> list[dict[str, Any]]:
    """Reference vs window shares per bin for each feature of the latest verdict; ``tier``:
    the drifting feature's tier, None while it does not drift."""
    out = []
    for f in _features(latest):
        if not isinstance(f.get("name"), str) or f["name"] not in manifest.reference.features:
            continue
        ref = manifest.reference.features[f["name"]]
        counts = f.get("counts")
        if not isinstance(counts, list) or len(counts) != len(ref.counts):
            continue
        window = [_number(c) for c in counts]
        out.append({
            "name": f["name"],
            "psi": _number(f.get("psi")),
            "tier": _feature_tier(f) if _drifting(f) else None,
            "summary": str(f.get("summary", "")),
            "bins": _bin_labels(ref, manifest.labels),
            "reference": [c / max(1, sum(ref.counts)) for c in ref.counts],
            "window": [c / max(1.0, sum(window)) for c in window],
        })  # fmt: skip
    return out


def _jpeg_b64(item: Any) -> str | None:
    """A stored thumbnail's base64, re-encoded, when it is small, valid and of a JPEG."""
    if not isinstance(item, dict) or not isinstance(item.get("jpeg_b64"), str):
        return None
    if len(item["jpeg_b64"]) > _THUMB_MAX_B64:
        return None
    try:
        jpeg = base64.b64decode(item["jpeg_b64"], validate=True)
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(jpeg).decode("ascii") if jpeg.startswith(_JPEG_MAGIC) else None


def thumbnails(raw: list[Any]) -> list[dict[str, Any]]:
    """Recent out-of-range thumbnails: small, valid base64 of bytes that start as a JPEG
    (others are skipped)."""
    out = []
    for item in map(json_entry, raw):
        jpeg_b64 = _jpeg_b64(item)
        if jpeg_b64 is None:
            continue
        features = item.get("features")
        label = item.get("label")
        out.append({
            "time": str(item.get("time", "")),
            "features": [str(x) for x in features] if isinstance(features, list) else [],
            "label": label if isinstance(label, str) else None,
            "jpeg_b64": jpeg_b64,
        })  # fmt: skip
    return out


def novel_thumbnails(raw: list[Any], gallery_size: int) -> list[dict[str, Any]]:
    """Recent novel inputs: their thumbnail (as :func:`thumbnails` checks it), novelty (n/a
    unless a finite number), predicted label, and the positions of their nearest training
    images in the gallery (at most four; any that is not a position in it is dropped)."""
    out = []
    for item in map(json_entry, raw):
        jpeg_b64 = _jpeg_b64(item)
        if jpeg_b64 is None:
            continue
        label = item.get("label")
        neighbours = item.get("neighbours")
        near = [
            i for i in (neighbours if isinstance(neighbours, list) else [])[:4]
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < gallery_size
        ]  # fmt: skip
        out.append({
            "time": str(item.get("time", "")),
            "novelty": finite(item.get("novelty")),
            "label": label if isinstance(label, str) else None,
            "neighbours": near,
            "jpeg_b64": jpeg_b64,
        })  # fmt: skip
    return out


def _data_uri(path: Path, root: Path) -> str | None:
    """A bundle image as a data URI: a known image type, inside the bundle, small."""
    mime = _MIME.get(path.suffix.lower())
    if mime is None or not path.resolve().is_relative_to(root) or not path.is_file():
        return None
    if path.stat().st_size > _SAMPLE_MAX_BYTES:
        return None
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def gallery_images(folder: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """The novelty gallery's training images, in gallery order (the positions novel inputs
    name), each ``{"label", "uri"}`` (``uri`` None where the file is missing or refused)."""
    if manifest.novelty is None:
        return []
    root = folder.resolve()
    return [
        {"label": g.label, "uri": _data_uri(folder / g.file, root)}
        for g in manifest.novelty.gallery
    ]


def training_samples(folder: Path, manifest: Manifest) -> dict[str, list[str]]:
    """Up to four training images per class as data URIs: the bundle's ``samples/<class>/``,
    else its golden images of that class."""
    golden: dict[str, list[Path]] = {}
    for g in manifest.golden:
        if g.label is not None:
            golden.setdefault(g.label, []).append(folder / g.file)
    found: dict[str, list[Path]] = {}
    for label in manifest.labels:
        class_dir = folder / "samples" / label
        own = (
            sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if class_dir.is_dir()
            else []
        )
        found[label] = (own or golden.get(label, []))[:_SAMPLES_PER_CLASS]
    uris: dict[str, list[str]] = {}
    root = folder.resolve()
    for label, paths in found.items():
        for path in paths:
            uri = _data_uri(path, root)
            if uri is not None:
                uris.setdefault(label, []).append(uri)
    return uris
