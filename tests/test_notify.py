"""The alert webhook (worker/drift/notify.py, worker/drift/webhook.py) against a real HTTP
receiver in a thread and a real redis-server, with alerts written by the real DriftDetector:
one signed delivery per page, retries with back-off, 4xx and redirects not retried, dead
letters, two notifiers sharing the work, a killed `imgq drift notify` taken over, notices
never sent, and no secret in any log line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from imgq.localredis import LocalRedis, free_port
from imgq.shared.manifest import Manifest, load_manifest
from imgq.worker.drift.notify import (
    DEAD_LETTERS,
    GROUP,
    AlertNotifier,
    WebhookConfig,
)
from imgq.worker.drift.notify_cli import model_streams
from imgq.worker.drift.webhook import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, post, verify
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from tests.drift_synthetic import make_manifest, make_reference
from tests.webhook_support import (
    HOOK_PATH,
    SECRET,
    Answer,
    Receiver,
    TricklingReceiver,
    add_notice,
    config,
    judge_windows,
    outcome,
    pending,
    settled,
    stream_of,
)
from tests.workerproc import Workers, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    yield c
    c.close()


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return make_manifest(make_reference(np.random.default_rng(0)))


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics(CollectorRegistry())


@pytest.fixture
def notifiers(
    client: redis.Redis, manifest: Manifest, metrics: WorkerMetrics
) -> Iterator[Callable[..., AlertNotifier]]:
    """Start notifiers of the test model's stream in threads (as a worker runs them)."""
    made: list[AlertNotifier] = []

    def make(url: str, **overrides: Any) -> AlertNotifier:
        stream = stream_of(manifest)
        notifier = AlertNotifier(
            client, config(url, **overrides), lambda: [stream], metrics=metrics, poll_s=0.02
        )
        made.append(notifier.start())
        return notifier

    yield make
    for notifier in made:
        notifier.close()


def docs_verifier() -> Callable[..., bool]:
    """The receiver-side check exactly as docs/operations.md shows it."""
    text = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    block = next((b for b in blocks if "def verify_imgq_signature" in b), None)
    assert block is not None, "docs/operations.md lost its signature verification snippet"
    namespace: dict[str, Any] = {}
    exec(block, namespace)  # noqa: S102 (the documented code is what is tested)
    return namespace["verify_imgq_signature"]  # type: ignore[no-any-return]


def start_notify(
    redis_server: LocalRedis, url: str, log: Any, **more_env: str
) -> subprocess.Popen[bytes]:
    """A real `imgq drift notify` process sending to ``url``, its output in ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    env |= {"IMGQ_BROKER_URL": redis_server.url, "IMGQ_ALERT_WEBHOOK_URL": url,
            "IMGQ_ALERT_WEBHOOK_SECRET": SECRET, "IMGQ_METRICS_PORT": "0"}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "imgq.cli", "drift", "notify"],
        env=env | more_env, stdout=log, stderr=log,
    )  # fmt: skip


# ----------------------------------------------------------------------------- delivery


def test_page_is_delivered_once_signed_and_nothing_secret_is_logged(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real alert: one POST with a valid signature (by imgq's verify and by the documented
    receiver code), an idempotency key of model and alert id, then acknowledged; no log line
    holds the secret or the URL's path or query."""
    with caplog.at_level(logging.DEBUG):
        judge_windows(client, manifest, [0.15])
        notifiers(receiver.url)
        wait_for(lambda: settled(client, manifest, metrics), 20)
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request["path"] == HOOK_PATH
    body, headers = request["body"], request["headers"]
    assert verify(SECRET, body, headers[SIGNATURE_HEADER])
    verify_documented = docs_verifier()
    assert verify_documented(SECRET, body, headers[SIGNATURE_HEADER])
    assert not verify_documented(SECRET, body + b" ", headers[SIGNATURE_HEADER])
    assert not verify_documented("another-secret-0123456789", body, headers[SIGNATURE_HEADER])
    timestamp = int(headers[SIGNATURE_HEADER].split(",")[0].removeprefix("t="))
    replayed = headers[SIGNATURE_HEADER]
    assert not verify_documented(SECRET, body, replayed, now=timestamp + 301)
    payload = json.loads(body)
    assert payload["type"] == "drift.alert" and payload["tier"] == "page"
    written_ms = payload["stream_entry"].partition("-")[0]
    key = f"{manifest.drift_id}:1:{written_ms}"
    assert payload["idempotency_key"] == key == headers[IDEMPOTENCY_HEADER]
    assert payload["model"] == "shapes" and payload["event"]["features"][0]["feature"]
    assert "brightness" in payload["text"]
    assert outcome(metrics, "delivered") == 1 and outcome(metrics, "retried") == 0
    assert client.llen(DEAD_LETTERS) == 0
    logged = caplog.text + " ".join(json.dumps(vars(r), default=str) for r in caplog.records)
    for secret in (SECRET, "pathtoken42", "querytoken42"):
        assert secret not in logged


