"""`imgq drift status | alerts | report` on a real redis-server holding the state the workers
write: a judged window with an alert, an out-of-range thumbnail, and a bundle with samples."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client import CollectorRegistry

from imgq.shared.manifest import Manifest, save_manifest
from imgq.worker.drift import DriftKeys, DriftRecorder
from imgq.worker.drift.review import alerts_main, report_main, status_main, windows_main
from imgq.worker.metrics import WorkerMetrics
from tests.drift_synthetic import make_manifest, make_reference, traffic


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, Manifest]:
    """A bundle folder with the synthetic manifest and two training samples per class."""
    manifest = make_manifest(make_reference(np.random.default_rng(0)))
    folder = tmp_path / "bundle"
    folder.mkdir()
    save_manifest(manifest, folder)
    for k, label in enumerate(manifest.labels):
        (folder / "samples" / label).mkdir(parents=True)
        for i in range(2):
            image = np.full((40, 40, 3), 60 * k + 20 * i, np.uint8)
            cv2.imwrite(str(folder / "samples" / label / f"{i}.png"), image)
    return folder, manifest


@pytest.fixture
def drifted(
    redis_server: Any, bundle: tuple[Path, Manifest], monkeypatch: pytest.MonkeyPatch
) -> Iterator[redis.Redis]:
    """Redis after a darker window was judged (alert 1 on brightness) and one out-of-range
    input was kept; IMGQ_BROKER_URL points at it."""
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    monkeypatch.delenv("IMGQ_MODEL", raising=False)
    client = redis.Redis.from_url(redis_server.url)
    recorder = DriftRecorder(
        client,
        bundle[1],
        window_size=10_000,
        window_s=3600.0,
        metrics=WorkerMetrics(CollectorRegistry()),
    )
    try:
        pipe = client.pipeline()
        recorder.add_to_pipeline(pipe, *traffic(np.random.default_rng(1), 300, brightness=-0.2))
        recorder.add_out_of_range_thumbnail(pipe, np.zeros((50, 80, 3), np.uint8), ["brightness"])
        pipe.execute()
        window_id = recorder.close_window(min_images=1)
        assert window_id is not None
        assert recorder.detector.evaluate(window_id) is not None
    finally:
        recorder.close()
    yield client
    client.close()


def args(bundle_dir: Path | None, **kwargs: Any) -> argparse.Namespace:
    return argparse.Namespace(model=str(bundle_dir) if bundle_dir else None, **kwargs)


def test_status_shows_each_feature_with_its_state(
    drifted: redis.Redis, bundle: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]
) -> None:
    """The table has a row per feature; brightness is in alert with its summary, others ok."""
    assert status_main(args(bundle[0])) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha()}
    assert rows["brightness"][-1] == "alert"
    assert rows["brightness"][1] == "notice" and rows["confidence"][1] == "page"
    assert rows["sharpness"][-1] in ("ok", "watch")
    assert "latest window 1: 300 images" in out and "NOTICE; estimated accuracy n/a" in out
    assert "brightness: mean 0.5" in out and "-> 0.3" in out
    assert "open alerts: brightness (alert 1)" in out


def test_status_before_any_window(
    redis_server: Any,
    bundle: tuple[Path, Manifest],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A model with no judged window says so and how windows close."""
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    assert status_main(args(bundle[0])) == 0
    assert "no window judged yet" in capsys.readouterr().out


def test_alerts_list_ack_and_all(
    drifted: redis.Redis, bundle: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]
) -> None:
    """The open alert is listed; once acknowledged it leaves the default list but not --all."""
    assert alerts_main(args(bundle[0], all=False, ack=None)) == 0
    out = capsys.readouterr().out
    assert out.startswith("NOTICE alert 1 [open]") and "window 1 (300 images" in out
    assert "brightness" in out and "PSI" in out and "p " in out
    assert alerts_main(args(bundle[0], all=False, ack="1")) == 0
    assert capsys.readouterr().out == "acknowledged alert 1\n"
    assert alerts_main(args(bundle[0], all=False, ack=None)) == 0
    assert capsys.readouterr().out.startswith("no open, unacknowledged drift alerts")
    assert alerts_main(args(bundle[0], all=True, ack=None)) == 0
    assert capsys.readouterr().out.startswith("NOTICE alert 1 [open, acked]")


def test_ack_of_an_unknown_alert_fails_clearly(
    drifted: redis.Redis, bundle: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]
) -> None:
    """Acknowledging an id that does not exist exits 2 and lists the known ids."""
    assert alerts_main(args(bundle[0], all=False, ack="99")) == 2
    assert "no drift alert '99' for model shapes; ids: 1" in capsys.readouterr().err


