"""The review page (`imgq drift serve`) in headless Chromium, and the loop back to training
(`imgq drift samples` then `imgq train` on the old data and the samples), against a real
redis-server holding the drift state a real `imgq worker` wrote while serving."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from imgq.cli import main as imgq_main
from imgq.shared.manifest import load_manifest, save_manifest
from imgq.trainer.dataset import list_training_files
from imgq.worker.bundles import list_versions, publish
from imgq.worker.client import ImgqClient
from imgq.worker.drift import DriftKeys
from imgq.worker.drift.page import ReviewData, exposure_warning, make_server
from imgq.worker.drift.samples import write_samples
from imgq.worker.settings import WorkerSettings
from tests.tinymodel import COLOURS, colour_image, encode_png, make_tiny_bundle
from tests.workerproc import Workers, wait_for

HOSTILE = "<script>alert(1)</script>"
WINDOW = 50
CHROMIUM = shutil.which("chromium")
SHOT_W, SHOT_H = 1200, 900


def images(n: int, *, gain: float = 1.0, seed: int = 0) -> list[bytes]:
    """``n`` PNGs of the tiny model's three colours in turn, brightness times ``gain``."""
    return [
        encode_png((colour_image(COLOURS[i % 3], seed=seed + i) * gain).astype(np.uint8))
        for i in range(n)
    ]


@dataclasses.dataclass
class Served:
    db: redis.Redis
    keys: DriftKeys
    url: str
    bundle: Path
    judge: Any


