"""`imgq drift serve`: the drift review page in the browser, per model version, from Redis alone.

Per model (every published version, ``worker/bundles.py``, and every model with drift state):
the window timeline with tiers and estimated accuracy (the verdict history the detector keeps),
the alerts with an Acknowledge button (the same as ``imgq drift alerts --ack ID``), per-feature
histograms of the training reference (from the model's manifest, fetched from its published
bundle) against the latest window, recent out-of-range inputs beside training images of the
class the model predicted (the bundle's ``samples/`` when it has them, else its golden set), and
recent novel inputs beside the training images nearest to them in the model's features (the
bundle's novelty gallery).
``/api/models`` and ``/api/model/<sha12>`` return the same as JSON.

The standard library's HTTP server, bound to 127.0.0.1 by default. Every request must name this
server as its ``Host`` (a page another site loads through DNS rebinding is refused); a POST must
carry the token of a page this server rendered and, when the browser sends them, an ``Origin``
of this server and ``Sec-Fetch-Site: same-origin``. Pages forbid scripts, frames and every
request but to this server (Content-Security-Policy).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import redis

from imgq.shared.errors import ImgqError
from imgq.shared.manifest import Manifest, load_manifest
from imgq.worker.drift.layout import DriftKeys, WindowLayout
from imgq.worker.drift.page_html import render_error, render_index, render_model
from imgq.worker.drift.page_view import (
    gallery_images,
    histograms,
    json_entry,
    novel_thumbnails,
    thumbnails,
    training_samples,
    verdict,
)
from imgq.worker.drift.review import (
    _UsageError,
    ack_alert,
    list_alerts,
    read_verdicts,
)
from imgq.worker.logs import mask_url
from imgq.worker.settings import WorkerSettings

__all__ = ["ReviewData", "make_server", "serve_main"]

log = logging.getLogger("imgq.drift.page")

_SHA12 = re.compile(r"[0-9a-f]{12}")
_MODEL_PATH = re.compile(r"/model/([0-9a-f]{12})")
_API_PATH = re.compile(r"/api/model/([0-9a-f]{12})")
_ACK_PATH = re.compile(r"/model/([0-9a-f]{12})/ack")
#: Windows shown per model; thumbnails shown; how long a quiet client keeps its thread.
_VERDICTS_SHOWN, _THUMBS_SHOWN, _CONNECTION_TIMEOUT_S = 200, 16, 30.0
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


class ModelRef(NamedTuple):
    """A model known by its drift state only (no manifest at hand)."""

    name: str
    drift_id: str


class ReviewData:
    """What the page shows, read from Redis (and the models' bundles) on each request.

    Args:
        client: The broker's Redis.
        settings: For the model cache and bundle size limit (published bundles are fetched
            as the other ``imgq drift`` commands fetch them).
        local: A bundle folder given with ``--model``: its manifest is used for its model.
    """

    def __init__(
        self, client: redis.Redis, settings: WorkerSettings, local: Path | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self._bundles: dict[str, tuple[Path, Manifest] | str] = {}
        if local is not None:
            manifest = load_manifest(local)
            self._bundles[manifest.drift_id] = (local, manifest)

    def models(self) -> list[dict[str, Any]]:
        """Every model with a published version or drift state, by name."""
        from imgq.worker.bundles import drift_ids, list_versions

        found: dict[str, dict[str, Any]] = {}
        for sha, bundle in self._bundles.items():
            if not isinstance(bundle, str):
                found[sha] = {"short_sha": sha, "name": bundle[1].name, "versions": []}
        versions = list_versions(self.client)
        ids = drift_ids(self.client, versions)
        for v in versions:
            if v.sha256 not in ids:
                continue
            entry = found.setdefault(ids[v.sha256], {"short_sha": ids[v.sha256], "name": v.name})
            entry.setdefault("versions", []).append(v.version)
        for key in self.client.scan_iter(match="imgq:drift:*:latest", count=1000):
            sha = key.decode(errors="replace")[len("imgq:drift:") : -len(":latest")]
            if _SHA12.fullmatch(sha) and sha not in found:
                found[sha] = {"short_sha": sha, "name": self._name_from_state(sha), "versions": []}
            if len(found) >= 1000:
                break
        pipe = self.client.pipeline(transaction=False)
        for sha in found:
            pipe.llen(DriftKeys(sha).verdicts)
            pipe.hlen(DriftKeys(sha).open_alerts)
        counts = pipe.execute()
        for i, entry in enumerate(found.values()):
            entry["windows"], entry["open_alerts"] = counts[2 * i], counts[2 * i + 1]
        return sorted(found.values(), key=lambda m: (m["name"], m["short_sha"]))

    def _name_from_state(self, sha: str) -> str:
        latest = json_entry(self.client.get(DriftKeys(sha).latest))
        name = latest.get("model") if isinstance(latest, dict) else None
        return name if isinstance(name, str) else f"model {sha}"

    def bundle(self, sha: str) -> tuple[Path, Manifest] | str:
        """The bundle folder and manifest of a model, or why there is none (cached)."""
        if sha not in self._bundles:
            from imgq.worker.bundles import drift_ids, fetch, list_versions

            every = list_versions(self.client)
            ids = drift_ids(self.client, every)
            versions = [v for v in every if ids.get(v.sha256) == sha]
            if not versions:
                return "no published version of this model: histograms need its reference"
            try:
                folder = fetch(
                    self.client,
                    versions[0],
                    self.settings.model_cache,
                    self.settings.bundle_max_bytes,
                )
                self._bundles[sha] = (folder, load_manifest(folder))
            except (ImgqError, OSError, ValueError) as exc:
                return f"cannot fetch published version {versions[0].version}: {exc}"
        return self._bundles[sha]

    def model(self, sha: str) -> Manifest | ModelRef:
        bundle = self.bundle(sha)
        return ModelRef(self._name_from_state(sha), sha) if isinstance(bundle, str) else bundle[1]

    def model_view(self, sha: str) -> dict[str, Any]:
        """Everything the model's page shows (``page_html.render_model``)."""
        from imgq.worker.bundles import drift_ids, list_versions

        bundle = self.bundle(sha)
        model = self.model(sha)
        keys = DriftKeys(sha)
        versions = list_versions(self.client)
        ids = drift_ids(self.client, versions)
        verdicts = [verdict(v) for v in read_verdicts(self.client, sha, _VERDICTS_SHOWN)]
        latest = json_entry(self.client.get(keys.latest))
        open_window = self.client.get(keys.open)
        view: dict[str, Any] = {
            "short_sha": sha,
            "name": model.name,
            "versions": [v.version for v in versions if ids.get(v.sha256) == sha],
            "error": bundle if isinstance(bundle, str) else None,
            "verdicts": verdicts,
            "alerts": list_alerts(self.client, model, include_all=True)[::-1],
            "open_window_images": "n/a",
            "histograms": [],
            "histogram_window": None,
            "out_of_range": thumbnails(self.client.lrange(keys.out_of_range, 0, _THUMBS_SHOWN)),
            "training_samples": {},
            "novel": [],
            "gallery": [],
        }
        if not isinstance(bundle, str):
            folder, manifest = bundle
            layout = WindowLayout(manifest.reference)
            raw_open = open_window if isinstance(open_window, bytes) else None
            view["open_window_images"] = layout.parse(0, raw_open).n_images
            if isinstance(latest, dict) and isinstance(latest.get("window"), dict):
                view["histograms"] = histograms(manifest, latest)
                view["histogram_window"] = latest["window"].get("id")
            view["training_samples"] = training_samples(folder, manifest)
            view["gallery"] = gallery_images(folder, manifest)
            raw_novel = self.client.lrange(keys.novel, 0, _THUMBS_SHOWN)
            view["novel"] = novel_thumbnails(raw_novel, len(view["gallery"]))
        return view


class _Handler(BaseHTTPRequestHandler):
    server: _ReviewServer
    server_version = "imgq-drift"
    sys_version = ""
    _responded = False

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.connection_timeout)  # a quiet client lets go

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        data = self.server.data
        if path == "/":
            models = data.models()
            self._send(HTTPStatus.OK, render_index(models, mask_url(data.settings.broker_url)))
        elif path == "/api/models":
            self._send_json(data.models())
        elif m := _API_PATH.fullmatch(path):
            self._send_json(data.model_view(m.group(1)))
        elif m := _MODEL_PATH.fullmatch(path):
            self._send(HTTPStatus.OK, render_model(data.model_view(m.group(1)), self.server.token))
        else:
            self._send(HTTPStatus.NOT_FOUND, render_error("Not found", path))

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        m = _ACK_PATH.fullmatch(self.path)
        if m is None:
            self._send(HTTPStatus.NOT_FOUND, render_error("Not found", self.path))
            return
        length_header = self.headers.get("Content-Length") or "0"
        length = int(length_header) if length_header.isdigit() else -1
        if not 0 < length <= 4096:
            self._send(HTTPStatus.BAD_REQUEST, render_error("Bad request", "form too large"))
            return
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        token, alert = form.get("token", [""])[0], form.get("alert", [""])[0]
        origin, site = self.headers.get("Origin"), self.headers.get("Sec-Fetch-Site")
        if (
            not hmac.compare_digest(token.encode(), self.server.token.encode())
            or (origin is not None and origin != f"http://{self.headers.get('Host')}")
            or (site is not None and site != "same-origin")
        ):
            self._send(
                HTTPStatus.FORBIDDEN,
                render_error("Refused", "acknowledge only from this server's own page"),
            )
            return
        sha = m.group(1)
        try:
            ack_alert(self.server.data.client, self.server.data.model(sha), alert)
        except _UsageError as exc:
            self._send(HTTPStatus.NOT_FOUND, render_error("No such alert", str(exc)))
            return
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", f"/model/{sha}#alerts")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _host_ok(self) -> bool:
        if self.headers.get("Host") in self.server.hosts:
            return True
        self._send(HTTPStatus.FORBIDDEN, render_error("Refused", "unknown Host header"))
        return False

    def _send_json(self, value: Any) -> None:
        self._send(HTTPStatus.OK, json.dumps(value), "application/json")

    def _send(self, status: HTTPStatus, body: str, content_type: str = "text/html") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def handle_one_request(self) -> None:
        """One request; any failure answers 503 (Redis) or 500 once, never an empty reply."""
        self._responded = False
        try:
            super().handle_one_request()
        except redis.RedisError as exc:
            log.warning("review page: Redis error: %s", exc)
            self._fail(HTTPStatus.SERVICE_UNAVAILABLE, "Redis unavailable", str(exc))
        except OSError as exc:  # the client went away or stayed quiet past the timeout
            log.info("review page: connection dropped: %s", exc)
            self.close_connection = True
        except Exception:
            log.exception("review page: cannot answer %s", self.path)
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, "Internal error", "see the server's log")

    def _fail(self, status: HTTPStatus, title: str, message: str) -> None:
        self.close_connection = True
        if self._responded:  # part of a reply went out already: only closing is left
            return
        try:
            self._send(status, render_error(title, message))
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        log.info(format, *args)


