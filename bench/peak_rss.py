"""Peak memory of one worker serving batches of the largest inputs it accepts (issue 14).

Each scenario starts a fresh `imgq worker` (one batch thread, the default limits, drift on) on a
private redis-server, queues 32 messages of one kind *before* the worker starts (so its first
takes see them all), waits until every task has its outcome, and reads the worker's peak resident
set (``VmHWM``). The baseline is the same worker serving 32 small sample images, measured in the
same run; the table shows both and the difference.

    .venv/bin/python bench/peak_rss.py --work-dir /tmp/tp        # ~3 minutes

Scenarios (all at the default limits: 20 MiB images, 40 MP, 36 MiB messages):

- ``small``: 32 sample images of ~13 kB (the baseline);
- ``photos_19MiB``: 32 noisy 6000x6000 JPEGs of ~19 MiB (messages of ~34 MiB each, just under
  the message limit: one take reads one);
- ``rgba_40MP``: 32 flat 8000x5000 RGBA PNGs of ~160 kB (the adversary's kind: cheap to send,
  40 MP to decode; the pixel budget serves them two per batch);
- ``oversized_64MiB``: 32 messages of 64 MiB each (over the limit: the worker must never read
  them; Redis dead-letters them);
- ``mixed``: 8 of each of the three above.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import redis
from harness import ROOT, sample_images, small_bundle
from kombu.exceptions import OperationalError

from imgq.launcher import WorkerProcess, worker_env
from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient

_SCENARIOS = ("small", "photos_19MiB", "rgba_40MP", "oversized_64MiB", "mixed")
#: How many messages of each kind each scenario queues.
_MIXES: dict[str, dict[str, int]] = {
    "small": {"small": 32},
    "photos_19MiB": {"photos_19MiB": 32},
    "rgba_40MP": {"rgba_40MP": 32},
    "oversized_64MiB": {"oversized_64MiB": 32},
    "mixed": {"small": 8, "photos_19MiB": 8, "rgba_40MP": 8, "oversized_64MiB": 8},
}


def _photo() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (6000, 6000, 3), np.uint8)
    return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 70])[1].tobytes()


def _rgba() -> bytes:
    rgba = np.zeros((5000, 8000, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 128
    return cv2.imencode(".png", rgba, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()


def _oversized(i: int) -> bytes:
    """A kombu-shaped message of 64 MiB with a readable task id at its end."""
    body = base64.b64encode(b"\0" * (48 << 20)).decode()
    headers = {"task": "imgq.classify", "id": f"oversized-{i}"}
    envelope = {"body": body, "content-type": "application/json", "headers": headers}
    return json.dumps(envelope).encode()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def run_scenario(name: str, bundle: Path, small: list[bytes], folder: Path) -> dict[str, float]:
    """Queue the scenario's 32 messages, serve them with a fresh worker; its figures."""
    shutil.rmtree(folder / f"redis-{name}", ignore_errors=True)  # no older run's 1 GB AOF to load
    server = LocalRedis(folder / f"redis-{name}").start()
    try:
        r = redis.Redis.from_url(server.url, socket_timeout=120)  # waits through Redis's stalls
        redis_stalls = 0
        with ImgqClient(server.url) as client:
            pending = []
            kinds = dict.fromkeys(("small", *_SCENARIOS[1:4]), 0)
            kinds.update(_MIXES[name])
            pending += client.classify_many([small[i % len(small)] for i in range(kinds["small"])])
            if kinds["photos_19MiB"]:
                pending += client.classify_many([_photo()] * kinds["photos_19MiB"])
            if kinds["rgba_40MP"]:
                pending += client.classify_many([_rgba()] * kinds["rgba_40MP"])
            for i in range(kinds["oversized_64MiB"]):
                r.lpush("imgq", _oversized(i))
            worker = WorkerProcess(
                f"rss-{name}@%h",
                folder / f"worker-{name}.log",
                options=["--model", str(bundle), "--device", "cpu"],
                env=worker_env(server.url, keep_imgq=True, IMGQ_METRICS_PORT="0"),
                cwd=ROOT,
            )
            try:
                started = time.monotonic()
                deadline = started + 600
                while True:
                    try:
                        outcomes = client.results(pending, timeout_s=600)
                        break
                    except OperationalError:
                        # Redis moving 34-64 MiB messages answers nobody for seconds (each
                        # move copies the message): past the client's 5 s socket timeout.
                        if time.monotonic() > deadline:
                            raise
                        redis_stalls += 1
                # Every oversized message dead-lettered, and nothing queued or held.
                while (
                    r.xlen("imgq:dlq:imgq") < kinds["oversized_64MiB"]
                    or r.llen("imgq")
                    or any(r.llen(k) for k in r.hkeys("imgq:lanes"))
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the queue did not drain")
                    time.sleep(0.1)
                seconds = time.monotonic() - started
                peak = _peak_rss_mib(worker.pid)
            finally:
                worker.stop(timeout_s=60)
        failed = sum(not isinstance(o, dict) for o in outcomes)
        dead = int(r.xlen("imgq:dlq:imgq")) if r.exists("imgq:dlq:imgq") else 0
        return {"peak_mib": peak, "seconds": seconds, "served": len(outcomes) - failed,
                "failed": failed, "dead_letters": dead, "redis_stalls": redis_stalls}  # fmt: skip
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", help="bench/throughput.py's work folder (data and the model)")
    p.add_argument("--model", help="a bundle to serve instead of the small sample model")
    p.add_argument("--only", choices=_SCENARIOS, action="append", help="run only these")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-rss-"))
    data_dir, small = sample_images(work, per_class=100)
    bundle = Path(args.model) if args.model else small_bundle(work, data_dir, epochs=5)
    rows = {}
    for name in args.only or _SCENARIOS:
        rows[name] = run_scenario(name, bundle, small, work)
        print(name, rows[name], flush=True)
    base = rows.get("small", {}).get("peak_mib")
    print("\n| 32 messages of | worker peak RSS MiB | vs small | served | failed | dead letters "
          "| seconds | client reads timed out |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        delta = f"+{m['peak_mib'] - base:.0f}" if base is not None else "-"
        print(f"| {name} | {m['peak_mib']:.0f} | {delta} | {m['served']} | {m['failed']} | "
              f"{m['dead_letters']} | {m['seconds']:.1f} | {m['redis_stalls']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
