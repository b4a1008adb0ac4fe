"""Novelty in the model's own features (issue 26): the score and its threshold, the manifest's
novelty section as hostile input, the bundle's features output and its golden check, the page
tier's novel-share test, and what a worker's recorder makes of a batch."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from imgq.shared.bundle import ModelBundle, serving_files
from imgq.shared.errors import BundleError, ManifestError
from imgq.shared.imagestats import image_features
from imgq.shared.manifest import MANIFEST_FILE, load_manifest, save_manifest
from imgq.shared.novelty import NoveltyModel, decode_array, encode_array
from imgq.shared.preprocess import preprocess_batch
from imgq.trainer.novelty import fit_novelty, gallery_rows
from imgq.worker.drift import DriftRecorder, Window, WindowLayout, window_tier
from imgq.worker.drift.harm import page_results
from imgq.worker.drift.recorder import Observation
from tests.tinymodel import COLOURS, colour_image, make_tiny_bundle

GREY, YELLOW = (128, 128, 128), (220, 220, 30)


def _gaussians(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 8-dimensional features, each its own mean and spread."""
    y = np.arange(n) % 3
    centres = np.array([[4.0] * 8, [-4.0] * 8, [4.0, -4.0] * 4])
    scales = np.array([1.0, 0.5, 2.0])
    return centres[y] + rng.standard_normal((n, 8)) * scales[y, None], y


def test_threshold_is_an_order_statistic_of_the_held_out_images() -> None:
    """Exactly floor(0.5% of n), and at least 3, held-out images lie above the threshold (the
    reference share the page tier tests against); a point far from every class is novel, one
    at a class mean not."""
    rng = np.random.default_rng(0)
    train, y = _gaussians(rng, 900)
    held, _ = _gaussians(rng, 1650)
    model = fit_novelty(train, y, held, 3, output_name="features")
    assert model.held_out_novel == (8, 1650) and model.quantile == 1 - 8 / 1650
    assert int((model.score(held)[0] > 1.0).sum()) == 8
    few = fit_novelty(train, y, held[:100], 3, output_name="features")
    assert few.held_out_novel == (3, 100)
    far, mean = np.full((1, 8), 30.0), train[y == 1].mean(axis=0, keepdims=True)
    assert model.score(far)[0][0] > 3.0 and model.score(mean)[0][0] < 0.5


def test_score_is_the_smallest_mahalanobis_distance_over_the_threshold() -> None:
    """The batched product equals the textbook distance with each class's shrunk covariance."""
    rng = np.random.default_rng(1)
    train, y = _gaussians(rng, 600)
    model = fit_novelty(train, y, _gaussians(rng, 100)[0], 3, output_name="f", shrinkage=0.1)
    points = rng.standard_normal((5, 8)) * 6
    residual = train - np.stack([train[y == k].mean(axis=0) for k in range(3)])[y]
    shared = residual.T @ residual / (len(train) - 3)
    distances = []
    for k in range(3):
        own = residual[y == k]
        cov = 0.9 * own.T @ own / (len(own) - 1) + 0.1 * shared
        d = points - train[y == k].mean(axis=0)
        distances.append(np.einsum("nd,de,ne->n", d, np.linalg.inv(cov), d))
    want = np.sqrt(np.min(distances, axis=0) / model.threshold)
    np.testing.assert_allclose(model.score(points)[0], want, rtol=1e-3)


def test_novelty_section_round_trips_and_refuses_hostile_values(tmp_path: Path) -> None:
    """The manifest's novelty section loads back equal; a bad array, a shape that does not
    match its bytes, NaN, a wrong class count or an unknown method is a ManifestError naming
    what is wrong."""
    bundle = make_tiny_bundle(tmp_path / "b", novelty=True)
    manifest = load_manifest(bundle)
    assert manifest.version == 3 and manifest.novelty is not None
    saved = json.loads((bundle / MANIFEST_FILE).read_text())
    assert NoveltyModel.from_dict(saved["novelty"]) == manifest.novelty
    nan = encode_array(np.array([np.nan, 1.0, 2.0]))
    short = dict(saved["novelty"]["centre"], shape=[4])
    cases = {
        "not valid base64": {"centre": {"shape": [3], "float32_b64": "@@@"}},
        "has 12 bytes for shape": {"centre": short},
        "NaN or infinite": {"centre": nan},
        "larger than imgq reads": {"centre": {"shape": [1 << 23], "float32_b64": "AAAA"}},
        "class means for 3 labels": {"means": encode_array(np.zeros((2, 3)))},
        "unknown novelty method": {"method": "energy"},
        "held_out_novel must be": {"held_out_novel": [1]},
        "held_out_novel must be ": {"held_out_novel": [1e400, 1e400]},
        "held_out_novel must be  ": {"held_out_novel": "12"},
        "threshold must be a number": {"threshold": True},
        "threshold must be a number ": {"threshold": None},
        "quantile must be a number": {"quantile": "0.5"},
        "shrinkage must be in": {"shrinkage": float("nan")},
    }
    for message, change in cases.items():
        bad = saved | {"novelty": saved["novelty"] | change}
        if message == "class means for 3 labels":
            bad["novelty"]["whitening"] = encode_array(np.zeros((2, 3, 3)))
        (bundle / MANIFEST_FILE).write_text(json.dumps(bad))
        with pytest.raises(ManifestError, match=message.strip()):
            load_manifest(bundle)
    with pytest.raises(ValueError, match="needs a shape of 2"):
        decode_array({"shape": [3], "float32_b64": "AAAA"}, "x", 2)


