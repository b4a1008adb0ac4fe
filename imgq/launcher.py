"""Start, watch and stop `imgq worker` processes: for the demo, the benchmarks and the tests.

One place knows how a worker child is started (``python -m imgq.cli worker``), how to tell it is
ready (it answers a Celery ping, which it does only once its model is loaded and checked), and
how it ends: SIGTERM is Celery's warm shutdown (the batches in hand are finished and acked),
SIGKILL is a crash. Needs only celery and redis installed, like the client.

Example::

    with WorkerFleet() as fleet:
        for i in range(2):
            fleet.add(WorkerProcess(f"w{i}@%h", log_dir / f"w{i}.log",
                                    options=["--model", str(bundle)], env=worker_env(url)))
        fleet.wait_ready(client.app, timeout_s=120)
        ...  # serve; leaving the block stops every worker warmly
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.utils.nodenames import default_nodename, host_format

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["WorkerFleet", "WorkerProcess", "WorkerStartError", "worker_env"]

#: How long :meth:`WorkerProcess.freeze` waits for every thread to stop.
FREEZE_TIMEOUT_S = 5.0
#: Seconds one ping waits for replies while waiting for workers to become ready.
_PING_S = 0.5


class WorkerStartError(RuntimeError):
    """A worker exited, or did not answer a ping in time, before it was ready; the message ends
    with the tail of its log."""


def worker_env(broker_url: str, *, keep_imgq: bool = False, **variables: str) -> dict[str, str]:
    """This process's environment for a worker child: without its ``IMGQ_*`` variables (a
    developer's shell must not change what a test or benchmark measures) unless ``keep_imgq``,
    with ``IMGQ_BROKER_URL`` and ``variables`` set.

    Example:
        >>> worker_env("redis://127.0.0.1:6379/0", IMGQ_METRICS_PORT="0")["IMGQ_METRICS_PORT"]
        '0'
    """
    env = {k: v for k, v in os.environ.items() if keep_imgq or not k.startswith("IMGQ_")}
    env["IMGQ_BROKER_URL"] = broker_url
    env.update(variables)
    return env


class WorkerProcess:
    """One worker child process, its output in a log file.

    Args:
        node: Celery node name (``--hostname``), e.g. ``w1@%h``; ``%h`` and the other Celery
            placeholders are expanded as the worker expands them, into :attr:`name`.
        log: File for the child's stdout and stderr.
        options: Arguments after ``imgq worker --hostname NODE`` (``--model DIR``, ...).
        command: The whole command line instead (a profiled worker, a plain Celery baseline);
            it must give the worker the node name ``node``.
        env: The child's whole environment (:func:`worker_env` builds one); this process's when
            None.
        new_session: Run it in its own session and process group, and signal the whole group
            (the demo: Ctrl-C in the terminal reaches the demo, which stops the workers warmly).
        append_log: Append to ``log`` instead of truncating it (a benchmark starting the same
            node name several times keeps every run's output).
        cwd: Working folder of the child; this process's when None.
    """

    def __init__(
        self,
        node: str,
        log: Path,
        *,
        options: Sequence[str] = (),
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        new_session: bool = False,
        append_log: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.name: str = host_format(default_nodename(node))
        self.log = log
        self.new_session = new_session
        if command is None:
            command = [sys.executable, "-m", "imgq.cli", "worker", "--hostname", node, *options]
        with open(log, "ab" if append_log else "wb") as out:
            #: The child; ``process.poll()`` is None while it runs.
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                list(command),
                env=None if env is None else dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=new_session,
            )

    def __repr__(self) -> str:
        return f"WorkerProcess({self.name!r}, pid={self.pid}, exit={self.process.poll()})"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def running(self) -> bool:
        """Whether the child has not exited (a frozen one is running)."""
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the log ("" while there is none)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def exit_error(self) -> WorkerStartError:
        """The error for a child that has exited, with its status and log tail."""
        return WorkerStartError(
            f"worker {self.name} exited with status {self.process.poll()}; the end of its log "
            f"{self.log}:\n{self.log_tail()}"
        )

    def wait_ready(self, app: Celery, timeout_s: float = 60.0) -> None:
        """Until the worker answers a Celery ping, which it does once its model is loaded and
        checked.

        Raises:
            WorkerStartError: At once when the child exits first (a bad setting, a refused
                bundle), or after ``timeout_s``; the child is left as it is.
        """
        deadline = time.monotonic() + timeout_s
        while not _ping(app, [self.name]):
            if not self.running():
                raise self.exit_error()
            if time.monotonic() > deadline:
                raise WorkerStartError(
                    f"worker {self.name} did not answer a ping within {timeout_s:.0f} s; the end "
                    f"of its log {self.log}:\n{self.log_tail()}"
                )

    def _signal(self, signum: int) -> None:
        """Send ``signum`` to the child, or to its process group when it has its own."""
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread has stopped: ``kill`` returns before the signal
        takes effect, and a thread still running on the other core could send one more command
        (an ack seen landing 10 ms after the freeze)."""
        os.kill(self.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self.pid}/task")
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while True:
            states = []
            for task in tasks.iterdir():
                try:
                    states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
                except (OSError, IndexError):
                    continue  # a thread that just ended
            if all(state in "tT" for state in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not stop: thread states {states}")
            time.sleep(0.0005)

    def thaw(self) -> None:
        """SIGCONT: a frozen worker runs on."""
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 30.0) -> int:
        """Warm shutdown (SIGTERM), SIGKILL after ``timeout_s``; the exit status (negative: the
        signal that ended it). A frozen worker is thawed, so that it sees the SIGTERM."""
        self._terminate()
        return self._reap(timeout_s)

    def _terminate(self) -> None:
        if self.running():
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)

    def _reap(self, timeout_s: float) -> int:
        """The exit status within ``timeout_s``, else :meth:`kill`'s."""
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL (a crash: nothing is finished or acked), and reap; the exit status."""
        if self.running():
            self._signal(signal.SIGKILL)
        return self.process.wait()


class WorkerFleet:
    """Several :class:`WorkerProcess`; as a context manager, stops them all (warmly) at exit.

    Args:
        workers: Already started workers to manage.
        stop_timeout_s: Each worker's grace before SIGKILL when the ``with`` block ends.
    """

    def __init__(self, workers: Iterable[WorkerProcess] = (), stop_timeout_s: float = 30.0):
        self.workers: list[WorkerProcess] = list(workers)
        self.stop_timeout_s = stop_timeout_s

    def add(self, worker: WorkerProcess) -> WorkerProcess:
        """Manage one more worker; returns it."""
        self.workers.append(worker)
        return worker

    def __iter__(self) -> Iterator[WorkerProcess]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.workers]

    def exited(self) -> list[WorkerProcess]:
        """The workers whose process has ended."""
        return [w for w in self.workers if not w.running()]

    def wait_ready(self, app: Celery, timeout_s: float = 60.0) -> None:
        """Until every worker has answered a ping (one ping to all that have not, per round).

        Raises:
            WorkerStartError: At once when a worker exits first, or after ``timeout_s``; the
                workers are left as they are (the ``with`` block, or the caller, stops them).
        """
        deadline = time.monotonic() + timeout_s
        answered: set[str] = set()
        while True:
            for w in self.workers:
                if not w.running():
                    raise w.exit_error()
            missing = [n for n in self.names if n not in answered]
            if not missing:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(
                    f"-- {w.name} ({w.log}):\n{w.log_tail(2000)}"
                    for w in self.workers
                    if w.name in missing
                )
                raise WorkerStartError(
                    f"workers {missing} did not answer a ping within {timeout_s:.0f} s; the ends "
                    f"of their logs:\n{tails}"
                )
            for reply in _ping(app, missing):
                answered.update(reply)

    def stop_all(self, timeout_s: float | None = None) -> list[int]:
        """Warm shutdown of every worker at once (SIGTERM to all, then wait), SIGKILL for any
        still running after ``timeout_s`` (default: ``stop_timeout_s``); their exit statuses."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        for w in self.workers:
            w._terminate()
        deadline = time.monotonic() + timeout_s
        return [w._reap(max(0.0, deadline - time.monotonic())) for w in self.workers]

    def kill_all(self) -> None:
        """SIGKILL and reap every worker."""
        for w in self.workers:
            w.kill()

    def __enter__(self) -> WorkerFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _ping(app: Celery, names: list[str]) -> list[dict[str, Any]]:
    """The replies of the workers ``names`` to a Celery ping. A broker connection that fails
    meanwhile (Redis closed one under a ping while workers started, twice in CI) is dropped
    and counts as no answer yet: the caller's deadline and exit checks still end its wait."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    try:
        return list(app.control.ping(destination=names, timeout=_PING_S) or [])
    except (OperationalError, RedisConnectionError, ConnectionError):
        app.pool.force_close_all()
        return []
