"""The throughput benchmark's baseline: imgq's task written the plain Celery way.

One Celery task ``imgq_naive.classify`` per image, run by a prefork pool with one process per
core: each task decodes its image, preprocesses it and makes one ``session.run`` at batch 1, and
Celery stores its result with one round trip. It takes the same keyword arguments as
``imgq.classify`` (``image`` base64, ``top_k``, ``request_id``) and uses the same ``shared/`` code
and model bundle, so the difference to ``imgq worker`` in ``bench/throughput.py`` is the
framework: Celery's per-message work against imgq's batched intake and bulk result writes.

    .venv/bin/python bench/naive_worker.py --model MODEL_DIR --broker redis://127.0.0.1:6379/0 \\
        --queue naive --concurrency 2
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from celery import Celery, signals

from imgq.shared.bundle import ModelBundle
from imgq.shared.decode import decode_base64, decode_image
from imgq.shared.preprocess import preprocess_batch

#: Name of the baseline task (a plain Celery task, not served by `imgq worker`).
TASK_NAME = "imgq_naive.classify"

app = Celery("imgq_naive")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    worker_hijack_root_logger=False,
)

_model_dir: str | None = None
_bundle: ModelBundle | None = None


@signals.worker_process_init.connect
def _load_model(**kwargs: Any) -> None:
    """One onnxruntime session per pool process, one intra-op thread (a process per core)."""
    global _bundle
    assert _model_dir is not None, "start the worker with main(), which sets the model folder"
    _bundle = ModelBundle.load(_model_dir, device="cpu", threads=1, check_golden=False)


@app.task(name=TASK_NAME)
def classify(image: str, top_k: int = 1, request_id: str | None = None) -> dict[str, Any]:
    """Decode, preprocess and classify one image at batch 1."""
    assert _bundle is not None
    manifest = _bundle.manifest
    data = decode_base64(image)
    probs = _bundle.predict(preprocess_batch([decode_image(data)], manifest.preprocess))[0]
    order = probs.argsort()[::-1][:top_k]
    top = [{"label": manifest.labels[j], "score": float(probs[j])} for j in order]
    result: dict[str, Any] = {
        "label": top[0]["label"],
        "score": top[0]["score"],
        "top_k": top,
        "model": {"name": manifest.name, "sha256": manifest.model_sha256},
        "batch_size": 1,
    }
    if request_id is not None:
        result["request_id"] = request_id
    return result


def main(argv: list[str] | None = None) -> None:
    """Run the baseline worker (prefork) until SIGTERM."""
    global _model_dir
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="bundle folder written by `imgq train`")
    p.add_argument("--broker", required=True, help="Redis URL (also the result backend)")
    p.add_argument("--queue", default="naive")
    p.add_argument("--concurrency", type=int, default=2, help="prefork processes")
    p.add_argument("--hostname", default="naive@%h")
    args = p.parse_args(argv)
    _model_dir = args.model
    app.conf.update(broker_url=args.broker, result_backend=args.broker)
    app.worker_main(
        ["worker", "--pool", "prefork", "--concurrency", str(args.concurrency),
         "--queues", args.queue, "--hostname", args.hostname, "--loglevel", "WARNING",
         "--without-mingle", "--without-gossip"]
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