def test_bundle_serves_features_and_checks_golden_novelty(tmp_path: Path) -> None:
    """The features output comes from the same call as the probabilities; the gallery is a
    serving file (published with the bundle); a golden image whose recorded novelty the served
    path does not reproduce stops the bundle, naming it."""
    bundle_dir = make_tiny_bundle(tmp_path / "b", novelty=True)
    bundle = ModelBundle.load(bundle_dir, device="cpu")
    images = [colour_image(c, 18, seed=5) for c in (*COLOURS, GREY, YELLOW)]
    probs, features = bundle.features_of_images(images)
    np.testing.assert_array_equal(probs, bundle.classify_images(images))
    assert features.shape == (5, 3)
    novelty = bundle.manifest.novelty
    assert novelty is not None
    scores = novelty.score(features)[0]
    assert (scores[:3] < 1.0).all() and (scores[3:] > 1.0).all()
    assert "novelty/00_a.png" in serving_files(bundle.manifest)
    manifest = bundle.manifest
    golden = list(manifest.golden)
    golden[1] = dataclasses.replace(golden[1], novelty=(golden[1].novelty or 0.0) + 0.5)
    save_manifest(dataclasses.replace(manifest, golden=tuple(golden)), bundle_dir)
    with pytest.raises(BundleError, match=r"golden/b.png: novelty expected"):
        ModelBundle.load(bundle_dir, device="cpu")
    old = ModelBundle.load(make_tiny_bundle(tmp_path / "old"), device="cpu")
    with pytest.raises(BundleError, match="has no novelty model"):
        old.predict_with_features(preprocess_batch(images, old.manifest.preprocess))


def test_a_model_without_the_features_output_is_refused(tmp_path: Path) -> None:
    """A manifest whose novelty model names an output the model lacks is another model's."""
    with_novelty = load_manifest(make_tiny_bundle(tmp_path / "new", novelty=True))
    bundle_dir = make_tiny_bundle(tmp_path / "old")
    plain = load_manifest(bundle_dir)
    save_manifest(dataclasses.replace(plain, novelty=with_novelty.novelty, version=3), bundle_dir)
    shutil.copytree(tmp_path / "new" / "novelty", bundle_dir / "novelty")
    with pytest.raises(BundleError, match="reads features from 'features'"):
        ModelBundle.load(bundle_dir, device="cpu")


def test_gallery_takes_classes_in_turn() -> None:
    """Up to eight training images per class, classes in turn."""
    rows = gallery_rows(np.array([0] * 20 + [1] * 3))
    assert rows[:6] == [0, 20, 1, 21, 2, 22] and len(rows) == 11


def _window(manifest: Any, *, novel: int, out_of_range: int, n: int = 200) -> Window:
    """A window of ``n`` images whose outputs are the reference's, with these counts."""
    counts = {}
    for name, f in manifest.reference.features.items():
        p = np.asarray(f.counts, float) / sum(f.counts)
        counts[name] = np.floor(p * n).astype(np.int64)
        counts[name][int(np.argmax(p))] += n - counts[name].sum()
    return Window(1, n, 0.0, 1.0, counts, {}, out_of_range=out_of_range, novel=novel)


