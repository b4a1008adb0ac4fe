"""`imgq classify FILE_OR_DIR...`: enqueue images, print one JSON result per line.

The command-line face of :class:`imgq.worker.client.ImgqClient`; like the client it needs only
celery and redis.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError

from imgq.worker.client import ImgqClient
from imgq.worker.wire import DEFAULT_QUEUE

__all__ = ["IMAGE_SUFFIXES", "ProgressBar", "classify_main"]

#: File name suffixes `imgq classify` picks up when walking a directory.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def _image_files(paths: Sequence[str]) -> list[Path]:
    """Files named on the command line, and the image files under named directories (sorted)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend(p for p in found if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{name}: no such file or directory")
    return files


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width = total, width
        self.stream = sys.stderr
        self.started = time.monotonic()
        self._drawn_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        filled = self.width * done // max(total, 1)
        rate = done / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {rate:.0f}/s"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _error_json(exc: BaseException) -> dict[str, Any]:
    """An outcome's error as JSON: type, reason code (InvalidImage/InvalidTask), message."""
    message = str(exc)
    reason = getattr(exc, "reason", None) or (message.split(":", 1)[0] if ":" in message else None)
    return {"type": type(exc).__name__, "reason": reason, "message": message}


def _read_all(files: Sequence[Path]) -> Iterator[bytes]:
    for path in files:
        yield path.read_bytes()


def classify_main(args: argparse.Namespace) -> int:
    """`imgq classify FILE_OR_DIR... [--top-k K] [--timeout S] [--queue Q]`.

    Enqueues each file (bulk for many), waits up to ``--timeout`` seconds for all results, and
    prints one JSON object per file, in order: ``{"file": ..., "result": {...}}`` or
    ``{"file": ..., "error": {"type", "reason", "message"}}``. A progress bar goes to stderr
    when there is more than one file. Exit status 1 when any task failed or timed out, 2 when a
    path does not exist or Redis cannot be reached.
    """
    try:
        files = _image_files(args.paths)
    except FileNotFoundError as exc:
        print(f"imgq classify: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"imgq classify: no image files in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    with ImgqClient(queue=args.queue or DEFAULT_QUEUE) as client:
        try:
            if len(files) == 1:
                pending = [client.classify(files[0].read_bytes(), top_k=args.top_k)]
            else:
                pending = client.classify_many(_read_all(files), top_k=args.top_k)
            bar = ProgressBar(len(files)) if len(files) > 1 else None
            outcomes = client.results(pending, args.timeout, progress=bar)
        except (OSError, OperationalError) as exc:
            print(f"imgq classify: {exc}", file=sys.stderr)
            return 2
    failed = 0
    for path, outcome in zip(files, outcomes, strict=True):
        line: dict[str, Any] = {"file": str(path)}
        if isinstance(outcome, BaseException):
            failed += 1
            line["error"] = _error_json(outcome)
        else:
            line["result"] = outcome
        print(json.dumps(line), flush=False)
    sys.stdout.flush()
    return 1 if failed else 0
