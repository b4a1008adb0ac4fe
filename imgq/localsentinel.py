"""A private Redis Sentinel group on 127.0.0.1: one master, its replicas and the sentinels that
watch them, each a real process, for the failover tests.

Sentinel's own timings are small here (a master silent for ``down_after_ms`` is down; a failover
not done within ``failover_timeout_ms`` is tried again by another sentinel), so a test sees a
failover complete within seconds; docs/operations.md gives the production values.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from imgq.localredis import LocalRedis, free_port

__all__ = ["LocalSentinels"]


class LocalSentinels:
    """``replicas + 1`` ``redis-server`` processes (the first starts as master) and ``sentinels``
    ``redis-server --sentinel`` processes with a quorum of a majority.

    Args:
        data_dir: Folder for every process's data, configuration and log.
        master_name: The name the sentinels monitor the master under (``master_name``).
        replicas: Replicas of the master.
        sentinels: Sentinel processes.
        down_after_ms: Sentinel's ``down-after-milliseconds``.
        failover_timeout_ms: Sentinel's ``failover-timeout``.
        password: The servers' ``requirepass`` (and ``masterauth``); None: none.

    Example:
        >>> group = LocalSentinels("/tmp/imgq-sentinel").start()  # doctest: +SKIP
        >>> group.url  # doctest: +SKIP
        'sentinel://127.0.0.1:40101;sentinel://127.0.0.1:40102;sentinel://127.0.0.1:40103'
        >>> group.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        master_name: str = "imgq",
        replicas: int = 2,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        ports = [free_port() for _ in range(replicas + 1)]
        # A replica's full sync starts at once (Redis waits 5 s for more replicas by default).
        common = ["--repl-diskless-sync-delay", "0"]
        common += ["--requirepass", password, "--masterauth", password] if password else []
        self.servers = [
            LocalRedis(
                self.data_dir / f"redis-{port}",
                port,
                args=[*common, *(["--replicaof", "127.0.0.1", str(ports[0])] if i else [])],
            )
            for i, port in enumerate(ports)
        ]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        # Each sentinel is told the others and the replicas, instead of finding them by their
        # hello messages (one every 2 s), so that the group is ready at once.
        self._ids = {port: secrets.token_hex(20) for port in self.sentinel_ports}
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The group as kombu spells it: ``sentinel://host:port`` per sentinel, ``;`` between."""
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def transport_options(self) -> dict[str, str]:
        """Celery's transport options that name the master."""
        return {"master_name": self.master_name}

    def start(self, timeout_s: float = 30.0) -> LocalSentinels:
        """Start every process; return once the replicas are in sync and every sentinel knows
        the replicas and the other sentinels (so that a failover can happen at once)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `bash scripts/setup.sh`")
        try:
            for server in self.servers:
                server.start(timeout_s)
            deadline = time.monotonic() + timeout_s
            self._wait(deadline, self._replicas_synced, "the replicas to sync")
            for port in self.sentinel_ports:
                self._sentinels.append(self._start_sentinel(binary, port))
            self._wait(deadline, self._sentinels_agree, "the sentinels to see each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self, binary: str, port: int) -> subprocess.Popen[bytes]:
        folder = self.data_dir / f"sentinel-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        name, quorum = self.master_name, len(self.sentinel_ports) // 2 + 1
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {folder}",
            f"logfile {folder / 'sentinel.log'}",
            "daemonize no",
            f"sentinel monitor {name} 127.0.0.1 {self.servers[0].port} {quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} {len(self.servers)}",
        ]
        lines += [f"sentinel myid {self._ids[port]}"]
        lines += [
            f"sentinel known-sentinel {name} 127.0.0.1 {other} {self._ids[other]}"
            for other in self.sentinel_ports
            if other != port
        ]
        lines += [f"sentinel known-replica {name} 127.0.0.1 {s.port}" for s in self.servers[1:]]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        config = folder / "sentinel.conf"
        config.write_text("\n".join(lines) + "\n")  # Sentinel rewrites it: its own state
        return subprocess.Popen(
            [binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def _wait(self, deadline: float, ready: Callable[[], bool], what: str) -> None:
        while not ready():
            for proc in self._sentinels:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"redis-sentinel exited with {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what} ({self.data_dir})")
            time.sleep(0.05)

    def _replicas_synced(self) -> bool:
        for server in self.servers[1:]:
            try:
                with self.client(server.port) as c:
                    info = c.info("replication")
            except redis.RedisError:
                return False
            if info.get("master_link_status") != "up":
                return False
        return True

    def _sentinels_agree(self) -> bool:
        others = len(self.sentinel_ports) - 1
        for port in self.sentinel_ports:
            try:
                with self.sentinel(port) as s:
                    state: Any = s.sentinel_master(self.master_name)
            except redis.RedisError:
                return False
            if state["num-slaves"] < len(self.servers) - 1 or state["num-other-sentinels"] < others:
                return False
        return True

    def client(self, port: int) -> redis.Redis:
        """A plain client of the server on ``port`` (master or replica)."""
        return redis.Redis(port=port, password=self.password, socket_timeout=5)

    def sentinel(self, port: int) -> redis.Redis:
        """A client of the sentinel on ``port``."""
        return redis.Redis(port=port, socket_timeout=5, decode_responses=True)

    def _masters(self) -> list[int]:
        """The ports of the running servers that say they are master (``ROLE``)."""
        ports = []
        for server in self.servers:
            if server.process is None:
                continue
            try:
                with self.client(server.port) as c:
                    role = c.execute_command("ROLE")
            except redis.RedisError:
                continue
            if role[0] == b"master":
                ports.append(server.port)
        return ports

    def master_port(self) -> int | None:
        """The port of the server that says it is master, or None while none does."""
        return next(iter(self._masters()), None)

    def promoted(self, old_port: int) -> int | None:
        """The port of a server other than ``old_port`` that says it is master, or None."""
        return next((port for port in self._masters() if port != old_port), None)

    def server(self, port: int) -> LocalRedis:
        """The server process on ``port``."""
        return next(s for s in self.servers if s.port == port)

    def kill_master(self) -> int:
        """SIGKILL the master, as a host crash would; its port."""
        port = self.master_port()
        if port is None:
            raise RuntimeError("no master to kill")
        self.server(port).kill()
        return port

    def failover(self) -> int:
        """``SENTINEL FAILOVER``: the sentinels promote a replica and demote the master, which
        keeps running; the old master's port."""
        port = self.master_port()
        if port is None:
            raise RuntimeError("no master to fail over")
        with self.sentinel(self.sentinel_ports[0]) as s:
            s.execute_command("SENTINEL", "FAILOVER", self.master_name)
        return port

    def sentinels_report(self) -> set[int]:
        """The master ports the answering sentinels report (one when they agree)."""
        ports = set()
        for port in self.sentinel_ports:
            try:
                with self.sentinel(port) as s:
                    addr: Any = s.sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            if addr:
                ports.add(int(addr[1]))
        return ports

    def stop(self) -> None:
        """Stop every process; idempotent."""
        procs, self._sentinels = self._sentinels, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> LocalSentinels:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