def test_report_writes_histograms_and_the_strip(
    drifted: redis.Redis,
    bundle: tuple[Path, Manifest],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both PNGs are written, readable, and their paths printed."""
    out = tmp_path / "report"
    assert report_main(args(bundle[0], out=str(out))) == 0
    printed = capsys.readouterr().out
    for name in ("histograms.png", "out_of_range.png"):
        path = out / name
        assert f"wrote {path}" in printed
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 500


def test_commands_need_a_model(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --model, IMGQ_MODEL or a published version the command exits 2 and says how to
    give one."""
    monkeypatch.delenv("IMGQ_MODEL", raising=False)
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    assert status_main(args(None)) == 2
    err = capsys.readouterr().err
    assert "imgq models publish BUNDLE_DIR" in err and "--model DIR or IMGQ_MODEL" in err


def test_unreachable_redis_is_reported_with_the_password_masked(
    bundle: tuple[Path, Manifest],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Redis that does not answer gives exit 1 and a message without the password."""
    from imgq.localredis import free_port

    monkeypatch.setenv("IMGQ_BROKER_URL", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    assert status_main(args(bundle[0])) == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://:***@127.0.0.1" in err and "s3cret" not in err


def test_windows_json_lists_verdicts_newest_first(
    drifted: redis.Redis, bundle: tuple[Path, Manifest], capsys: pytest.CaptureFixture[str]
) -> None:
    """`imgq drift windows --json`: one verdict per line, newest first, with its tier, the
    estimated accuracy and every feature's evidence; the table names what alerted."""
    manifest = bundle[1]
    keys = DriftKeys(manifest.drift_id)
    older = {"window": {"id": 0}, "features": []}  # a verdict of before tiers
    drifted.rpush(keys.verdicts, json.dumps(older), b"\xff not json", b"[1]")
    assert windows_main(args(bundle[0], json=True, count=10)) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [v["window"]["id"] for v in lines] == [1, 0]
    newest = lines[0]
    assert newest["tier"] == "notice" and newest["estimated_accuracy"] is None
    brightness = next(f for f in newest["features"] if f["name"] == "brightness")
    assert brightness["tier"] == "notice" and brightness["drifting"]
    assert {"p_value", "psi", "effect", "counts"} <= brightness.keys()
    assert lines[1]["tier"] == "page" and lines[1]["estimated_accuracy"] is None  # contract
    assert windows_main(args(bundle[0], json=False, count=1)) == 0
    table = capsys.readouterr().out
    assert "notice" in table and "brightness (notice, p " in table and "window" in table
    assert windows_main(args(bundle[0], json=False, count=0)) == 2


def test_hostile_records_are_shown_without_a_traceback(
    drifted: redis.Redis,
    bundle: tuple[Path, Manifest],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Verdicts and alerts written by hand (or by another version) with missing fields, wrong
    types, NaN, CR/LF and 300 KiB of padding: every command answers, `--json` stays strict
    JSON, and `samples` of a window with unreadable times is refused with the reason."""
    from imgq.worker.drift.samples_cli import samples_main

    keys = DriftKeys(bundle[1].drift_id)
    hostile_verdicts = [
        {"window": {"id": 99}, "tier": "ok", "features": []},  # no end, no n_images
        {"window": {"id": 98, "end": None}, "estimated_accuracy": float("nan"), "features": 5},
        {"window": {"id": 97}, "estimated_accuracy": "high", "features": [{"name": 3}, 7]},
        {"window": {"id": 96}, "pad": "x" * 300_000},
    ]
    for verdict in hostile_verdicts:
        drifted.lpush(keys.verdicts, json.dumps(verdict))
    for event in (
        {"type": "alert", "id": "min", "window": {"id": 1}},
        {"type": "alert", "id": "f-int", "window": {"id": 2}, "features": 7, "time": 5},
        {"type": "alert", "id": "x\r\n\x1b[2J", "window": {"id": 3, "start": "soon"},
         "features": [{"feature": "brightness", "p_value": "low", "psi": None}]},
    ):  # fmt: skip
        drifted.xadd(keys.alerts, {"json": json.dumps(event)})
    assert windows_main(args(bundle[0], json=True, count=10)) == 0
    lines = [
        json.loads(line, parse_constant=pytest.fail)
        for line in capsys.readouterr().out.splitlines()
    ]
    assert [v["window"]["id"] for v in lines] == [97, 98, 99, 1]  # the padded one skipped
    assert lines[1]["estimated_accuracy"] is None and lines[1]["features"] == []
    assert windows_main(args(bundle[0], json=False, count=10)) == 0
    assert "99" in capsys.readouterr().out
    assert alerts_main(args(bundle[0], all=True, ack=None)) == 0
    out = capsys.readouterr().out
    assert "alert min" in out and "alert f-int" in out and "\x1b" not in out
    refused = samples_main(args(bundle[0], alert="min", window=None, out=str(tmp_path / "s")))
    assert refused == 2 and "not readable" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert samples_main(args(bundle[0], alert=None, window="1", out=str(a_file))) == 2
    assert "a-file" in capsys.readouterr().err
