"""A TCP proxy that delays every byte by half a round trip in each direction: Redis "a network
away" on one machine (these kernels have no ``tc netem``).

    python bench/delayproxy.py --target 127.0.0.1:6379 --rtt-ms 2    # prints its port

Each direction of each connection is a FIFO of ``(due time, bytes)``: a chunk read at ``t`` is
written at ``t + rtt/2``, after every chunk read before it, so the stream keeps its order and a
request-reply pair takes at least ``rtt`` (more when the event loop is late: delays jitter
upward, never below). It runs in its own process so its CPU is not the benchmark's; its cost at
``--rtt-ms 0`` (against a direct connection) is what ``bench/network.py`` reports as the
proxy's own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

_CHUNK_BYTES = 1 << 18


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it was read."""
    loop = asyncio.get_running_loop()
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = asyncio.Event()
    done = False

    async def read() -> None:
        nonlocal done
        try:
            while data := await reader.read(_CHUNK_BYTES):
                queue.append((loop.time() + delay_s, data))
                ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            done = True
            ready.set()

    reading = asyncio.create_task(read())
    try:
        while True:
            if not queue:
                if done:
                    break
                ready.clear()
                await ready.wait()
                continue
            due, data = queue[0]
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            queue.popleft()
            writer.write(data)
            if writer.transport.get_write_buffer_size() > _CHUNK_BYTES:
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def serve(target: tuple[str, int], rtt_ms: float, port: int = 0) -> None:
    """Accept on 127.0.0.1:``port``, print the port, proxy to ``target`` until cancelled."""
    half_s = rtt_ms / 2000.0

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        for w in (client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                # Redis's small replies must not wait for more bytes.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(client_r, server_w, half_s), _pump(server_r, client_w, half_s))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await stop.wait()
    # Open connections end with the process: no teardown of their tasks to wait for.
    os._exit(0)


class DelayProxy:
    """``bench/delayproxy.py`` in a child process, as a context manager.

    >>> with DelayProxy(("127.0.0.1", 6379), rtt_ms=2) as proxy:  # doctest: +SKIP
    ...     url = f"redis://127.0.0.1:{proxy.port}/0"
    """

    def __init__(self, target: tuple[str, int], rtt_ms: float) -> None:
        self.target = target
        self.rtt_ms = rtt_ms
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> DelayProxy:
        host, port = self.target
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--target", f"{host}:{port}",
             "--rtt-ms", str(self.rtt_ms)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError(f"the delay proxy did not start (it printed {line!r})")
        self.port = int(line)
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __exit__(self, *_: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT of the Redis to reach")
    p.add_argument("--rtt-ms", type=float, required=True, help="round trip added, ms")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve((host, int(port)), args.rtt_ms, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