@pytest.fixture
def served(redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """The tiny bundle with its novelty model, named with a script tag, published (so only the
    Redis URL is needed) and served by one real worker with drift on in windows of 50;
    ``judge(images)`` sends one window in small requests and waits until it is judged."""
    bundle = make_tiny_bundle(tmp_path / "bundle", novelty=True)
    save_manifest(dataclasses.replace(load_manifest(bundle), name=f"tiny{HOSTILE}"), bundle)
    db = redis.Redis.from_url(redis_server.url)
    publish(db, bundle, 1 << 24, "imgq")
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    monkeypatch.setenv("IMGQ_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMGQ_MODEL", raising=False)
    workers = Workers(bundle, redis_server.url, tmp_path)
    worker = workers.start(
        "page", IMGQ_DRIFT="1", IMGQ_DRIFT_WINDOW=str(WINDOW), IMGQ_DRIFT_WINDOW_S="3600"
    )
    client = ImgqClient(redis_server.url)
    keys = DriftKeys(load_manifest(bundle).drift_id)

    def judge(window: list[bytes]) -> None:
        expected = int(db.get(keys.seq) or 0) + 1
        for start in range(0, len(window), 5):
            outcomes = client.results(client.classify_many(window[start : start + 5]), 60)
            assert all(isinstance(o, dict) for o in outcomes), worker.log_tail()
        wait_for(lambda: db.llen(keys.verdicts) >= expected)

    try:
        yield Served(db, keys, redis_server.url, bundle, judge)
    finally:
        workers.kill_all()
        client.close()
        db.close()


@pytest.fixture
def page(served: Served) -> Iterator[str]:
    """`imgq drift serve` on a free port, in a thread; yields its base URL."""
    settings = WorkerSettings.from_env()
    server = make_server(ReviewData(redis.Redis.from_url(served.url), settings))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium (a fresh profile) and return its standard output."""
    assert CHROMIUM, "chromium is not installed: bash scripts/setup.sh --browser"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def post(url: str, form: dict[str, str], **headers: str) -> int:
    data = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in form.items()).encode()
    request = urllib.request.Request(url, data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: bash scripts/setup.sh --browser")
def test_review_page_in_headless_chromium(served: Served, page: str, tmp_path: Path) -> None:
    """Windows judged from a real worker's traffic (plain, then dark: an alert, out-of-range and
    novel inputs), a hostile alert and a verdict with tier and estimated accuracy as the shared
    contract writes them: Chromium renders the tiers, the accuracy, the alerts with their
    Acknowledge button, the histograms and the novel inputs beside their nearest training
    images, shows hostile text as text, takes a non-blank screenshot; the page's token
    acknowledges, other origins and hosts are refused."""
    served.judge(images(WINDOW))
    served.judge(images(WINDOW, gain=0.15, seed=100))
    sha = served.keys.prefix.split(":")[2]
    real_alerts = [a for a in served.db.xrange(served.keys.alerts)]
    assert real_alerts, "the dark window raised no alert"
    hostile = {
        "type": "alert", "id": "666", "tier": "notice", "model": HOSTILE,
        "window": {"id": 2, "n_images": 1}, "time": HOSTILE, "still_open": [],
        "features": [{"feature": HOSTILE, "summary": '<img src=x onerror="alert(2)">',
                      "psi": 0.5}],
    }  # fmt: skip
    served.db.xadd(served.keys.alerts, {"json": json.dumps(hostile)})
    latest = json.loads(served.db.get(served.keys.latest))
    contract = latest | {"tier": "notice", "estimated_accuracy": 0.931}
    contract["window"] = latest["window"] | {"id": 3}
    served.db.lpush(served.keys.verdicts, json.dumps(contract))

    dom = chromium(tmp_path, "--dump-dom", f"{page}/model/{sha}")
    assert "<script" not in dom.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert '&lt;img src=x onerror="alert(2)"&gt;' in dom  # as text
    assert all(tag.startswith('<img src="data:') for tag in re.findall(r"<img[^>]*>", dom))
    assert re.search(r'class="verdict" data-window="3">.*?data-tier="notice".*?93\.1%', dom)
    assert re.search(r'data-window="2">.*?data-tier="page"', dom)  # no tier recorded: page
    assert 'class="card histogram" data-feature="brightness"' in dom
    assert 'alt="out-of-range input"' in dom and 'alt="training sample of ' in dom
    assert 'alt="novel input"' in dom and 'alt="nearest training image, ' in dom
    first_alert = json.loads(real_alerts[0][1][b"json"])["id"]
    assert f'id="ack-{first_alert}"' in dom
    index = chromium(tmp_path, "--dump-dom", f"{page}/")
    assert f'href="/model/{sha}"' in index and "tiny&lt;script&gt;" in index

    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={SHOT_W},{SHOT_H}",
             f"{page}/model/{sha}")  # fmt: skip
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (SHOT_W, SHOT_H)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50, "blank screenshot"
    red = np.abs(pixels - (0xC6, 0x28, 0x28)).sum(axis=1) < 30  # the page tier's colour
    assert red.sum() > 50, "no page tier rendered"

    token = re.search(r'name="token" value="([^"]+)"', dom)
    assert token is not None
    ack = f"{page}/model/{sha}/ack"
    form = {"token": token.group(1), "alert": first_alert}
    assert post(ack, {**form, "token": "x"}) == 403
    assert post(ack, form, Origin="http://evil.example") == 403
    assert post(ack, form, Host="evil.example") == 403
    assert served.db.hget(served.keys.acked, first_alert) is None
    assert post(ack, form, Origin=page) in (200, 303)
    assert served.db.hget(served.keys.acked, first_alert) is not None
    after = chromium(tmp_path, "--dump-dom", f"{page}/model/{sha}")
    assert f'id="ack-{first_alert}"' not in after
    assert json.loads(urllib.request.urlopen(f"{page}/api/models").read())[0]["windows"] == 3


@pytest.mark.integration
@pytest.mark.slow
def test_samples_of_a_window_train_with_the_old_data(served: Served, tmp_path: Path) -> None:
    """A real worker serves a window; `imgq drift samples` writes its sampled inputs as class
    folders with samples.csv, from the Redis URL alone; `imgq train OLD SAMPLES` trains on both,
    the samples in its split."""
    served.judge(images(WINDOW))
    out = tmp_path / "samples"
    assert imgq_main(["drift", "samples", "--window", "1", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*/*.png"))
    assert pngs, "no sample written"
    rows = (out / "samples.csv").read_text().splitlines()
    header = "id,time,predicted_label,score,out_of_range,novelty"
    assert rows[0] == header and len(rows) == len(pngs) + 1
    assert {p.parent.name for p in pngs} <= {"a", "b", "c"}
    assert (out / "README.txt").read_text().startswith("Each image is in the folder")
    with Image.open(pngs[0]) as im:
        assert im.size == (16, 16)  # the model's input
    assert imgq_main(["drift", "samples", "--window", "1", "--out", str(out)]) == 2  # not empty

    old = tmp_path / "old"
    for k, label in enumerate("abc"):
        (old / label).mkdir(parents=True)
        for i in range(8):
            (old / label / f"{i}.png").write_bytes(encode_png(colour_image(COLOURS[k], seed=i)))
    model = tmp_path / "retrained"
    assert imgq_main(["train", str(old), str(out), "--out", str(model), "--image-size", "16",
                      "--epochs", "2", "--patience", "1", "--no-augment", "--val-split", "0.25",
                      "--test-split", "0.25", "--publish"]) == 0  # fmt: skip
    history = json.loads((model / "history.json").read_text())
    used = [f for part in history["split"].values() for f in part]
    assert len(used) == 24 + len(pngs)
    assert sum(f.startswith(str(out)) for f in used) == len(pngs)
    assert load_manifest(model).labels == ("a", "b", "c")
    # --publish: the retrained bundle is a version the fleet can roll out.
    shas = {v.model_sha256 for v in list_versions(served.db)}
    assert load_manifest(model).model_sha256 in shas


def test_training_folders_merge_by_class_and_refuse_a_new_one(tmp_path: Path) -> None:
    """Later folders add images to the first's classes by name; a class folder emptied while
    labelling is skipped; a class the first folder lacks is refused with the fix."""
    for folder, label, n in (("old", "a", 2), ("old", "b", 2), ("new", "a", 1), ("new", "b", 0)):
        (tmp_path / folder / label).mkdir(parents=True)
        for i in range(n):
            (tmp_path / folder / label / f"{i}.png").write_bytes(b"x")
    (tmp_path / "new" / "samples.csv").write_text("id\n")
    files, labels = list_training_files([tmp_path / "old", tmp_path / "new"])
    assert labels == ["a", "a", "b", "b", "a"] and files[-1] == tmp_path / "new" / "a" / "0.png"
    (tmp_path / "new" / "zebra").mkdir()
    (tmp_path / "new" / "zebra" / "0.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"zebra is not a class of .*old \(a, b\)"):
        list_training_files([tmp_path / "old", tmp_path / "new"])


def test_written_samples_stay_inside_the_folder(tmp_path: Path) -> None:
    """Samples from Redis are hostile: a label that is not the model's, a path, or bytes that
    are not a PNG are skipped, never written."""
    png = encode_png(colour_image(COLOURS[0]))
    samples = [
        ("1-0", {"label": "a", "score": 0.9, "out_of_range": ["brightness"]}, png),
        ("2-0", {"label": "../../escape", "score": 0.9}, png),
        ("3-0", {"label": "b", "score": 0.9}, b"<script>"),
        ("4-0", {"label": "zebra", "score": 0.9}, png),
    ]
    written, skipped = write_samples(samples, ("a", "b"), tmp_path / "out")
    assert (written, skipped) == (1, 3)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")) == [
        Path("out/a/1-0.png")
    ]
    assert "1-0,,a,0.9,brightness" in (tmp_path / "out" / "samples.csv").read_text()


@dataclasses.dataclass
class Review:
    db: redis.Redis
    keys: DriftKeys
    data: ReviewData
    features: dict[str, int]  # the reference's features and their bin counts


@pytest.fixture
def review(
    redis_server: Any, bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Review]:
    """Review data over a bare redis-server and the tiny bundle given as ``--model``: each test
    writes the hostile or healthy entries it needs, no worker involved."""
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    monkeypatch.setenv("IMGQ_MODEL_CACHE", str(tmp_path / "cache"))
    db = redis.Redis.from_url(redis_server.url)
    manifest = load_manifest(bundle_dir)
    data = ReviewData(db, WorkerSettings.from_env(), bundle_dir)
    features = {n: len(f.counts) for n, f in manifest.reference.features.items()}
    try:
        yield Review(db, DriftKeys(manifest.drift_id), data, features)
    finally:
        db.close()


@contextlib.contextmanager
def serving(data: ReviewData, host: str = "127.0.0.1", **kwargs: Any) -> Iterator[int]:
    server = make_server(data, host, 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def raw_request(port: int, request: bytes, address: str = "127.0.0.1") -> bytes:
    """Send ``request`` as is and return the whole reply (the server closes after it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(20)
        sock.connect((address, port))
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def get(port: int, path: str, host: str | None = None, address: str = "127.0.0.1") -> bytes:
    host = host or f"127.0.0.1:{port}"
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    return raw_request(port, request.encode(), address)


def status_of(reply: bytes) -> int:
    assert reply, "empty reply"
    return int(reply.split(b" ", 2)[1])


def verdict_entry(review: Review, window: int, drifting: set[str], **extra: Any) -> str:
    """A verdict as the detector stores it: every feature with its group (``tier``) and state."""
    features = [
        {"name": n, "tier": "page" if i % 2 else "notice", "drifting": n in drifting,
         "significant": n in drifting, "psi": 0.5 if n in drifting else 0.01,
         "counts": [3] * bins, "summary": "s"}
        for i, (n, bins) in enumerate(review.features.items())
    ]  # fmt: skip
    return json.dumps({"window": {"id": window, "n_images": 50}, "tier": "ok",
                       "estimated_accuracy": 0.9, "features": features} | extra)  # fmt: skip


def test_page_flags_only_drifting_features(review: Review) -> None:
    """A feature's ``tier`` is its test's group, not its state: a healthy window flags no feature
    and badges no histogram; one drifting page feature is flagged and badged alone."""
    sha = review.keys.prefix.split(":")[2]
    healthy = verdict_entry(review, 1, set())
    review.db.lpush(review.keys.verdicts, healthy)
    review.db.set(review.keys.latest, healthy)
    with serving(review.data) as port:
        page = get(port, f"/model/{sha}").decode()
        assert status_of(page.encode()) == 200
        assert re.search(r'data-window="1">.*?<td>-</td></tr>', page)
        cards = re.findall(r'class="card histogram".*?</svg></div>', page)
        assert len(cards) == len(review.features) and not any("data-tier" in c for c in cards)

        page_feature = list(review.features)[1]  # odd index: in the page group
        drifting = verdict_entry(review, 2, {page_feature}, tier="page")
        review.db.lpush(review.keys.verdicts, drifting)
        review.db.set(review.keys.latest, drifting)
        page = get(port, f"/model/{sha}").decode()
    row = re.search(r'data-window="2">(.*?)</tr>', page)
    assert row is not None
    flagged = row.group(1).rsplit("<td>", 1)[1]
    assert flagged == f"{page_feature} (page, PSI 0.50)</td>"
    badged = re.findall(r'data-feature="([^"]+)"><b>[^<]*</b> PSI [0-9.]+ <span class="tier '
                        r'tier-(\w+)"', page)  # fmt: skip
    assert badged == [(page_feature, "page")]


def test_hostile_entries_still_render_the_page(
    review: Review, caplog: pytest.LogCaptureFixture
) -> None:
    """Features that are not a list, NaN or huge accuracies, oversized entries and thumbnails,
    a bad Content-Length and an unexpected failure: each gets a page or a short error, never
    an empty reply or a traceback to the client."""
    sha = review.keys.prefix.split(":")[2]
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, "JPEG")
    for i, accuracy in enumerate((float("nan"), 1e308, float("inf"), -0.5), start=1):
        entry = {"window": {"id": i}, "tier": "ok", "estimated_accuracy": accuracy}
        review.db.lpush(review.keys.verdicts, json.dumps(entry | {"features": 5}))
    review.db.lpush(review.keys.verdicts, verdict_entry(review, 9, set(), pad="x" * (300 << 10)))
    review.db.set(review.keys.latest, json.dumps({"window": {"id": 4}, "features": 5}))
    alert = {"type": "alert", "id": "7-0", "window": {"id": 1}, "features": 7}
    review.db.xadd(review.keys.alerts, {"json": json.dumps(alert)})
    thumbs = {
        "good": base64.b64encode(jpeg.getvalue()).decode(),
        "huge": base64.b64encode(b"\xff\xd8\xff" + bytes(100 << 10)).decode(),
        "png": base64.b64encode(encode_png(colour_image(COLOURS[0]))).decode(),
    }
    for label, b64 in thumbs.items():
        review.db.lpush(review.keys.out_of_range, json.dumps({"jpeg_b64": b64, "label": label}))
    with serving(review.data) as port:
        reply = get(port, f"/model/{sha}")
        assert status_of(reply) == 200
        page = reply.decode()
        assert "nan" not in page.lower() and "inf%" not in page
        assert re.findall(r'class="accuracy">([^<]*)<', page) == ["n/a"] * 4
        assert 'data-window="9"' not in page  # over the entry cap: skipped
        assert 'data-alert="7-0"' in page
        assert re.findall(r"predicted <b>(\w+)</b>", page) == ["good"]
        assert status_of(get(port, f"/api/model/{sha}")) == 200

        ack = f"POST /model/{sha}/ack HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        reply = raw_request(port, f"{ack}Content-Length: abc\r\n\r\n".encode())
        assert status_of(reply) == 400 and b"Bad request" in reply

        def broken(sha: str) -> dict[str, Any]:
            raise RuntimeError("secret detail")

        review.data.model_view = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.INFO, logger="imgq.drift.page"):
            reply = get(port, f"/model/{sha}")
    assert status_of(reply) == 500 and b"secret detail" not in reply
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot answer" in errors[0].getMessage()