def test_retries_with_back_off_after_500s(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
) -> None:
    """500, 503, then 200: three POSTs of the same body and key, each re-signed, the waits
    growing (at least half of 0.2 s, then of 0.4 s: the back-off's floor with jitter)."""
    receiver.script = [500, 503]
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url, backoff_s=0.2, backoff_max_s=1.0)
    wait_for(lambda: settled(client, manifest, metrics), 20)
    assert len(receiver.requests) == 3
    assert len({r["body"] for r in receiver.requests}) == 1
    assert [r["headers"]["X-Imgq-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
    assert all(verify(SECRET, r["body"], r["headers"][SIGNATURE_HEADER]) for r in receiver.requests)
    times = [r["time"] for r in receiver.requests]
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2
    assert outcome(metrics, "retried") == 2 and outcome(metrics, "delivered") == 1


def test_retry_after_is_honoured(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
) -> None:
    """A 429 with Retry-After: 1 delays the retry by a second, whatever the back-off says."""
    receiver.script = [("retry_after", 429, "1")]
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url, backoff_s=0.01, backoff_max_s=5.0)
    wait_for(lambda: settled(client, manifest), 20)
    first, second = (r["time"] for r in receiver.requests)
    assert second - first >= 1.0


def test_receiver_down_at_first_then_up(
    client: redis.Redis,
    manifest: Manifest,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
) -> None:
    """Connection refused is retried; once the receiver listens, the page arrives once."""
    port = free_port()
    judge_windows(client, manifest, [0.15])
    notifiers(f"http://127.0.0.1:{port}{HOOK_PATH}", attempts=50, backoff_max_s=0.1)
    wait_for(lambda: outcome(metrics, "retried") >= 2, 20)
    late = Receiver(port)
    try:
        wait_for(lambda: settled(client, manifest, metrics), 20)
        assert len(late.requests) == 1 and outcome(metrics, "delivered") == 1
    finally:
        late.close()


def test_slow_receiver_times_out_and_is_retried(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A receiver that never answers costs one attempt of timeout_s, then the retry lands."""
    receiver.script = ["hang"]
    judge_windows(client, manifest, [0.15])
    with caplog.at_level(logging.WARNING, logger="imgq.drift.notify"):
        notifiers(receiver.url, timeout_s=0.5)
        wait_for(lambda: settled(client, manifest, metrics), 20)
    assert len(receiver.requests) == 2 and outcome(metrics, "delivered") == 1
    assert [r.reason for r in caplog.records if hasattr(r, "reason")] == ["timeout"]


def test_huge_answer_is_not_read(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
) -> None:
    """A 2xx with a 1 GiB body counts as delivered; the sender reads 1 KiB and hangs up."""
    receiver.script = [("huge", 1 << 30)]
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url)
    wait_for(lambda: settled(client, manifest, metrics), 20)
    assert outcome(metrics, "delivered") == 1
    assert receiver.huge_bytes_sent < 1 << 30


@pytest.mark.parametrize(
    ("answer", "reason"),
    [(400, "http_400"), (410, "http_410"), (("redirect", 302), "redirect_302"),
     (("redirect", 308), "redirect_308")],
)  # fmt: skip
def test_4xx_and_redirects_are_not_retried_and_dead_lettered(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
    answer: Answer,
    reason: str,
) -> None:
    """One POST, no redirect followed, then a dead letter operators can read, and the entry
    acknowledged."""
    receiver.script = [answer]
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url)
    wait_for(lambda: client.llen(DEAD_LETTERS) == 1, 20)
    wait_for(lambda: settled(client, manifest, metrics), 20)
    assert [r["path"] for r in receiver.requests] == [HOOK_PATH]
    record = json.loads(client.lindex(DEAD_LETTERS, 0))
    assert record["reason"] == reason and record["attempts"] == 1
    assert record["payload"]["idempotency_key"].startswith(f"{manifest.drift_id}:1:")
    assert record["receiver"] == f"http://127.0.0.1:{receiver.port}"
    assert len(record["response"]) <= 200
    assert outcome(metrics, "dead_letter") == 1 and outcome(metrics, "retried") == 0


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retried(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
    status: int,
) -> None:
    """The two 4xx that mean "later" are retried like a 5xx."""
    receiver.script = [status]
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url)
    wait_for(lambda: settled(client, manifest, metrics), 20)
    assert len(receiver.requests) == 2 and outcome(metrics, "delivered") == 1


def test_attempts_run_out_into_a_dead_letter(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
) -> None:
    """A receiver that always fails gets exactly `attempts` POSTs, then the dead letter."""
    receiver.script = [500] * 10
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url, attempts=3)
    wait_for(lambda: client.llen(DEAD_LETTERS) == 1, 20)
    wait_for(lambda: settled(client, manifest, metrics), 20)
    record = json.loads(client.lindex(DEAD_LETTERS, 0))
    assert len(receiver.requests) == 3 and record["reason"] == "http_500"
    assert record["status"] == 500 and record["attempts"] == 3
    assert outcome(metrics, "retried") == 2 and outcome(metrics, "dead_letter") == 1


# ----------------------------------------------------------------------------- what is sent


def test_notices_are_never_sent_and_clears_of_pages_are(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
) -> None:
    """A notice (and a clear that ends only a notice) is acknowledged unsent; a page and its
    clear are sent, the clear with a key of its own."""
    add_notice(client, manifest, "900")
    clear = {"type": "clear", "window": {"id": 901}, "features": {"bytes_per_pixel": "900"}}
    client.xadd(stream_of(manifest), {"json": json.dumps(clear)})
    judge_windows(client, manifest, [0.15, 0.0])  # a page, then its clear
    notifiers(receiver.url)
    wait_for(lambda: settled(client, manifest, metrics), 20)
    kinds = [(b["type"], b["idempotency_key"]) for b in receiver.bodies()]
    assert [k for k, _ in kinds] == ["drift.alert", "drift.clear"]
    assert kinds[0][1].startswith(f"{manifest.drift_id}:1:")
    assert kinds[1][1].startswith(f"{manifest.drift_id}:clear:")
    assert receiver.bodies()[1]["model"] == "shapes"
    assert outcome(metrics, "skipped") == 2 and outcome(metrics, "delivered") == 2


def test_clears_are_not_sent_when_turned_off(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
) -> None:
    """IMGQ_ALERT_WEBHOOK_CLEARS=false: the page only."""
    judge_windows(client, manifest, [0.15, 0.0])
    notifiers(receiver.url, clears=False)
    wait_for(lambda: settled(client, manifest), 20)
    assert [b["type"] for b in receiver.bodies()] == ["drift.alert"]


def test_unreadable_entry_goes_to_the_dead_letters(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
) -> None:
    """An entry that is not the detector's JSON is dead-lettered, and the page after it is
    still delivered."""
    client.xadd(stream_of(manifest), {"json": b"\xff{not json"})
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url)
    wait_for(lambda: settled(client, manifest), 20)
    assert json.loads(client.lindex(DEAD_LETTERS, 0))["reason"] == "unreadable_entry"
    assert [b["type"] for b in receiver.bodies()] == ["drift.alert"]


def test_a_malformed_entry_does_not_stop_the_pages_after_it(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
) -> None:
    """A page whose features are not a list makes the sender fail: that entry alone is
    dead-lettered and acknowledged. Ids with CR/LF or outside Latin-1 (http.client refuses
    such headers) go out with a safe key; the detector's page after them is still sent."""
    stream = stream_of(manifest)
    bad = {"type": "alert", "id": "f-int", "window": {"id": 1}, "features": 7}
    client.xadd(stream, {"json": json.dumps(bad)})
    for hostile_id in ("x\r\nX-Evil: 1", "\u043f\u0435\u0439\u0434\u0436"):
        page = {"type": "alert", "id": hostile_id, "model": "shapes", "features": []}
        client.xadd(stream, {"json": json.dumps(page)})
    judge_windows(client, manifest, [0.15])
    notifiers(receiver.url)
    wait_for(lambda: settled(client, manifest, metrics), 20)
    [record] = [json.loads(r) for r in client.lrange(DEAD_LETTERS, 0, -1)]
    assert record["reason"] == "failed_TypeError" and outcome(metrics, "dead_letter") == 1
    assert len(receiver.requests) == 3 and outcome(metrics, "delivered") == 3
    keys = [r["headers"][IDEMPOTENCY_HEADER] for r in receiver.requests]
    assert keys[0].startswith(f"{manifest.drift_id}:x__X-Evil: 1:")
    assert keys[1].startswith(f"{manifest.drift_id}:_____:")
    assert keys == [b["idempotency_key"] for b in receiver.bodies()]
    assert all("X-Evil" not in r["headers"] for r in receiver.requests)


def test_a_header_http_client_refuses_is_rejected_not_retried(receiver: Receiver) -> None:
    """post() itself never raises for a header it cannot send: a reject, nothing sent."""
    for value in ("x\r\nX-Evil: 1", "\u043f\u0435\u0439"):
        attempt = post(receiver.url, b"{}", {IDEMPOTENCY_HEADER: value}, 5.0)
        assert (attempt.outcome, attempt.reason) == ("reject", "bad_request")
    assert receiver.requests == []


def test_a_trickled_answer_is_cut_at_the_attempts_deadline() -> None:
    """An HTTP/1.0 answer whose body comes a byte per 50 ms (100 s in all): the attempt ends
    at its 1 s deadline as a timeout, and the receiver sees the connection closed after a
    small part of the body."""
    trickler = TricklingReceiver(body_bytes=2000, every_s=0.05)
    try:
        attempt = post(trickler.url, b"{}", {}, 1.0)
        assert (attempt.outcome, attempt.reason, attempt.status) == ("retry", "timeout", 200)
        wait_for(trickler.hung_up.is_set, 20)
        assert trickler.sent < 500
    finally:
        trickler.close()


def test_sigterm_stops_notify_while_an_answer_trickles(
    client: redis.Redis, redis_server: LocalRedis, manifest: Manifest, tmp_path: Path
) -> None:
    """`imgq drift notify` (1 s attempts) SIGTERMed while a receiver trickles its answer exits
    0 with the trickle far from done; the alert stays pending for a later sender."""
    trickler = TricklingReceiver(body_bytes=2000, every_s=0.05)
    judge_windows(client, manifest, [0.15])
    log = (tmp_path / "notify.log").open("w")
    proc = start_notify(redis_server, trickler.url, log, IMGQ_ALERT_WEBHOOK_TIMEOUT_S="1")
    try:
        wait_for(lambda: trickler.sent > 0, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert trickler.sent < 1000
        assert pending(client, manifest) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        trickler.close()


def test_keys_stay_unique_when_redis_loses_its_data(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FLUSHALL while a page is being retried: the sender makes its group again (no "Redis
    unavailable"), and the next page, whose window id is 1 again, gets a key of its own."""
    receiver.script = ["hang"]
    judge_windows(client, manifest, [0.15])
    with caplog.at_level(logging.INFO, logger="imgq.drift.notify"):
        notifiers(receiver.url, timeout_s=1.0)
        wait_for(lambda: receiver.requests, 20)
        client.flushall()
        wait_for(lambda: "is gone; making it again" in caplog.text, 20)
        judge_windows(client, manifest, [0.15])
        wait_for(lambda: settled(client, manifest), 20)
    assert "Redis unavailable" not in caplog.text
    first, second = (b["idempotency_key"] for b in receiver.bodies())
    assert first.startswith(f"{manifest.drift_id}:1:") and second.startswith(
        f"{manifest.drift_id}:1:"
    )
    assert first != second


def test_notify_finds_a_new_models_stream_within_seconds(client: redis.Redis) -> None:
    """`imgq drift notify` looks for alert streams every 5 s, not once a minute."""
    streams = model_streams(client)
    assert streams() == []
    client.xadd("imgq:drift:feedface:alerts", {"json": "{}"})
    wait_for(lambda: streams() == ["imgq:drift:feedface:alerts"], 15)


# ----------------------------------------------------------------------------- a fleet


def test_two_notifiers_deliver_each_alert_exactly_once(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
) -> None:
    """Two workers' notifiers on one stream: every page and clear arrives once."""
    notifiers(receiver.url)
    notifiers(receiver.url)
    judge_windows(client, manifest, [0.15, 0.0] * 4)
    wait_for(lambda: settled(client, manifest), 30)
    keys = [b["idempotency_key"] for b in receiver.bodies()]
    assert len(keys) == 8 and len(set(keys)) == 8


def test_a_killed_notifier_process_is_taken_over(
    client: redis.Redis,
    redis_server: LocalRedis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    tmp_path: Path,
) -> None:
    """`imgq drift notify` is SIGKILLed while its POST is in flight; after claim_idle_s a
    worker's notifier claims the pending entry (XAUTOCLAIM) and delivers it."""
    receiver.script = ["hang"]
    judge_windows(client, manifest, [0.15])
    log = (tmp_path / "notify.log").open("w")
    proc = start_notify(redis_server, receiver.url, log)
    try:
        wait_for(lambda: receiver.requests, 60)
        assert pending(client, manifest) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    dead = client.xpending_range(stream_of(manifest), GROUP, "-", "+", 1)[0]["consumer"]
    survivor = notifiers(receiver.url, claim_idle_s=0.5)
    wait_for(lambda: settled(client, manifest), 30)
    assert len(receiver.requests) == 2
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]
    assert dead.decode() != survivor.consumer
    assert client.llen(DEAD_LETTERS) == 0


def test_own_pending_entry_is_picked_up_again(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    metrics: WorkerMetrics,
) -> None:
    """An entry this notifier read but never finished (Redis failed mid-alert, or the same
    consumer restarted) is delivered at its next look, without waiting for claim_idle_s."""
    judge_windows(client, manifest, [0.15])
    stream = stream_of(manifest)
    client.xgroup_create(stream, GROUP, id="0")
    notifier = AlertNotifier(
        client, config(receiver.url), lambda: [stream], metrics=metrics, poll_s=0.02
    )
    client.xreadgroup(GROUP, notifier.consumer, {stream: ">"})
    assert pending(client, manifest) == 1
    notifier.start()
    try:
        wait_for(lambda: settled(client, manifest, metrics), 20)
    finally:
        notifier.close()
    assert len(receiver.requests) == 1


def test_an_entry_handed_over_too_often_is_dead_lettered(
    client: redis.Redis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
) -> None:
    """An entry whose holders died again and again (a poison pill) is not tried once more."""
    judge_windows(client, manifest, [0.15])
    stream = stream_of(manifest)
    client.xgroup_create(stream, GROUP, id="0")
    [[_, [(entry_id, _)]]] = client.xreadgroup(GROUP, "ghost", {stream: ">"})
    client.xclaim(stream, GROUP, "ghost", 0, [entry_id], retrycount=9)
    notifiers(receiver.url, claim_idle_s=0.2)
    wait_for(lambda: settled(client, manifest), 20)
    assert receiver.requests == []
    assert json.loads(client.lindex(DEAD_LETTERS, 0))["reason"].startswith("handed_over_")


def test_redis_outage_is_survived(
    client: redis.Redis,
    redis_server: LocalRedis,
    manifest: Manifest,
    receiver: Receiver,
    notifiers: Callable[..., AlertNotifier],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis gone for a while: one warning, the thread lives on, and the page raised after
    Redis came back is delivered."""
    judge_windows(client, manifest, [0.15])
    with caplog.at_level(logging.WARNING, logger="imgq.drift.notify"):
        notifier = notifiers(receiver.url)
        wait_for(lambda: len(receiver.requests) == 1, 20)
        redis_server.stop()
        wait_for(lambda: "Redis unavailable" in caplog.text, 20)
        redis_server.start()
        judge_windows(client, manifest, [0.0, 0.15])
        wait_for(lambda: len(receiver.requests) == 3, 30)
    assert notifier._thread is not None and notifier._thread.is_alive()
    assert caplog.text.count("Redis unavailable") == 1
    assert [b["idempotency_key"] for b in receiver.bodies()][-1].startswith(
        f"{manifest.drift_id}:3:"
    )


@pytest.mark.integration
def test_a_worker_sends_its_models_pages_and_stops_cleanly(
    client: redis.Redis, workers: Workers, bundle_dir: Path, receiver: Receiver
) -> None:
    """A real `imgq worker` with the webhook set runs the sender thread for the model it
    serves: a page of that model arrives signed; the worker still stops cleanly."""
    worker = workers.start(
        "w1", IMGQ_DRIFT="1", IMGQ_ALERT_WEBHOOK_URL=receiver.url,
        IMGQ_ALERT_WEBHOOK_SECRET=SECRET,
    )  # fmt: skip
    wait_for(lambda: "alert webhook on" in worker.log_tail(100_000), 120)
    manifest = load_manifest(bundle_dir)
    judge_windows(client, manifest, [0.3])
    wait_for(lambda: receiver.requests, 30)
    [request] = receiver.requests
    assert verify(SECRET, request["body"], request["headers"][SIGNATURE_HEADER])
    assert json.loads(request["body"])["idempotency_key"].startswith(f"{manifest.drift_id}:1:")
    assert worker.stop() == 0
    assert SECRET not in worker.log_tail(1_000_000)


# ----------------------------------------------------------------------------- settings


def test_webhook_settings_are_checked_and_never_shown() -> None:
    """An http(s) URL with a host and a 16-character secret; the start-up log shows only the
    receiver's origin, and the settings' repr no secret."""
    env = {"IMGQ_ALERT_WEBHOOK_URL": f"https://user:pw@hooks.example:8443{HOOK_PATH}",
           "IMGQ_ALERT_WEBHOOK_SECRET": SECRET}  # fmt: skip
    settings = WorkerSettings.from_env(env)
    shown = json.dumps(settings.describe()) + repr(settings)
    assert "https://hooks.example:8443" in shown
    for secret in (SECRET, "pathtoken42", "querytoken42", ":pw@"):
        assert secret not in shown
    made = WebhookConfig.from_settings(settings)
    assert made is not None and made.claim_idle_s > made.timeout_s + made.backoff_max_s
    assert SECRET not in repr(made)
    assert WebhookConfig.from_settings(WorkerSettings.from_env({})) is None
    with pytest.raises(ValueError, match="at least 16 characters"):
        WorkerSettings.from_env(env | {"IMGQ_ALERT_WEBHOOK_SECRET": "short"})
    with pytest.raises(ValueError, match="http:// or https://"):
        WorkerSettings.from_env(env | {"IMGQ_ALERT_WEBHOOK_URL": "file:///etc/passwd"})
    with pytest.raises(ValueError, match="IMGQ_ALERT_WEBHOOK_ATTEMPTS"):
        WorkerSettings.from_env(env | {"IMGQ_ALERT_WEBHOOK_ATTEMPTS": "0"})
