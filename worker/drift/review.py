"""`imgq drift status | alerts | windows | report`: what the drift detector saw, for the people
who review it.

The workers keep everything in Redis (see :mod:`worker.drift`): the latest judged window's
statistics, the recent windows' verdicts, the alert stream and the open alerts, and recent
out-of-range thumbnails. These
commands read it for the model given by ``--model`` (else ``IMGQ_MODEL``), on the Redis of
``IMGQ_BROKER_URL``. How to read the numbers is in ``docs/drift.md``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import random
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import redis

from imgq.shared.errors import ImgqError
from imgq.shared.manifest import Manifest, load_manifest
from imgq.shared.reference import FeatureReference
from imgq.worker.drift.layout import DriftKeys, WindowLayout
from imgq.worker.drift.records import clean_alert, clean_verdict, json_line, parse, printable
from imgq.worker.logs import mask_url
from imgq.worker.settings import WorkerSettings

__all__ = [
    "status_main",
    "alerts_main",
    "windows_main",
    "report_main",
    "read_status",
    "read_windows",
    "list_alerts",
    "ack_alert",
    "feature_state",
    "find_window",
    "read_verdicts",
]

#: Images per row of the out-of-range strip.
STRIP_LEN = 8
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


class _UsageError(ImgqError):
    """A problem with what the user asked for; printed, exit status 2."""


class NamedModel(Protocol):
    """What the alert functions need of a model: a :class:`Manifest`, or the review page's
    record of a model known only by its drift state."""

    @property
    def name(self) -> str: ...

    @property
    def drift_id(self) -> str: ...


# ----------------------------------------------------------------------------- reading


def read_status(client: redis.Redis, manifest: Manifest) -> dict[str, Any]:
    """The latest judged window (``None`` before the first), the open window's image count and
    the open alerts (feature -> alert id)."""
    keys = DriftKeys(manifest.drift_id)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.latest)
    pipe.get(keys.open)
    pipe.hgetall(keys.open_alerts)
    latest, open_window, open_alerts = pipe.execute()
    return {
        "latest": json.loads(latest) if latest else None,
        "open_window_images": WindowLayout(manifest.reference).parse(0, open_window).n_images,
        "open_alerts": {k.decode(): v.decode() for k, v in open_alerts.items()},
    }


def feature_state(feature: dict[str, Any], open_alerts: dict[str, str]) -> str:
    """``alert`` (an alert is open for it), ``drifting`` (alerting in the latest window, its
    alert open under another feature's name or not yet), ``watch`` (significant, but under its
    effect floor: a change to keep an eye on), or ``ok``. A difference above the floor that
    the test does not reject is noise of a small window, not a state (issue 18).

    >>> feature_state({"name": "x", "significant": True, "drifting": False}, {})
    'watch'
    >>> feature_state({"name": "x", "significant": False, "psi": 0.3, "psi_floor": 0.1}, {})
    'ok'
    """
    if feature["name"] in open_alerts:
        return "alert"
    if feature.get("drifting"):
        return "drifting"
    if feature["significant"]:
        return "watch"
    return "ok"


def read_windows(client: redis.Redis, manifest: Manifest, count: int) -> list[dict[str, Any]]:
    """The ``count`` most recent judged windows' verdicts, newest first (:func:`read_verdicts`)."""
    if count < 1:
        raise _UsageError(f"--count must be >= 1, got {count}")
    return read_verdicts(client, manifest.drift_id, count)


def list_alerts(
    client: redis.Redis, manifest: NamedModel, *, include_all: bool
) -> list[dict[str, Any]]:
    """Alerts, oldest first, each with ``state`` (``open`` while any of its features is still
    drifting, else ``cleared``) and ``acked``. Without ``include_all``: open, unacknowledged.
    An entry that is not an alert's JSON object with a string id is skipped."""
    keys = DriftKeys(manifest.drift_id)
    pipe = client.pipeline(transaction=False)
    pipe.xrange(keys.alerts)
    pipe.hgetall(keys.open_alerts)
    pipe.hgetall(keys.acked)
    entries, open_alerts, acked = pipe.execute()
    open_ids = {v.decode() for v in open_alerts.values()}
    acked_ids = {k.decode() for k in acked}
    alerts = []
    for _, fields in entries:
        raw = parse(fields.get(b"json"))
        event = clean_alert(raw) if raw is not None else None
        if event is None:
            continue
        event["state"] = "open" if event["id"] in open_ids else "cleared"
        event["acked"] = event["id"] in acked_ids
        if include_all or (event["state"] == "open" and not event["acked"]):
            alerts.append(event)
    return alerts