def test_host_check_binding_and_warning(review: Review) -> None:
    """Bound to the wildcard, the page answers loopback names and ``--allow-host`` names, never
    the wildcard itself; ``::`` binds IPv6; binding beyond loopback is warned about."""
    with serving(review.data, "0.0.0.0", allow_hosts=("drift.example",)) as port:
        assert status_of(get(port, "/", f"0.0.0.0:{port}")) == 403
        assert status_of(get(port, "/", f"evil.example:{port}")) == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"drift.example:{port}"):
            assert status_of(get(port, "/", host)) == 200, host
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with serving(review.data, "::") as port:
        assert status_of(get(port, "/", f"[::1]:{port}", "::1")) == 200
        assert status_of(get(port, "/", f"[::]:{port}", "::1")) == 403
    assert exposure_warning("0.0.0.0") and exposure_warning("::")
    assert "no login" in str(exposure_warning("10.1.2.3"))
    assert not any(map(exposure_warning, ("127.0.0.1", "localhost", "::1")))


def test_a_quiet_connection_is_dropped(review: Review) -> None:
    """A client that sends half a request and waits is cut off after the connection timeout
    (its thread freed), and the server keeps answering others."""
    with serving(review.data, connection_timeout=0.5) as port:
        assert raw_request(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()) == b""
        assert status_of(get(port, "/")) == 200


