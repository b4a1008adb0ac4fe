"""The `imgq` command. Each subcommand imports its heavy modules only when it runs, so
`imgq worker` never loads TensorFlow and `imgq classify` needs only celery and redis."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

#: onnxruntime's switches that turn its telemetry off, for every command (onnxruntime 1.32 reads
#: the first, its newer sources the second). Left on, it keeps a device id and an upload cache
#: under $HOME, which a read-only container cannot hold, so every command that loads onnxruntime
#: printed "Failed to persist telemetry device ID". It reads them when it is imported, before
#: any session; a value the operator set is kept.
ORT_TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}


def _handler(target: str) -> Callable[[argparse.Namespace], int]:
    """Resolve "module:function" lazily, when the subcommand runs."""

    def run(args: argparse.Namespace) -> int:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)

    return run


def _infer_batch(raw: str) -> int:
    from imgq.worker.settings import parse_infer_batch  # light: no numpy, no OpenCV

    try:
        return parse_infer_batch(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{raw!r} {exc}; give a number of images or auto"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; no imports beyond the standard library."""
    p = argparse.ArgumentParser(
        prog="imgq",
        description="Batched image classification on a Celery/Redis queue, with train/serve "
        "parity checks and drift alerts.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("sample-data", help="generate a labelled image data set offline")
    s.add_argument("out_dir")
    s.add_argument("--classes", type=int, default=4)
    s.add_argument("--per-class", type=int, default=300)
    s.add_argument("--size", type=int, default=128, help="typical image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_handler("imgq.trainer.sample_data:main"))

    s = sub.add_parser("train", help="train on DATA_DIR (one sub-folder per class) and export")
    s.add_argument(
        "data_dir",
        nargs="+",
        metavar="DATA_DIR",
        help="folder of one sub-folder per class; more folders add images to its classes "
        "(e.g. labelled `imgq drift samples`)",
    )
    s.add_argument("--out", required=True, help="bundle folder to write")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--arch", choices=["small", "mobilenetv2"], default="small")
    s.add_argument("--epochs", type=int, default=40)
    s.add_argument("--patience", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--val-split", type=float, default=0.15)
    s.add_argument("--test-split", type=float, default=0.15)
    s.add_argument("--no-augment", dest="augment", action="store_false")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default=None, help="model name (default: the data folder's name)")
    s.add_argument(
        "--publish", action="store_true",
        help="then publish the bundle to IMGQ_BROKER_URL (`imgq models publish`)",
    )  # fmt: skip
    s.add_argument("--queue", help="with --publish: the queue (IMGQ_QUEUE, default imgq)")
    s.set_defaults(func=_handler("imgq.trainer.train:main"))

    s = sub.add_parser("verify", help="re-check a bundle's served path without TensorFlow")
    s.add_argument("model_dir")
    s.add_argument("data_dir", nargs="?", help="also check accuracy on these labelled files")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.set_defaults(func=_handler("imgq.worker.commands.verify:verify_main"))

    s = sub.add_parser("worker", help="run a Celery worker that serves a bundle")
    s.add_argument("--model", help="bundle folder (IMGQ_MODEL)")
    s.add_argument(
        "--model-version",
        help="published version to serve without --model (IMGQ_MODEL_VERSION; default: the "
        "queue's stable version)",
    )
    s.add_argument("--queue", help="queue name (IMGQ_QUEUE, default imgq)")
    s.add_argument(
        "--handlers",
        help="comma-separated handlers: classify, null (IMGQ_HANDLERS, default classify)",
    )
    s.add_argument("--concurrency", type=int, help="batch runner threads (IMGQ_CONCURRENCY)")
    s.add_argument("--max-batch", type=int, help="largest batch (IMGQ_MAX_BATCH)")
    s.add_argument(
        "--infer-batch",
        type=_infer_batch,
        help="images per onnxruntime call, or auto (IMGQ_INFER_BATCH, default auto)",
    )
    s.add_argument("--max-wait-ms", type=float, help="wait for a fuller batch (IMGQ_MAX_WAIT_MS)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(IMGQ_DEVICE)")
    s.add_argument("--threads", type=int, help="onnxruntime intra-op threads (IMGQ_THREADS)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (IMGQ_METRICS_PORT)")
    s.add_argument("--hostname", help="Celery node name, e.g. imgq1@%%h")
    s.add_argument("--loglevel", default="INFO")
    s.set_defaults(func=_handler("imgq.worker.commands.worker:main"))

    s = sub.add_parser("classify", help="enqueue images and print one JSON result per line")
    s.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    s.add_argument("--top-k", type=int, default=1)
    s.add_argument("--timeout", type=float, default=60.0)
    s.add_argument("--queue", default=None)
    s.set_defaults(func=_handler("imgq.worker.commands.classify:classify_main"))

    s = sub.add_parser("drift", help="review input drift: status, alerts, windows, report, serve")
    dsub = s.add_subparsers(dest="drift_command", required=True, metavar="ACTION")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="bundle folder (IMGQ_MODEL; default: a published version)")
    model.add_argument(
        "--model-version",
        help="published version (IMGQ_MODEL_VERSION; default: the queue's stable version)",
    )
    d = dsub.add_parser(
        "status", parents=[model], help="per feature: reference vs current, statistic, state"
    )
    d.set_defaults(func=_handler("imgq.worker.drift.review:status_main"))
    d = dsub.add_parser("alerts", parents=[model], help="list drift alerts")
    d.add_argument("--all", action="store_true", help="include cleared and acknowledged")
    d.add_argument("--ack", metavar="ID", help="acknowledge an alert")
    d.set_defaults(func=_handler("imgq.worker.drift.review:alerts_main"))
    d = dsub.add_parser(
        "windows", parents=[model], help="recent windows: tier, estimated accuracy, evidence"
    )
    d.add_argument("--count", type=int, default=20, help="most recent N (default 20)")
    d.add_argument("--json", action="store_true", help="one JSON verdict per line")
    d.set_defaults(func=_handler("imgq.worker.drift.review:windows_main"))
    d = dsub.add_parser("report", parents=[model], help="write PNG figures of what drifted")
    d.add_argument("--out", required=True)
    d.set_defaults(func=_handler("imgq.worker.drift.review:report_main"))
    d = dsub.add_parser(
        "samples", parents=[model], help="write a window's sampled inputs as folders to label"
    )
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--alert", metavar="ID", help="the window of this alert")
    which.add_argument("--window", metavar="ID", help="this judged window")
    d.add_argument("--out", required=True, metavar="DIR", help="new folder to write")
    d.set_defaults(func=_handler("imgq.worker.drift.samples_cli:samples_main"))
    d = dsub.add_parser(
        "serve", parents=[model], help="the review page in the browser (127.0.0.1 by default)"
    )
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free)")
    d.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name (repeatable; e.g. behind a proxy)",
    )
    d.set_defaults(func=_handler("imgq.worker.drift.page:serve_main"))
    d = dsub.add_parser(
        "notify",
        help="send every model's drift pages to IMGQ_ALERT_WEBHOOK_URL (signed, retried) "
        "until stopped",
    )
    d.set_defaults(func=_handler("imgq.worker.drift.notify_cli:notify_main"))

    s = sub.add_parser("dlq", help="dead letters (messages no worker could serve): review, requeue")
    dsub = s.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument("--queue", default=None, help="queue name (IMGQ_QUEUE, default imgq)")
    d = dsub.add_parser("list", parents=[queue], help="newest dead letters first, and a summary")
    d.add_argument("--count", type=int, default=20)
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=_handler("imgq.worker.commands.dlq:list_main"))
    d = dsub.add_parser("show", parents=[queue], help="one dead letter in full")
    d.add_argument("id", metavar="ID")
    d.add_argument("--body", metavar="FILE", help="write the raw message to FILE (when kept)")
    d.set_defaults(func=_handler("imgq.worker.commands.dlq:show_main"))
    d = dsub.add_parser("requeue", parents=[queue], help="put a kept message back on the queue")
    d.add_argument("id", metavar="ID")
    d.set_defaults(func=_handler("imgq.worker.commands.dlq:requeue_main"))
    d = dsub.add_parser("purge", parents=[queue], help="delete every dead letter of the queue")
    d.add_argument("--yes", action="store_true", help="really delete them")
    d.set_defaults(func=_handler("imgq.worker.commands.dlq:purge_main"))

    s = sub.add_parser("models", help="model versions published to the fleet through Redis")
    msub = s.add_subparsers(dest="models_command", required=True)
    d = msub.add_parser("publish", help="store a bundle in Redis; print its version")
    d.add_argument("bundle", help="bundle folder written by `imgq train`")
    d.add_argument("--queue", help="queue whose stable version it becomes if it has none")
    d.add_argument("--stable", action="store_true", help="make it the queue's stable version")
    d.set_defaults(func=_handler("imgq.worker.commands.models:publish_main"))
    d = msub.add_parser("list", help="published versions, sizes, and the workers serving them")
    d.add_argument("--queue", help="queue whose stable version is marked (default imgq)")
    d.add_argument("--json", action="store_true", help="one JSON object per version")
    d.set_defaults(func=_handler("imgq.worker.commands.models:list_main"))
    d = msub.add_parser("delete", help="remove a version no queue has as stable, none serves")
    d.add_argument("version", help="the version (6 to 64 hex digits of its sha256)")
    d.set_defaults(func=_handler("imgq.worker.commands.models:delete_main"))

    s = sub.add_parser("rollout", help="a new model version on running workers: canary, shadow")
    rsub = s.add_subparsers(dest="rollout_command", required=True)
    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument("--queue", default=None, help="queue name (IMGQ_QUEUE, default imgq)")
    d = rsub.add_parser("start", parents=[queue], help="start rolling a published version out")
    d.add_argument("version", help="the candidate (6 to 64 hex digits of its sha256)")
    d.add_argument("--canary", type=float, default=10.0, help="%% of tasks it answers (10)")
    d.add_argument("--shadow", type=float, default=0.0, help="%% of the others it also runs")
    d.add_argument("--max-failure-rate", type=float, default=0.05,
                   help="share of the candidate's model failures that aborts (0.05)")  # fmt: skip
    d.add_argument("--min-tasks", type=int, default=50, help="tasks before that is judged (50)")
    d.set_defaults(func=_handler("imgq.worker.rollout.cli:start_main"))
    d = rsub.add_parser("status", parents=[queue], help="the rollout, versions side by side")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=_handler("imgq.worker.rollout.cli:status_main"))
    d = rsub.add_parser("promote", parents=[queue], help="make the candidate stable everywhere")
    d.set_defaults(func=_handler("imgq.worker.rollout.cli:promote_main"))
    d = rsub.add_parser("abort", parents=[queue], help="return to the stable version")
    d.add_argument("--reason", default="aborted by an operator")
    d.set_defaults(func=_handler("imgq.worker.rollout.cli:abort_main"))

    s = sub.add_parser("health", help="exit 0 when Redis answers and a worker has its model")
    s.add_argument("--timeout", type=float, default=5.0)
    s.add_argument("--local", action="store_true", help="ping only this host's workers")
    s.set_defaults(func=_handler("imgq.worker.commands.health:main"))

    s = sub.add_parser(
        "backlog", help="a queue's backlog: ready, in flight, due, scheduled; the oldest wait"
    )
    s.add_argument("--queue", action="append", metavar="Q",
                   help="queue (repeatable; default IMGQ_QUEUE, else imgq)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="one JSON object per queue")
    s.set_defaults(func=_handler("imgq.worker.commands.backlog:main"))

    s = sub.add_parser(
        "exporter", help="serve the backlog and the fleet to Prometheus (no model: scale from 0)"
    )
    s.add_argument("--port", type=int, help="port (IMGQ_EXPORTER_PORT, default 9809)")
    s.add_argument("--queue", action="append", metavar="Q",
                   help="queue (repeatable; default IMGQ_QUEUE, else imgq)")  # fmt: skip
    s.set_defaults(func=_handler("imgq.worker.commands.exporter:main"))

    s = sub.add_parser("demo", help="the whole product end to end on sample data")
    s.add_argument("--out", default="demo-output")
    s.add_argument("--per-class", type=int, default=300)
    s.add_argument("--tasks", type=int, default=1000)
    s.add_argument("--drift-tasks", type=int, default=400)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--epochs", type=int, default=40)
    s.set_defaults(func=_handler("imgq.demo:main"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imgq` console script."""
    args = build_parser().parse_args(argv)
    for name, value in ORT_TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        mistake = _configuration_mistake(exc)
        if mistake is None:
            raise  # a bug: its traceback is wanted
        print(f"imgq {args.command}: {mistake}", file=sys.stderr)
        return 2


def _configuration_mistake(exc: Exception) -> str | None:
    """The one line for a mistake in the configuration that no command caught (settings
    refused, a Redis imgq refuses: a Cluster node, a master name no sentinel knows), or None."""
    from imgq.worker.broker.connection import RedisRefused  # light: redis only
    from imgq.worker.settings import SettingsError

    if isinstance(exc, SettingsError | RedisRefused):
        return " ".join(str(exc).split())
    return None


if __name__ == "__main__":
    sys.exit(main())