@pytest.mark.parametrize(
    ("novel", "out_of_range", "with_novelty", "tier", "alerting"),
    [
        (2, 0, True, "ok", set()),
        (30, 0, True, "page", {"novel_share"}),
        (2, 40, True, "notice", {"out_of_range_share"}),
        (30, 40, True, "page", {"novel_share", "out_of_range_share"}),
        (2, 40, False, "page", {"out_of_range_share"}),
    ],
)
def test_novel_share_pages_and_pixels_alone_only_notice(
    tmp_path_factory: pytest.TempPathFactory,
    novel: int,
    out_of_range: int,
    with_novelty: bool,
    tier: str,
    alerting: set[str],
) -> None:
    """More novel inputs than the held-out images have pages; inputs out of the pixel range
    whose features the model knows are notice evidence, unless the novel share agrees; without
    a novelty model (an older bundle) the out-of-range share pages alone, as before."""
    manifest = load_manifest(make_tiny_bundle(tmp_path_factory.mktemp("b"), novelty=True))
    reference = dataclasses.replace(manifest.reference, held_out_out_of_range=(2, 1000))
    manifest = dataclasses.replace(manifest, reference=reference)
    window = _window(manifest, novel=novel, out_of_range=out_of_range)
    results = page_results(
        reference, window, alpha=0.005, novel_reference=(10, 1000) if with_novelty else None
    )
    assert window_tier(results) == tier
    assert {r.name for r in results if r.drifting} == alerting
    assert ("novel_share" in {r.name for r in results}) == with_novelty


@pytest.mark.parametrize(("novel", "pages"), [(100, False), (200, False), (240, True)])
def test_novel_share_pages_only_above_its_effect_floor(
    tmp_path_factory: pytest.TempPathFactory, novel: int, pages: bool
) -> None:
    """In a window of 4,000, 2.5%, 5% and 6% novel are all significantly above the held-out 1%;
    only the last is at least the 4.5-point floor above it."""
    manifest = load_manifest(make_tiny_bundle(tmp_path_factory.mktemp("b"), novelty=True))
    window = _window(manifest, novel=novel, out_of_range=0, n=4000)
    results = page_results(manifest.reference, window, alpha=0.005, novel_reference=(100, 10000))
    (share,) = [r for r in results if r.name == "novel_share"]
    assert share.significant  # beyond the held-out share either way: only the floor differs
    assert share.drifting == pages and (window_tier(results) == "page") == pages


def test_recorder_counts_novel_images_and_keeps_them_beside_their_neighbours(
    redis_server: Any, tmp_path: Path
) -> None:
    """A batch of three class images and two unlike any class: each result says which are
    novel, the open window counts two, and the first novel one is kept as a thumbnail that
    names its nearest training images (positions in the manifest's gallery)."""
    bundle = ModelBundle.load(make_tiny_bundle(tmp_path / "b", novelty=True), device="cpu")
    manifest = bundle.manifest
    db = redis.Redis.from_url(redis_server.url)
    recorder = DriftRecorder(db, manifest, window_size=200, window_s=300)
    try:
        images = [colour_image(c, 16, seed=9) for c in (*COLOURS, GREY, YELLOW)]
        stacked = np.stack(images)
        probs, features = bundle.features_of_images(images)
        sizes = np.array([[16, 16, 800]] * 5, np.float64)
        batch = recorder.observe_batch(images, image_features(stacked, sizes), probs, features)
        assert [d["novel"] for d in batch.drift] == [False, False, False, True, True]
        assert all(isinstance(d["novelty"], float) for d in batch.drift)
        observations = [Observation(batch, i) for i in range(5)]
        (counts,) = recorder.window_counts(observations)
        pipe = db.pipeline()
        pipe.eval(recorder.lua_add_window + "return add_window(KEYS[1], ARGV[1], ARGV[2])",
                  1, counts.key, counts.images, counts.pairs)  # fmt: skip
        recorder.extras(pipe, observations)
        pipe.execute()
        window = WindowLayout(manifest.reference).parse(0, db.get(recorder.keys.open))
        assert (window.n_images, window.novel) == (5, 2)
        (item,) = [json.loads(x) for x in db.lrange(recorder.keys.novel, 0, -1)]
        assert item["novelty"] == batch.drift[3]["novelty"] and len(item["neighbours"]) == 4
        assert all(0 <= i < 6 for i in item["neighbours"])
        assert base64.b64decode(item["jpeg_b64"]).startswith(b"\xff\xd8\xff")
        # A redelivered batch: only some of its results were new, only they count.
        (part,) = recorder.window_counts([Observation(batch, 0), Observation(batch, 3)])
        numbers = [int(x) for x in part.pairs.split()]
        increments = dict(zip(numbers[::2], numbers[1::2], strict=True))
        assert part.images == 2 and increments[WindowLayout(manifest.reference).novel_slot] == 1
    finally:
        recorder.close()