def test_novel_inputs_beside_their_nearest_training_images(
    redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each kept novel input is shown beside the gallery images it names, with its novelty and
    the class the model gave it; hostile entries (a neighbour that is no position in the
    gallery, a novelty that is no number, a label with markup, bytes that are no JPEG) render
    as n/a, escaped text or not at all."""
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    monkeypatch.setenv("IMGQ_MODEL_CACHE", str(tmp_path / "cache"))
    bundle = make_tiny_bundle(tmp_path / "bundle", novelty=True)
    manifest = load_manifest(bundle)
    keys = DriftKeys(manifest.drift_id)
    db = redis.Redis.from_url(redis_server.url)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(jpeg, "JPEG")
    good = base64.b64encode(jpeg.getvalue()).decode()
    entries = [
        {"jpeg_b64": good, "novelty": 3.5, "label": "a", "neighbours": [2, 0]},
        {"jpeg_b64": good, "novelty": "NaN", "label": HOSTILE, "neighbours": [99, -1, True, "1"]},
        {"jpeg_b64": base64.b64encode(encode_png(colour_image(COLOURS[0]))).decode(),
         "novelty": 9.0, "label": "png", "neighbours": [1]},
    ]  # fmt: skip
    for entry in reversed(entries):
        db.lpush(keys.novel, json.dumps(entry))
    try:
        with serving(ReviewData(db, WorkerSettings.from_env(), bundle)) as port:
            page = get(port, f"/model/{keys.prefix.split(':')[2]}").decode()
    finally:
        db.close()
    cards = re.findall(r'<div class="card novel">(.*?)</div>', page)
    assert len(cards) == 2, cards  # the PNG is no thumbnail
    assert manifest.novelty is not None
    gallery = manifest.novelty.gallery
    near = re.findall(r'alt="nearest training image, (\w+)"', cards[0])
    assert near == [gallery[2].label, gallery[0].label]
    assert "novelty <b>3.50</b>" in cards[0] and "predicted <b>a</b>" in cards[0]
    assert "novelty <b>n/a</b>" in cards[1] and "no training image" in cards[1]
    assert "&lt;script&gt;" in cards[1] and "<script" not in page.lower()