class _ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        data: ReviewData,
        allow_hosts: tuple[str, ...] = (),
        connection_timeout: float = _CONNECTION_TIMEOUT_S,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.data = data
        self.token = secrets.token_urlsafe(32)
        self.connection_timeout = connection_timeout
        self.hosts = _accepted_hosts(address[0], self.server_address[1], allow_hosts)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _accepted_hosts(bound: str, port: int, allow_hosts: tuple[str, ...]) -> set[str]:
    """The ``Host`` headers this server answers: loopback, the bound address when concrete
    (never the wildcard ``0.0.0.0`` or ``::``), and the names given with ``--allow-host``."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    ip = _ip(bound)
    if ip is None or not ip.is_unspecified:
        names.add(f"[{ip.compressed}]" if ip is not None and ip.version == 6 else bound.lower())
    hosts = {f"{name}:{port}" for name in names}
    for name in allow_hosts:
        hosts |= {name.lower(), f"{name.lower()}:{port}"}
    return hosts


def make_server(
    data: ReviewData,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_hosts: tuple[str, ...] = (),
    connection_timeout: float = _CONNECTION_TIMEOUT_S,
) -> _ReviewServer:
    """The review page's HTTP server, bound (``port`` 0: a free one); call ``serve_forever``.
    ``host`` may be an IPv6 address (``::``); ``allow_hosts``: more names it may be reached by."""
    return _ReviewServer((host, port), data, allow_hosts, connection_timeout)


def exposure_warning(host: str) -> str | None:
    """What to tell whoever binds the page beyond loopback: it has no login."""
    ip = _ip(host)
    if host.lower() == "localhost" or (ip is not None and ip.is_loopback):
        return None
    return (
        f"imgq drift serve: warning: bound to {host}, not loopback; the page has no login: "
        "anyone who reaches this port can read it and acknowledge alerts"
    )


def serve_main(args: argparse.Namespace) -> int:
    """`imgq drift serve [--host 127.0.0.1] [--port 8765] [--allow-host NAME] [--model DIR]`."""
    try:
        settings = WorkerSettings.from_env(model_dir=args.model)
        client = settings.broker_client()
        data = ReviewData(client, settings, settings.model_dir)
        server = make_server(data, args.host, args.port, tuple(args.allow_host or ()))
    except (ImgqError, ValueError, OSError) as exc:
        print(f"imgq drift serve: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    if (warning := exposure_warning(args.host)) is not None:
        print(warning, file=sys.stderr)
    host, port = str(server.server_address[0]), server.server_address[1]
    host = f"[{host}]" if ":" in host else host
    print(f"imgq drift serve: http://{host}:{port}/ (Redis {mask_url(settings.broker_url)})")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        client.close()
    return 0
