"""Issue 26: a bundle exported before novelty existed (manifest version 2, a model with one
output) still loads, serves and is judged exactly as before. The fixtures were written by imgq
at f553edf (``tests/fixtures/README.md``), not by this code."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from imgq.shared.bundle import ModelBundle
from imgq.shared.manifest import MANIFEST_FILE, Manifest, load_manifest
from imgq.worker.drift import DriftDetector, DriftKeys, Window, WindowLayout, evaluate_window
from imgq.worker.drift.harm import PAGE_TESTS
from imgq.worker.drift.verdict import window_tier
from imgq.worker.wire import TASK_NAME
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import Workers

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "verdicts_v2.json").read_text())


def _trained() -> Manifest:
    return Manifest.from_dict(json.loads((FIXTURES / "manifest_v2_trained.json").read_text()))


def test_old_manifests_load_unchanged_with_their_drift_ids() -> None:
    """Version 2 manifests load without novelty, write back the JSON they were read from, and
    keep the drift id f553edf gave them (their drift state in Redis stays theirs)."""
    tiny = load_manifest(FIXTURES / "bundle_v2_tiny")
    trained = _trained()
    assert (tiny.version, trained.version) == (2, 2)
    assert tiny.novelty is None and trained.novelty is None
    assert tiny.drift_id == EXPECTED["drift_id_tiny"]
    assert trained.drift_id == EXPECTED["drift_id_trained"]
    written = json.dumps(tiny.to_dict(), indent=2) + "\n"
    assert written == (FIXTURES / "bundle_v2_tiny" / MANIFEST_FILE).read_text()
    assert "novelty" not in trained.to_dict()


def test_old_windows_keep_their_slots() -> None:
    """The window layout of an old reference keeps every slot where f553edf put it; the novel
    count is a slot after them that an old bundle never increments."""
    layout = WindowLayout(_trained().reference)
    assert layout.calibrated_confidence_slot + 1 == EXPECTED["layout_size_trained"]
    assert layout.novel_slot == EXPECTED["layout_size_trained"]
    old = np.arange(EXPECTED["layout_size_trained"], dtype=">i8")
    window = layout.parse(1, old.tobytes())
    assert window.novel == 0 and window.out_of_range == layout.out_of_range_slot


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=lambda c: c["kind"])
def test_old_bundles_are_judged_as_before(case: dict[str, Any]) -> None:
    """The detector of a version 2 bundle judges a window as f553edf did: the same six page
    tests, the same p-values, Holm levels and states, the same tier (a tenth of the window out
    of range still pages: an old bundle has no novelty to say otherwise)."""
    manifest = _trained()
    detector = DriftDetector(redis.Redis(port=1), manifest)  # never connects: judging only
    spec = case["window"]
    window = Window(**{**spec, "counts": {k: np.asarray(v) for k, v in spec["counts"].items()}})
    results = evaluate_window(
        manifest.reference, window, labels=manifest.labels,
        accuracy_test=detector.accuracy_test, novel_reference=detector.novel_reference,
    )  # fmt: skip
    assert detector.novel_reference is None
    assert window_tier(results) == case["tier"]
    got = [(r.name, r.tier, r.test, r.drifting) for r in results]
    want = [(r["name"], r["tier"], r["test"], r["drifting"]) for r in case["results"]]
    assert got == want
    for r, w in zip(results, case["results"], strict=True):
        assert r.p_value == pytest.approx(w["p_value"], rel=1e-9, abs=1e-300)
        assert r.p_threshold == pytest.approx(w["p_threshold"], rel=1e-12)
    assert {r.name for r in results if r.tier == "page"} <= set(PAGE_TESTS) - {"novel_share"}


@pytest.mark.integration
def test_an_old_bundle_serves_and_counts_as_before(redis_server: Any, tmp_path: Path) -> None:
    """A real worker with drift statistics on serves the version 2 bundle: it loads (golden set
    checked), its results carry ``drift.out_of_range`` and nothing new, and its window counts
    land in the slots they always did, with no novel count."""
    bundle = Path(shutil.copytree(FIXTURES / "bundle_v2_tiny", tmp_path / "bundle"))
    assert ModelBundle.load(bundle, device="cpu").check_golden()["n"] == 3
    workers = Workers(bundle, redis_server.url, tmp_path)
    client = Celery("service", broker=redis_server.url, backend=redis_server.url)
    try:
        workers.start("old", IMGQ_DRIFT="1").wait_ready(client)
        images = [encode_png(colour_image(COLOURS[i % 3], seed=i)) for i in range(6)]
        sent = [
            client.send_task(TASK_NAME, kwargs={"image": _b64(b)}, queue="imgq") for b in images
        ]
        results = [r.get(timeout=60) for r in sent]
        assert [r["label"] for r in results] == ["a", "b", "c"] * 2
        assert all(set(r["drift"]) == {"out_of_range"} for r in results), results[0]
        manifest = load_manifest(bundle)
        raw = redis.Redis.from_url(redis_server.url).get(DriftKeys(manifest.drift_id).open)
        layout = WindowLayout(manifest.reference)
        assert isinstance(raw, bytes) and len(raw) <= 8 * layout.novel_slot
        assert layout.parse(0, raw).n_images == 6
    finally:
        workers.kill_all()
        client.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
