"""Drift pages to a webhook: each page alert of each model's alert stream POSTed once, signed,
retried, and dead-lettered when it cannot be delivered (``imgq drift notify``, in
:mod:`~imgq.worker.drift.notify_cli`, or a thread of every worker whose
``IMGQ_ALERT_WEBHOOK_URL`` is set).

Who sends what, across a fleet: every notifier reads ``imgq:drift:<drift_id>:alerts`` through
one Redis consumer group, :data:`GROUP`, so each new entry goes to exactly one of them. An entry
stays *pending* (Redis' PEL) until it is delivered or dead-lettered, then it is acknowledged
(``XACK``). Between its attempts the notifier holding it refreshes its claim; when a notifier
dies, its pending entries sit idle, and after ``claim_idle_s`` another one takes them
(``XAUTOCLAIM``) and starts over. An entry handed over more than :data:`MAX_HANDOVERS` times is
dead-lettered instead of being retried for ever (a poison pill: it may crash its senders).

At least once: a notifier that dies after the receiver answered 2xx but before its ``XACK``
sends that alert again, so the payload and the ``Idempotency-Key`` header carry a key (model,
alert id and the millisecond the alert was written: window ids start again at 1 when Redis loses
its data) the receiver can de-duplicate on. Notices (``tier: notice``) are never sent;
pages are, and the clear of a paged alert when ``IMGQ_ALERT_WEBHOOK_CLEARS`` is on.

Dead letters: a JSON record per alert in the Redis list :data:`DEAD_LETTERS` (newest first,
:data:`DEAD_LETTERS_KEPT` kept), an ERROR log line ``alert_webhook_dead_letter``, and
``imgq_alert_webhook_total{outcome="dead_letter"}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

from imgq.worker.drift.layout import DriftKeys, _iso, _text
from imgq.worker.drift.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Attempt,
    header_safe,
    post,
    sign,
)
from imgq.worker.drift.webhook import backoff_s as _backoff_s
from imgq.worker.metrics import WorkerMetrics, process_metrics
from imgq.worker.settings import WorkerSettings, webhook_origin

__all__ = ["DEAD_LETTERS", "GROUP", "AlertNotifier", "WebhookConfig", "notifier_for_model"]

log = logging.getLogger("imgq.drift.notify")

#: The consumer group every notifier reads the alert streams through.
GROUP = "imgq-notify"
#: Redis list of alerts that could not be delivered (JSON records, newest first).
DEAD_LETTERS = "imgq:drift:webhook:dead"
DEAD_LETTERS_KEPT = 1000
#: Times an entry may pass from a dead notifier to another before it is dead-lettered.
MAX_HANDOVERS = 5
#: When a stream gets its group, entries up to this old are still sent (raised before any
#: notifier ran); older ones are history, not news.
CATCH_UP_S = 3600
#: An entry larger than this is not sent (the detector writes a few KiB).
ENTRY_MAX_BYTES = 1 << 20
#: Entries read or claimed per stream and pass.
_BATCH = 16
#: Consumers of the group with nothing pending and idle this long are removed (restarts).
_CONSUMER_IDLE_MS = 3_600_000
#: Entries searched back for the alerts a clear names.
_CLEAR_LOOKBACK = 1000


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebhookConfig:
    """Where and how pages are sent; build it with :meth:`from_settings`.

    ``claim_idle_s`` is how long an entry must sit untouched before another notifier takes it
    over: longer than the longest wait between two attempts plus one attempt, so that a live
    notifier, which refreshes its claim before every attempt, never loses an entry it holds.
    """

    url: str
    secret: str = dataclasses.field(repr=False)
    timeout_s: float = 10.0
    attempts: int = 8
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    clears: bool = True
    claim_idle_s: float = 150.0

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> WebhookConfig | None:
        """The configured webhook, or None when ``IMGQ_ALERT_WEBHOOK_URL`` is not set."""
        if not settings.alert_webhook_url:
            return None
        timeout_s, backoff_max_s = (
            settings.alert_webhook_timeout_s,
            settings.alert_webhook_backoff_max_s,
        )
        return cls(
            url=settings.alert_webhook_url,
            secret=settings.alert_webhook_secret,
            timeout_s=timeout_s,
            attempts=settings.alert_webhook_attempts,
            backoff_s=settings.alert_webhook_backoff_s,
            backoff_max_s=backoff_max_s,
            clears=settings.alert_webhook_clears,
            claim_idle_s=2 * (timeout_s + backoff_max_s) + 10,
        )


class AlertNotifier:
    """Sends the pages of some models' alert streams to the webhook, in a background thread.

    Args:
        client: Client of the broker's Redis (bytes replies).
        config: The webhook.
        streams: The alert streams to serve, asked again every pass (a worker gives its model's;
            ``imgq drift notify`` every model's it finds).
        metrics: Where ``imgq_alert_webhook_total`` is counted. Defaults to this process's.
        poll_s: Pause between two looks at streams with nothing new. Defaults to 1.
        rng: Jitter of the back-off. Defaults to a fresh ``random.Random()``.
    """

    def __init__(
        self,
        client: redis.Redis,
        config: WebhookConfig,
        streams: Callable[[], Iterable[str]],
        *,
        metrics: WorkerMetrics | None = None,
        poll_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = client
        self.config = config
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics = metrics or process_metrics()
        self._streams = streams
        self._poll_s = poll_s
        self._rng = rng or random.Random()
        self._grouped: set[str] = set()
        self._next_claim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage_logged = False

    # -- the thread -------------------------------------------------------------------------------

    def start(self) -> AlertNotifier:
        """Run :meth:`run_once` in a daemon thread until :meth:`close`."""
        self._thread = threading.Thread(target=self._run, name="imgq-notify", daemon=True)
        self._thread.start()
        log.info(
            "alert webhook on: pages go to %s",
            webhook_origin(self.config.url),
            extra={"event": "alert_webhook_started", "consumer": self.consumer},
        )
        return self

    def close(self) -> None:
        """Stop after the attempt in flight (bounded by ``timeout_s``); an alert not yet
        delivered stays pending in Redis for another notifier (or this one, restarted)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.timeout_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handled = self.run_once()
                self._outage_logged = False
            except redis.RedisError:
                if not self._outage_logged:
                    log.warning("alert webhook: Redis unavailable; will retry", exc_info=True)
                self._outage_logged = True
                handled = 0
            except Exception:  # a bug here must not stop every later page
                log.exception("alert webhook: a pass failed")
                handled = 0
            if not handled:
                self._stop.wait(self._poll_s)

    # -- one pass ---------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Every ``claim_idle_s / 4``: this notifier's own pending entries (left when Redis
        failed mid-alert) and those of dead notifiers; then new entries. Handles each (deliver,
        skip or dead-letter) and returns how many were handled."""
        streams = [s for s in self._streams() if self._has_group(s)]
        entries: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        claim = time.monotonic() >= self._next_claim
        if claim:
            self._next_claim = time.monotonic() + self.config.claim_idle_s / 4
        for stream in streams:
            if claim:
                entries += self._read(stream, "0") + self._claim_abandoned(stream)
            entries += self._read(stream, ">")
        for stream, entry_id, fields in entries:
            if self._stop.is_set():
                break
            try:
                self._handle(stream, entry_id, fields)
            except redis.ResponseError as exc:
                self._lost_group(stream, exc)  # FLUSHALL, or the stream expired mid-alert
            except redis.RedisError:
                raise  # Redis is down: the entry stays pending, read again when it is back
            except Exception as exc:  # one bad entry must not stop the pages after it
                log.exception("alert webhook: entry %s of %s failed", _text(entry_id), stream)
                raw = {"stream": stream, "entry_id": _text(entry_id)}
                self._dead_letter(stream, entry_id, raw, f"failed_{type(exc).__name__}", 0)
        return len(entries)

    def _read(self, stream: str, start: str) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """Entries never handed out (``">"``) or this notifier's pending ones (``"0"``)."""
        try:
            reply: Any = self.redis.xreadgroup(GROUP, self.consumer, {stream: start}, _BATCH)
        except redis.ResponseError as exc:
            self._lost_group(stream, exc)
            return []
        return [
            (stream, entry_id, fields)
            for _, messages in reply or []
            for entry_id, fields in messages
        ]

    def _has_group(self, stream: str) -> bool:
        """Create the group on ``stream`` the first time (existing streams only: a stream made
        here would have no TTL), starting :data:`CATCH_UP_S` back."""
        if stream in self._grouped:
            return True
        start_ms = max(0, int((time.time() - CATCH_UP_S) * 1000))
        try:
            self.redis.xgroup_create(stream, GROUP, id=f"{start_ms}-0")
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # not "already exists": the stream is missing
                return False
        self._grouped.add(stream)
        return True

    def _lost_group(self, stream: str, exc: redis.ResponseError) -> None:
        """The stream expired (its group with it), was deleted, or Redis lost its data: make
        the group again now if the stream is back, else at a later pass."""
        if "NOGROUP" not in str(exc):
            raise exc
        log.info("alert webhook: group of %s is gone; making it again", stream)
        self._grouped.discard(stream)
        self._has_group(stream)

    def _claim_abandoned(self, stream: str) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """Entries of dead notifiers, idle ``claim_idle_s``, now this one's; those handed over
        too often are dead-lettered. Consumers gone for an hour with nothing pending are
        removed, so that restarts do not pile up in the group."""
        idle_ms = int(self.config.claim_idle_s * 1000)
        try:
            reply = self.redis.xautoclaim(stream, GROUP, self.consumer, idle_ms, "0-0", _BATCH)
            consumers = self.redis.xinfo_consumers(stream, GROUP)
        except redis.ResponseError as exc:
            self._lost_group(stream, exc)
            return []
        for c in consumers:
            if not c.get("pending") and c.get("idle", 0) > _CONSUMER_IDLE_MS:
                self.redis.xgroup_delconsumer(stream, GROUP, c["name"])
        out = []
        for entry_id, fields in reply[1]:
            handovers = self._deliveries(stream, entry_id) - 1
            log.info(
                "alert webhook: took over entry %s of %s from a notifier that stopped",
                _text(entry_id),
                stream,
                extra={"event": "alert_webhook_claimed", "handovers": handovers},
            )
            if handovers > MAX_HANDOVERS:
                payload = {"stream": stream, "entry_id": _text(entry_id)}
                self._dead_letter(stream, entry_id, payload, f"handed_over_{handovers}_times", 0)
                continue
            out.append((stream, entry_id, fields))
        return out

    def _deliveries(self, stream: str, entry_id: bytes) -> int:
        """How often Redis handed this entry out (read or claimed)."""
        pending: Any = self.redis.xpending_range(stream, GROUP, entry_id, entry_id, 1)
        return int(pending[0]["times_delivered"]) if pending else 1

    def _still_mine(self, stream: str, entry_id: bytes) -> bool:
        """Whether this notifier still holds the entry; if so, reset its idle time, so that no
        other one takes it over during the next attempt."""
        pending: Any = self.redis.xpending_range(stream, GROUP, entry_id, entry_id, 1)
        if not pending or _text(pending[0]["consumer"]) != self.consumer:
            return False
        self.redis.xclaim(stream, GROUP, self.consumer, 0, [entry_id], justid=True)
        return True

    # -- one entry --------------------------------------------------------------------------------

    def _handle(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Deliver, skip (a notice, an unpaged clear) or dead-letter one entry, then ack it."""
        event = _parse_entry(fields)
        if event is None:
            raw = {"stream": stream, "entry_id": _text(entry_id)}
            self._dead_letter(stream, entry_id, raw, "unreadable_entry", 0)
            return
        payload = self._payload(stream, entry_id, event)
        if payload is None:
            self.redis.xack(stream, GROUP, entry_id)
            self.metrics.alert_webhook.labels(outcome="skipped").inc()
            return
        self._deliver(stream, entry_id, payload)

    def _payload(
        self, stream: str, entry_id: bytes, event: dict[str, Any]
    ) -> dict[str, Any] | None:
        """What the receiver gets for ``event``, or None when it is not sent."""
        short_sha = stream.removeprefix("imgq:drift:").removesuffix(":alerts")
        kind = event.get("type")
        if kind == "alert":
            if _tier(event) != "page":
                return None
            written_ms = _text(entry_id).partition("-")[0]
            alert_id = header_safe(str(event.get("id")))[:64]
            key, model, alert = f"{short_sha}:{alert_id}:{written_ms}", event.get("model"), event
            text = f"drift page on model {model}: " + "; ".join(
                f"{f.get('feature')} {f.get('summary')}"
                for f in event.get("features", [])
                if isinstance(f, dict)
            )
        elif kind == "clear" and self.config.clears:
            paged = self._paged_alerts(stream, event)
            if not paged:
                return None
            model = paged[0].get("model")
            key = f"{short_sha}:clear:{_text(entry_id)}"
            alert = event
            features = event.get("features")
            text = f"drift cleared on model {model}: " + ", ".join(
                map(str, features if isinstance(features, dict) else [])
            )
        else:
            return None
        return {
            "type": f"drift.{kind}",
            "idempotency_key": header_safe(key),
            "tier": "page",
            "model": model,
            "drift_id": short_sha,
            "stream_entry": _text(entry_id),
            "text": text,
            "event": alert,
        }

    def _paged_alerts(self, stream: str, clear: dict[str, Any]) -> list[dict[str, Any]]:
        """The alerts a clear ends that were pages (one not found any more counts as a page:
        better a clear too many than a page never closed)."""
        features = clear.get("features")
        ids = set(map(str, features.values())) if isinstance(features, dict) else set()
        found: dict[str, dict[str, Any]] = {}
        entries: Any = self.redis.xrevrange(stream, count=_CLEAR_LOOKBACK)
        for _, fields in entries or []:
            event = _parse_entry(fields)
            if event and event.get("type") == "alert" and str(event.get("id")) in ids:
                found[str(event.get("id"))] = event
        paged = [e for e in found.values() if _tier(e) == "page"]
        missing = ids - set(found)
        return paged + [{"id": i} for i in sorted(missing)]

    def _deliver(self, stream: str, entry_id: bytes, payload: dict[str, Any]) -> None:
        """POST until delivered, rejected or out of attempts; ack when done."""
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        config = self.config
        result = Attempt("retry", "not_attempted")
        attempt = 0
        for attempt in range(1, config.attempts + 1):
            if attempt > 1 and not self._still_mine(stream, entry_id):
                log.info("alert webhook: %s was taken over", payload["idempotency_key"])
                return
            headers = {
                SIGNATURE_HEADER: sign(config.secret, body, int(time.time())),
                IDEMPOTENCY_HEADER: payload["idempotency_key"],
                "User-Agent": "imgq-alert-webhook",
                "X-Imgq-Attempt": str(attempt),
            }
            result = post(config.url, body, headers, config.timeout_s)
            if result.outcome != "retry" or attempt == config.attempts:
                break
            wait_s = _backoff_s(
                attempt, config.backoff_s, config.backoff_max_s, self._rng, result.retry_after_s
            )
            self.metrics.alert_webhook.labels(outcome="retried").inc()
            log.warning(
                "alert webhook: attempt %d of %d for %s failed (%s); next in %.1f s",
                attempt,
                config.attempts,
                payload["idempotency_key"],
                result.reason,
                wait_s,
                extra={"event": "alert_webhook_retry", "reason": result.reason},
            )
            if self._stop.wait(wait_s):
                return  # shutting down: the entry stays pending for another notifier
        if result.outcome == "delivered":
            self.redis.xack(stream, GROUP, entry_id)
            self.metrics.alert_webhook.labels(outcome="delivered").inc()
            log.info(
                "alert webhook: delivered %s (%s)",
                payload["idempotency_key"],
                result.reason,
                extra={"event": "alert_webhook_delivered", "attempts": attempt},
            )
            return
        self._dead_letter(stream, entry_id, payload, result.reason, attempt, result)

    def _dead_letter(
        self,
        stream: str,
        entry_id: bytes,
        payload: dict[str, Any],
        reason: str,
        attempts: int,
        result: Attempt | None = None,
    ) -> None:
        """Keep what could not be sent where operators look, and stop trying (ack)."""
        record = {
            "time": _iso(time.time()),
            "stream": stream,
            "entry_id": _text(entry_id),
            "reason": reason,
            "status": result.status if result else None,
            "response": result.body[:200] if result else "",
            "attempts": attempts,
            "receiver": webhook_origin(self.config.url),
            "payload": payload,
        }
        pipe = self.redis.pipeline()
        pipe.lpush(DEAD_LETTERS, json.dumps(record))
        pipe.ltrim(DEAD_LETTERS, 0, DEAD_LETTERS_KEPT - 1)
        pipe.xack(stream, GROUP, entry_id)
        pipe.execute()
        self.metrics.alert_webhook.labels(outcome="dead_letter").inc()
        log.error(
            "alert webhook: gave up on %s after %d attempts (%s); kept in %s",
            payload.get("idempotency_key", record["entry_id"]),
            attempts,
            reason,
            DEAD_LETTERS,
            extra={
                "event": "alert_webhook_dead_letter",
                "reason": reason,
                "status": record["status"],
            },
        )


def _parse_entry(fields: Any) -> dict[str, Any] | None:
    """The event of a stream entry (``{"json": ...}``), or None when it is not one."""
    raw = fields.get(b"json") if isinstance(fields, dict) else None
    if not isinstance(raw, bytes) or len(raw) > ENTRY_MAX_BYTES:
        return None
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _tier(event: dict[str, Any]) -> str:
    """An alert's tier; one written before tiers existed (or with a tier this imgq does not
    know) is a page: a page too many is seen, a page lost is not.

    >>> _tier({}), _tier({"tier": "notice"}), _tier({"tier": "later"})
    ('page', 'notice', 'page')
    """
    return "notice" if event.get("tier") == "notice" else "page"


def notifier_for_model(
    client: redis.Redis, settings: WorkerSettings, short_sha: str, metrics: WorkerMetrics
) -> AlertNotifier | None:
    """A started notifier of one model's pages (a worker's), or None without a webhook."""
    config = WebhookConfig.from_settings(settings)
    if config is None:
        return None
    stream = DriftKeys(short_sha).alerts
    return AlertNotifier(client, config, lambda: [stream], metrics=metrics).start()
