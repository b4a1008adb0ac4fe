"""Run a private `redis-server` on a free 127.0.0.1 port, for the demo and the tests.

It listens on loopback only, keeps its data (append-only file) in its own folder so a restart
loses nothing, and is stopped by whoever started it — nothing is left running.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LocalRedis", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: A queue's append-only file is almost all churn: each image is pushed, moved in flight and
#: deleted. At Redis's default of 64 MB a loaded queue rewrites it every 2-5 s (29 times in one
#: throughput benchmark), each time forking and writing out the whole backlog on the cores that
#: serve; at 1 GB it is every few minutes. Disk use stays bounded (twice the last rewrite).
AOF_REWRITE_MIN_SIZE = "1gb"


class LocalRedis:
    """A `redis-server` child process on 127.0.0.1.

    Args:
        data_dir: Folder for the append-only file and the log; created if missing.
        port: TCP port; a free one when None.
        appendonly: Persist every write (fsync each second) so a restart loses no queued task.
        args: More ``redis-server`` options (``["--replicaof", "127.0.0.1", "6379"]``).

    Example:
        >>> r = LocalRedis("/tmp/imgq-redis").start()  # doctest: +SKIP
        >>> r.url  # doctest: +SKIP
        'redis://127.0.0.1:40123/0'
        >>> r.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        appendonly: bool = True,
        args: Sequence[str] = (),
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Redis URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server and return once it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: run `bash scripts/setup.sh` (installs Debian's "
                "redis-server) or `apt-get install redis-server`"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE,
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                code = self.process.returncode
                self.stop()  # closes its pipe
                log = self.data_dir / "redis.log"
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {code}: {err}{tail}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s} s")

    def ping(self) -> bool:
        """True when the server answers PING (raw RESP, so no client library is needed), or
        asks for its password first."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``); idempotent."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()  # else a ResourceWarning, an error under -W error

    def kill(self) -> None:
        """SIGKILL, as a host crash would: no save, no append-only flush beyond what the kernel
        already has; idempotent."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop and start again on the same port and data folder; ``down_s`` seconds in between."""
        self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