def ack_alert(client: redis.Redis, manifest: NamedModel, alert_id: str) -> None:
    """Mark an alert acknowledged: it leaves the default listing; its features stay open (no
    new alert for them) until they clear.

    Raises:
        _UsageError: no alert has that id.
    """
    known = [a["id"] for a in list_alerts(client, manifest, include_all=True)]
    if alert_id not in known:
        shown = ", ".join(known[-10:]) or "none yet"
        raise _UsageError(f"no drift alert {alert_id!r} for model {manifest.name}; ids: {shown}")
    DriftKeys(manifest.drift_id).ack(client, alert_id, datetime.now(UTC).isoformat())


def read_verdicts(client: redis.Redis, drift_id: str, count: int = 500) -> list[dict[str, Any]]:
    """The judged windows' verdicts, newest first (the detector keeps the last 500), each
    checked field by field (:func:`~imgq.worker.drift.records.clean_verdict`); an entry that is
    not a verdict is skipped."""
    verdicts = []
    for raw in client.lrange(DriftKeys(drift_id).verdicts, 0, count - 1):
        verdict = parse(raw)
        checked = clean_verdict(verdict) if verdict is not None else None
        if checked is not None:
            verdicts.append(checked)
    return verdicts


def find_window(
    client: redis.Redis, manifest: NamedModel, *, alert_id: str | None, window_id: str | None
) -> dict[str, Any]:
    """The window (``id``, ``start``, ``end``, ...) of an alert, or of a judged window by id.

    Raises:
        _UsageError: neither or both given, or no such alert or window.
    """
    if (alert_id is None) == (window_id is None):
        raise _UsageError("give one of --alert ID or --window ID")
    if alert_id is not None:
        for alert in list_alerts(client, manifest, include_all=True):
            if alert["id"] == alert_id:
                return dict(alert["window"])
        raise _UsageError(f"no drift alert {alert_id!r} for model {manifest.name}")
    for verdict in read_verdicts(client, manifest.drift_id):
        if str(verdict["window"].get("id")) == window_id:
            return dict(verdict["window"])
    raise _UsageError(
        f"no judged window {window_id!r} of model {manifest.name} is kept; "
        "`imgq drift serve` or `imgq drift status` shows recent ones"
    )


# ----------------------------------------------------------------------------- commands


def status_main(args: argparse.Namespace) -> int:
    """`imgq drift status`: per feature, reference vs current, statistic, PSI and state."""
    return _run(args, _status)


def alerts_main(args: argparse.Namespace) -> int:
    """`imgq drift alerts [--all] [--ack ID]`."""
    return _run(args, _alerts)


def windows_main(args: argparse.Namespace) -> int:
    """`imgq drift windows [--json] [--count N]`: recent windows with their verdicts."""
    return _run(args, _windows)


def report_main(args: argparse.Namespace) -> int:
    """`imgq drift report --out DIR`: PNG figures of what drifted."""
    return _run(args, _report)


def _published(settings: WorkerSettings, client: redis.Redis) -> WorkerSettings:
    """``settings`` with the folder of the model version named (``--model-version``), or of
    the queue's stable one, fetched from Redis (``worker/bundles.py``)."""
    from imgq.worker.bundles import fetch, resolve

    version = resolve(client, settings.model_version, settings.queue_list)
    folder = fetch(client, version, settings.model_cache, settings.bundle_max_bytes)
    return dataclasses.replace(settings, model_dir=folder)


