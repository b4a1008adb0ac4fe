"""A webhook receiver for the compose stack test (tests/test_compose_stack.py): Alertmanager's
receivers point here, and each POST's JSON body is printed on one line of standard output, which
the test reads back with `docker-compose logs`. Standard library only: it runs in the workers'
image."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

#: Most bytes of a body read: Alertmanager's notifications are a few kB.
MAX_BODY_BYTES = 1 << 20


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY_BYTES)
        body = self.rfile.read(length)
        try:
            line = json.dumps({"path": self.path, "body": json.loads(body)})
        except ValueError:
            line = json.dumps(
                {"path": self.path, "unreadable": body[:200].decode(errors="replace")}
            )
        print(line, flush=True)
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)  # the health check
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        """Requests are not logged: standard output carries the bodies only."""


if __name__ == "__main__":
    print("alert receiver listening on 8080", file=sys.stderr, flush=True)
    HTTPServer(("0.0.0.0", 8080), Receiver).serve_forever()
