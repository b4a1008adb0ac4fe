"""`imgq drift samples (--alert ID | --window ID) --out DIR`: a window's sampled inputs written
as class folders to label, the loop back to training (``worker/drift/samples.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import redis

from imgq.shared.manifest import Manifest
from imgq.worker.drift.layout import DriftKeys
from imgq.worker.drift.review import _run, _UsageError, find_window
from imgq.worker.drift.samples import _CSV, _README, samples_kept, window_samples, write_samples

__all__ = ["samples_main"]


def samples_main(args: argparse.Namespace) -> int:
    """`imgq drift samples (--alert ID | --window ID) --out DIR`."""
    return _run(args, _samples)


def _samples(args: argparse.Namespace, client: redis.Redis, manifest: Manifest, _: Path) -> None:
    keys = DriftKeys(manifest.drift_id)
    window = find_window(client, manifest, alert_id=args.alert, window_id=args.window)
    try:
        samples = window_samples(client, keys, window)
    except ValueError as exc:
        raise _UsageError(f"the window's start or end time is not readable: {exc}") from None
    try:
        written, skipped = write_samples(samples, manifest.labels, Path(args.out))
    except FileExistsError as exc:
        raise _UsageError(str(exc)) from None
    print(
        f"wrote {written} images of window {window.get('id')} ({window.get('start')} .. "
        f"{window.get('end')}) to {args.out}, one folder per predicted class, and "
        f"{Path(args.out) / _CSV}"
        + (f"; skipped {skipped} that were not a sample of this model" if skipped else "")
    )
    if not written:
        kept = samples_kept(manifest.preprocess.height, manifest.preprocess.width)
        print(
            "no samples in that window: the workers keep a few per second (older ones are "
            f"trimmed: {keys.samples} keeps about {kept})"
        )
    print(f"next: label them as {Path(args.out) / _README} says, then `imgq train`")