def _run(args: argparse.Namespace, command: Any) -> int:
    """Open the bundle and Redis, run ``command``, and turn known failures into messages."""
    try:
        settings = WorkerSettings.from_env(
            model_dir=args.model, model_version=getattr(args, "model_version", None)
        )
        client = settings.broker_client()
        if settings.model_dir is None:  # a published version: the Redis URL is enough
            settings = _published(settings, client)
        assert settings.model_dir is not None  # a folder given, or the published one fetched
        manifest = load_manifest(settings.model_dir)
    except (ImgqError, ValueError, OSError) as exc:
        print(f"imgq drift: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"imgq drift: Redis at {mask_url(settings.broker_url)}: {exc}", file=sys.stderr)
        return 1
    try:
        command(args, client, manifest, settings.model_dir)
        return 0
    except (_UsageError, OSError) as exc:  # OSError: --out is a file, or not writable
        print(f"imgq drift: {exc}", file=sys.stderr)
        return 2
    except redis.ConnectionError as exc:
        print(
            f"imgq drift: cannot reach Redis at {mask_url(settings.broker_url)}: {exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        client.close()


def _status(args: argparse.Namespace, client: redis.Redis, manifest: Manifest, _: Path) -> None:
    status = read_status(client, manifest)
    latest, open_alerts = status["latest"], status["open_alerts"]
    print(
        f"model {manifest.name} (sha256 {manifest.short_sha}, drift state {manifest.drift_id}); "
        "open window: "
        f"{status['open_window_images']} images"
    )
    if latest is None:
        print(
            "no window judged yet: the first closes after IMGQ_DRIFT_WINDOW images "
            "or IMGQ_DRIFT_WINDOW_S seconds"
        )
        return
    w = latest["window"]
    print(
        f"latest window {w['id']}: {w['n_images']} images, {w['start']} .. {w['end']} "
        f"({w['duration_s']:.1f} s): {latest.get('tier', 'page').upper()}; estimated accuracy "
        f"{_percent(latest.get('estimated_accuracy'))} (mean calibrated confidence: blind to "
        f"confident mistakes, docs/drift.md)\n"
        f"page tier: Holm at {latest.get('page_alpha', 'n/a')} over the output-side tests; "
        f"notice tier: Holm at {latest['alpha']} over the image features, PSI floor "
        f"{latest['psi_floor']}\n"
    )
    print(
        f"{'feature':<22}{'tier':<7}{'reference':>10}{'current':>10}{'stat':>9}"
        f"{'p-value':>10}{'p-thresh':>10}{'PSI':>7}{'effect':>8}  state"
    )
    for f in latest["features"]:
        current = "n/a" if f["current"] is None else f"{f['current']:.3g}"
        effect = f.get("effect", f["psi"])
        print(
            f"{f['name']:<22}{f.get('tier', 'page'):<7}{f['reference']:>10.3g}{current:>10}"
            f"{f['statistic']:>9.1f}{f['p_value']:>10.1e}{f['p_threshold']:>10.1e}"
            f"{f['psi']:>7.3f}{effect:>8.3f}  {feature_state(f, open_alerts)}"
        )
    notes = [f for f in latest["features"] if feature_state(f, open_alerts) != "ok"]
    for f in notes:
        print(f"  {f['name']}: {f['summary']}")
    if open_alerts:
        ids = ", ".join(f"{feat} (alert {i})" for feat, i in sorted(open_alerts.items()))
        print(f"\nopen alerts: {ids}; details: imgq drift alerts")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _windows(args: argparse.Namespace, client: redis.Redis, manifest: Manifest, _: Path) -> None:
    verdicts = read_windows(client, manifest, args.count)
    if args.json:
        for v in verdicts:
            print(json_line(v))
        return
    if not verdicts:
        print(f"no judged windows for model {manifest.name} yet")
        return
    print(f"{'window':>7}  {'end':<24}{'images':>7}  {'tier':<7}{'est.acc':>8}  alerting")
    for v in verdicts:
        w = v["window"]
        alerting = [_evidence(f) for f in v["features"] if f.get("drifting")]
        print(
            f"{w['id']:>7}  {w['end']:<24}{_num(w['n_images'], 'd'):>7}  {v['tier']:<7}"
            f"{_percent(v['estimated_accuracy']):>8}  {'; '.join(alerting) or '-'}"
        )


def _evidence(f: dict[str, Any]) -> str:
    """One alerting feature of a verdict: tier, p-value, PSI, effect, summary."""
    effect = f.get("effect")
    shown = "" if effect is None else f", effect {effect:.3g}"
    return (
        f"{f['name']} ({f.get('tier') or 'page'}, p {_num(f['p_value'], '.1e')}, "
        f"PSI {_num(f['psi'], '.2f')}{shown}: {f['summary']})"
    )


def _num(value: float | int | None, spec: str) -> str:
    """A checked number (``records.finite``) in ``spec``, or ``-`` for none."""
    return "-" if value is None else format(value, spec)


def _alerts(args: argparse.Namespace, client: redis.Redis, manifest: Manifest, _: Path) -> None:
    if args.ack:
        ack_alert(client, manifest, args.ack)
        print(f"acknowledged alert {args.ack}")
        return
    alerts = list_alerts(client, manifest, include_all=args.all)
    if not alerts:
        print(
            f"no {'' if args.all else 'open, unacknowledged '}drift alerts for model "
            f"{manifest.name}"
        )
    for a in alerts:
        w = a["window"]
        state = a["state"] + (", acked" if a["acked"] else "")
        print(
            f"{a['tier'].upper()} alert {printable(a['id'][:80])} [{state}] {a['time']} model "
            f"{a['model']}: window {w['id']} ({_num(w['n_images'], 'd')} images, {w['start']} "
            f".. {w['end']}), estimated accuracy {_percent(a['estimated_accuracy'])}"
        )
        for f in a["features"]:
            effect = f["effect"] if f["effect"] is not None else f["psi"]
            floor = f["effect_floor"] if f["effect_floor"] is not None else f["psi_floor"]
            test = f.get("test") if isinstance(f.get("test"), str) else "chi2"
            print(
                f"  {f['feature']:<22} {test} p "
                f"{_num(f['p_value'], '.1e')} <= {_num(f['p_threshold'], '.1e')}, effect "
                f"{_num(effect, '.3g')} >= {_num(floor, 'g')}, PSI {_num(f['psi'], '.3f')}  "
                f"{f['summary']}"
            )
        if a["still_open"]:
            print(f"  still drifting from earlier alerts: {', '.join(a['still_open'])}")


def _report(
    args: argparse.Namespace, client: redis.Redis, manifest: Manifest, model_dir: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = read_status(client, manifest)
    written = []
    if status["latest"] is None:
        print("no window judged yet: no histograms")
    else:
        written.append(_histograms(manifest, status["latest"], status["open_alerts"], out))
    thumbs = [
        json.loads(x)
        for x in client.lrange(DriftKeys(manifest.drift_id).out_of_range, 0, STRIP_LEN - 1)
    ]
    strip = _strip(thumbs, model_dir / "samples", out)
    if strip is None:
        print("no out-of-range inputs and no bundle samples: no strip")
    else:
        written.append(strip)
    for path in written:
        print(f"wrote {path}")


def _histograms(
    manifest: Manifest, latest: dict[str, Any], open_alerts: dict[str, str], out: Path
) -> Path:
    """Reference vs current shares per bin for the drifting features (else the top three)."""
    import matplotlib.pyplot as plt

    binned = [f for f in latest["features"] if f["name"] in manifest.reference.features]
    features = [f for f in binned if feature_state(f, open_alerts) == "alert"]
    title = "features with an open alert"
    if not features:
        features = sorted(binned, key=lambda f: -f["psi"])[:3]
        title = "no open alert: largest PSI"
    fig, axes = plt.subplots(len(features), 1, figsize=(9, 2.6 * len(features)), squeeze=False)
    for ax, f in zip(axes[:, 0], features, strict=True):
        ref = manifest.reference.features[f["name"]]
        ref_share = np.asarray(ref.counts, np.float64) / max(1, sum(ref.counts))
        cur_share = np.asarray(f["counts"], np.float64) / max(1, sum(f["counts"]))
        x = np.arange(len(ref_share))
        ax.bar(x - 0.2, ref_share, 0.4, label=f"reference ({sum(ref.counts)})")
        ax.bar(x + 0.2, cur_share, 0.4, label=f"window {latest['window']['id']} ({f['n']})")
        ax.set_xticks(x, _bin_labels(ref, manifest.labels), fontsize=7, rotation=20)
        ax.set_ylabel("share")
        ax.set_title(f"{f['name']}: PSI {f['psi']:.2f}, {f['summary']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{manifest.name}: {title}", fontsize=10)
    fig.tight_layout()
    path = out / "histograms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bin_labels(ref: FeatureReference, labels: tuple[str, ...]) -> list[str]:
    """Readable bin names: class names, or value ranges."""
    if ref.categorical:
        return [labels[i] if i < len(labels) else str(i) for i in range(len(ref.counts))]
    edges = ref.edges
    names = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if lo == -np.inf:
            names.append(f"< {hi:.3g}")
        elif hi == np.inf:
            names.append(f">= {lo:.3g}")
        else:
            names.append(f"{lo:.3g}..{hi:.3g}")
    return names


def _strip(thumbs: list[dict[str, Any]], samples_dir: Path, out: Path) -> Path | None:
    """Recent out-of-range inputs (top row) beside random training samples (bottom row)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    samples = sorted(p for p in samples_dir.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    samples = random.sample(samples, min(STRIP_LEN, len(samples)))
    if not thumbs and not samples:
        return None
    fig, axes = plt.subplots(2, STRIP_LEN, figsize=(1.6 * STRIP_LEN, 4.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, t in zip(axes[0], thumbs, strict=False):
        ax.imshow(Image.open(io.BytesIO(base64.b64decode(t["jpeg_b64"]))).convert("RGB"))
        ax.set_title("\n".join(t["features"][:3]), fontsize=7)
    for ax, p in zip(axes[1], samples, strict=False):
        with Image.open(p) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(p.parent.name if p.parent != samples_dir else p.stem, fontsize=7)
    for row, label in enumerate(("recent out-of-range", "training samples")):
        axes[row, 0].text(
            -0.1, 0.5, label, transform=axes[row, 0].transAxes, rotation=90,
            va="center", ha="right", fontsize=8,
        )  # fmt: skip
    fig.tight_layout()
    path = out / "out_of_range.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
