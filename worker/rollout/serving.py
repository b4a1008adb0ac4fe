"""A worker that serves its queue's published versions and follows the queue's rollout.

A background thread reads the queue's stable version and rollout every ``poll_s``; a version
it does not hold is fetched, loaded and checked (sha256, signature, golden set on this worker's
provider) beside the serving one, and only then put in a new :class:`Plan`. Each batch reads
the plan once, so a switch happens between two batches: no task is refused, lost, or answered
by a half-loaded model. A candidate that fails its checks here is never served, and the
rollout is aborted with the reason.

During a rollout each task goes to the candidate or the stable version by its id
(``state.in_share``); of the stable version's tasks, the shadow share is also run by the
candidate, whose answers are compared, never returned. Counts per version go to the rollout's
stats hash for ``imgq rollout status``; a candidate whose model failures pass the rollout's
threshold is aborted by whichever worker sees it first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from imgq.shared.errors import BundleError, ImgqError
from imgq.worker.broker.settle import WindowCounts
from imgq.worker.bundles import fetch, list_versions
from imgq.worker.celeryapp.status import publish_model
from imgq.worker.drift.layout import _ADD_WINDOW_FUNCTION_LUA
from imgq.worker.drift.recorder import DriftRecorder
from imgq.worker.handler import DEFERRED, HandlerContext, Outcome, Request, Success
from imgq.worker.handlers.classify import ClassifyHandler, build
from imgq.worker.rollout.state import (
    RUNNING,
    Rollout,
    RolloutError,
    abort,
    in_share,
    read_rollout,
    rollout_key,
    stable_version,
)
from imgq.worker.rollout.tally import Tally
from imgq.worker.wire import TASK_NAME

__all__ = ["Plan", "VersionedHandler", "create"]

logger = logging.getLogger("imgq.rollout")

#: Seconds between two reads of the queue's rollout state.
POLL_S = 1.0


@dataclasses.dataclass
class Plan:
    """What the batches serve now; replaced whole, never changed (but for its use count)."""

    stable: ClassifyHandler
    candidate: ClassifyHandler | None = None
    rollout: Rollout | None = None
    _in_use: int = 0
    _idle: threading.Condition = dataclasses.field(default_factory=threading.Condition)

    def enter(self) -> Plan:
        with self._idle:
            self._in_use += 1
        return self

    def leave(self) -> None:
        with self._idle:
            self._in_use -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Until no batch uses this plan (True), or ``timeout_s`` passed (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_use == 0, timeout_s)

    def handlers(self) -> list[ClassifyHandler]:
        return [self.stable] + ([self.candidate] if self.candidate is not None else [])


@dataclasses.dataclass(frozen=True)
class Observed:
    """A success's observations, each for the drift recorder of the version that made it
    (the stable version's and, when shadowed, the candidate's)."""

    items: tuple[tuple[DriftRecorder, Any], ...]


class VersionedHandler:
    """Serves ``imgq.classify`` with the queue's published versions (see the module docstring).

    Args:
        context: The worker's handler context.
        build: Loads and checks the bundle in a folder (``handlers.classify.build``).
        poll_s: Seconds between reads of the rollout state.

    Raises:
        PublishError: the queue has no stable version, or it cannot be fetched.
        BundleError, ManifestError: the stable version fails its checks.
    """

    task_name = TASK_NAME
    lua_add_window = _ADD_WINDOW_FUNCTION_LUA

    def __init__(
        self,
        context: HandlerContext,
        build: Callable[[Path], ClassifyHandler],
        poll_s: float = POLL_S,
    ) -> None:
        self.context = context
        self.settings = context.settings
        self.redis = context.redis
        self.queue = context.settings.queue_list
        self._build = build
        self._poll_s = poll_s
        self.observers = [self]
        self.tally = Tally(context.redis, self.queue, context.metrics)
        self._loaded: dict[str, ClassifyHandler] = {}
        self._refused: set[str] = set()  # rollout ids whose candidate failed here
        self._retry_at: dict[str, float] = {}
        self._stop = threading.Event()
        stable_sha, rollout = self._read()
        if stable_sha is None:
            from imgq.worker.bundles import resolve

            resolve(self.redis, None, self.queue)  # raises, saying how to publish one
            raise BundleError(
                f"queue {self.queue!r}'s stable version is not a full sha256: publish it again "
                "with `imgq models publish DIR --stable`"
            )
        self._plan = Plan(self._load(stable_sha))
        self._follow(stable_sha, rollout)
        plan = self._plan
        publish_model(context.app, plan.stable.bundle,
                      plan.candidate.bundle if plan.candidate else None, follows=True)  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="imgq-rollout", daemon=True)
        self._thread.start()

    @property
    def provider(self) -> str:
        """The execution provider (the engine waits for fuller batches only on CUDA)."""
        return self._plan.stable.provider

    @property
    def plan(self) -> Plan:
        return self._plan

    # -- serving ------------------------------------------------------------------------------

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        """One outcome per request, by the version its task id is routed to."""
        plan = self._plan.enter()
        try:
            return self._serve(plan, requests, tick)
        finally:
            plan.leave()

    def _serve(
        self, plan: Plan, requests: Sequence[Request], tick: Callable[[], None]
    ) -> list[Outcome]:
        rollout, candidate, stable = plan.rollout, plan.candidate, plan.stable
        if rollout is None or candidate is None:
            alone, ms = self._run_version(stable, list(requests), tick)
            self.tally.count(rollout, stable.bundle.version, alone, ms)
            return alone
        n_labels = len(candidate.bundle.manifest.labels)
        to_candidate = [
            in_share(rollout.id, r.task_id, rollout.canary) and _fits(r.kwargs, n_labels)
            for r in requests
        ]
        stable_items = [i for i, c in enumerate(to_candidate) if not c]
        canary_items = [i for i, c in enumerate(to_candidate) if c]
        outcomes: list[Outcome] = [DEFERRED] * len(requests)
        answered, ms_stable = self._run_version(stable, [requests[i] for i in stable_items], tick)
        for i, o in zip(stable_items, answered, strict=True):
            outcomes[i] = o
        shadowed = [
            i
            for i in stable_items
            if isinstance(outcomes[i], Success)
            and in_share(rollout.id, requests[i].task_id, rollout.shadow, "shadow")
        ]
        extra = [
            Request(requests[i].task_id, {"image": requests[i].kwargs["image"],
                                          "top_k": n_labels}, requests[i].queue_ms)
            for i in shadowed
        ]  # fmt: skip
        served, ms_candidate = self._run_version(
            candidate, [requests[i] for i in canary_items] + extra, tick
        )
        for i, o in zip(canary_items, served[: len(canary_items)], strict=True):
            outcomes[i] = o
        outcomes = _deferred_suffix(outcomes)  # before counting: a deferred task runs again
        self.tally.count(rollout, stable.bundle.version,
                         [outcomes[i] for i in stable_items], ms_stable)  # fmt: skip
        share = ms_candidate / max(1, len(served))
        canary = [outcomes[i] for i in canary_items]
        self.tally.count(rollout, candidate.bundle.version, canary, share * len(canary))
        if extra:
            shadows = zip(shadowed, served[len(canary_items) :], strict=True)
            runs = [(i, shadow) for i, shadow in shadows if outcomes[i] is not DEFERRED]
            pairs = []
            for i, shadow in runs:
                mine = outcomes[i]
                if isinstance(mine, Success) and isinstance(shadow, Success):
                    pairs.append((mine.result, shadow.result))
            self.tally.shadow(rollout, candidate.bundle.version, pairs,
                              [shadow for _, shadow in runs], share * len(runs))  # fmt: skip
            for i, shadow in runs:
                outcomes[i] = _with_shadow(outcomes[i], shadow)
        return outcomes

    def _run_version(
        self, handler: ClassifyHandler, requests: list[Request], tick: Callable[[], None]
    ) -> tuple[list[Outcome], float]:
        """``handler``'s outcomes, tagged for its drift recorder, and the milliseconds taken."""
        if not requests:
            return [], 0.0
        t0 = time.perf_counter()
        outcomes = handler.handle(requests, tick)
        ms = (time.perf_counter() - t0) * 1000
        recorder = handler.drift
        tagged: list[Outcome] = [
            Success(o.result, Observed(((recorder, o.observation),)))
            if isinstance(o, Success) and recorder is not None and o.observation is not None
            else o
            for o in outcomes
        ]
        return tagged, ms

    # -- the Observer protocol: each version's observations to its own drift window ------------

    def _groups(self, observations: Sequence[Any]) -> list[tuple[DriftRecorder, list[Any]]]:
        groups: dict[int, tuple[DriftRecorder, list[Any]]] = {}
        for observed in observations:
            if isinstance(observed, Observed):
                for recorder, obs in observed.items:
                    groups.setdefault(id(recorder), (recorder, []))[1].append(obs)
        return list(groups.values())

    def window_counts(self, observations: Sequence[Any]) -> list[WindowCounts]:
        out: list[WindowCounts] = []
        for recorder, group in self._groups(observations):
            out += recorder.window_counts(group)
        return out

    def after_settle(self, counted: Mapping[str, int]) -> None:
        for handler in self._plan.handlers():
            if handler.drift is not None:
                handler.drift.after_settle(counted)

    def extras(self, pipe: Any, observations: Sequence[Any]) -> None:
        for recorder, group in self._groups(observations):
            recorder.extras(pipe, group)

    # -- following the rollout ----------------------------------------------------------------

    def _read(self) -> tuple[str | None, Rollout | None]:
        return stable_version(self.redis, self.queue), read_rollout(self.redis, self.queue)

    def _run(self) -> None:
        logged_s = 0.0
        while not self._stop.wait(self._poll_s):
            rollout = None
            for step in ("follow", "count", "judge"):
                try:
                    if step == "follow":
                        stable_sha, rollout = self._read()
                        self._follow(stable_sha, rollout)
                    elif step == "count":
                        self.tally.flush()
                    else:
                        self._judge(rollout)
                except redis.RedisError as exc:
                    if time.monotonic() - logged_s > 30:
                        logged_s = time.monotonic()
                        logger.warning("rollout: Redis (%s): %s", step, exc)
                except Exception:  # a bug here must not stop the worker from following
                    logger.exception("rollout: %s failed", step)

    def _follow(self, stable_sha: str | None, rollout: Rollout | None) -> None:
        """Load what the state asks for and not held, then switch to it (between batches)."""
        plan = self._plan
        stable = plan.stable
        if stable_sha is not None and stable_sha[:12] != stable.bundle.version:
            stable = self._load_stable(stable_sha) or stable
        candidate = None
        running = rollout if rollout is not None and rollout.state == RUNNING else None
        if running is not None and running.id not in self._refused:
            if running.candidate[:12] == stable.bundle.version:
                running = None
            elif running.candidate not in self._loaded:  # a load takes seconds: still running?
                candidate = self._load_candidate(running)
                if candidate is not None and read_rollout(self.redis, self.queue) != running:
                    return  # ended or replaced meanwhile: the next read decides
            else:
                candidate = self._loaded[running.candidate]
        if candidate is None:
            running = None
        if (stable, candidate, running) != (plan.stable, plan.candidate, plan.rollout):
            self._switch(Plan(stable, candidate, running))
        for handler in [h for h in self._loaded.values() if h not in self._plan.handlers()]:
            self._retire(handler)  # no batch holds it: _switch waited for the old plan

    def _switch(self, new: Plan) -> None:
        old, self._plan = self._plan, new
        publish_model(self.context.app, new.stable.bundle,
                      new.candidate.bundle if new.candidate else None, follows=True)  # fmt: skip
        logger.info(
            "serving version %s%s", new.stable.bundle.version,
            f" and candidate {new.candidate.bundle.version} (canary {new.rollout.canary:g}%, "
            f"shadow {new.rollout.shadow:g}%)" if new.candidate and new.rollout else "",
            extra={"event": "rollout_switch"},
        )  # fmt: skip
        if any(h not in new.handlers() for h in old.handlers()):
            old.wait_idle(60.0)  # the batches that read the old plan finish before it retires

    def _load(self, sha256: str) -> ClassifyHandler:
        """The version's handler: held already, or fetched, loaded and checked now."""
        if sha256 in self._loaded:
            return self._loaded[sha256]
        versions = {v.sha256: v for v in list_versions(self.redis)}
        if sha256 not in versions:
            raise BundleError(f"version {sha256[:12]} is not published (see `imgq models list`)")
        folder = fetch(self.redis, versions[sha256], self.settings.model_cache,
                       self.settings.bundle_max_bytes)  # fmt: skip
        handler = self._build(folder)
        self._loaded[sha256] = handler
        return handler

    def _load_stable(self, sha256: str) -> ClassifyHandler | None:
        """A new stable version (promoted, or published ``--stable``); on failure the worker
        keeps serving the one it has, and tries again a minute later."""
        if sha256 not in self._loaded and time.monotonic() < self._retry_at.get(sha256, 0.0):
            return None
        try:
            return self._load(sha256)
        except (ImgqError, OSError, ValueError) as exc:
            self._retry_at[sha256] = time.monotonic() + 60
            logger.error("rollout: cannot load the new stable version %s; still serving %s: %s",
                         sha256[:12], self._plan.stable.bundle.version, exc)  # fmt: skip
            return None

    def _load_candidate(self, rollout: Rollout) -> ClassifyHandler | None:
        """The rollout's candidate, or None after aborting the rollout when it fails here."""
        try:
            return self._load(rollout.candidate)
        except (ImgqError, OSError, ValueError) as exc:
            self._refused.add(rollout.id)
            reason = (f"candidate {rollout.candidate[:12]} failed its checks on worker "
                      f"{socket.gethostname()}:{os.getpid()}: {exc}")  # fmt: skip
            logger.error("rollout: %s; aborting rollout %s", reason, rollout.id,
                         extra={"event": "rollout_abort", "reason": reason})  # fmt: skip
            try:
                abort(self.redis, self.queue, reason, rollout.id)
            except RolloutError:
                pass  # another worker ended it first
            return None

    def _judge(self, rollout: Rollout | None) -> None:
        """Abort the running rollout when its candidate's model failures pass its threshold."""
        if rollout is None or rollout.state != RUNNING:
            return
        reason = self.tally.failing(rollout)
        if reason is None:
            return
        logger.error("rollout: %s; aborting rollout %s", reason, rollout.id,
                     extra={"event": "rollout_abort", "reason": reason})  # fmt: skip
        try:
            abort(self.redis, self.queue, reason, rollout.id)
        except RolloutError:
            pass

    def _retire(self, handler: ClassifyHandler) -> None:
        self._loaded = {k: h for k, h in self._loaded.items() if h is not handler}
        bundle = handler.bundle
        try:
            self.context.metrics.model_info.remove(
                bundle.manifest.name, bundle.manifest.model_sha256, bundle.version, bundle.provider
            )
        except KeyError:
            pass
        # Closing joins its drift thread, which may be judging a window: not on this thread,
        # which must go on following the rollout.
        threading.Thread(target=handler.close, name="imgq-retire", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.tally.flush()
        except redis.RedisError:
            pass
        for handler in list(self._loaded.values()):
            handler.close()
        self._loaded.clear()

    def __repr__(self) -> str:
        return f"VersionedHandler(queue={self.queue!r}, key={rollout_key(self.queue)!r})"


def _with_shadow(outcome: Outcome, shadow: Outcome) -> Outcome:
    """The stable version's success, carrying the candidate's observation of the same image
    for the candidate's drift window."""
    if not (isinstance(outcome, Success) and isinstance(shadow, Success)):
        return outcome
    if not isinstance(shadow.observation, Observed):
        return outcome
    mine = outcome.observation.items if isinstance(outcome.observation, Observed) else ()
    return Success(outcome.result, Observed(mine + shadow.observation.items))


def _fits(kwargs: Mapping[str, Any], n_labels: int) -> bool:
    """Whether the candidate can answer the task as asked (a ``top_k`` past its labels is
    valid for the stable version alone: such a task stays with the stable version)."""
    top_k = kwargs.get("top_k", 1)
    return not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > n_labels)


def _deferred_suffix(outcomes: list[Outcome]) -> list[Outcome]:
    """The engine gives back only the newest requests of a batch: once one is deferred (one
    version's pixel budget), every later one is deferred too and served in the next batch."""
    first = next((i for i, o in enumerate(outcomes) if o is DEFERRED), None)
    if first is None:
        return outcomes
    return outcomes[:first] + [DEFERRED] * (len(outcomes) - first)


def create(context: HandlerContext) -> ClassifyHandler | VersionedHandler:
    """The worker's classification handler (``HANDLERS["classify"]``): the bundle folder it is
    given, or, without one, the queue's published versions, following its rollout.

    Raises:
        BundleError, ManifestError: the bundle fails its checks.
        PublishError: no version is published for the queue.
    """
    if context.settings.model_dir is None:
        return VersionedHandler(context, lambda folder: build(context, folder))
    handler = build(context, context.settings.model_dir)
    publish_model(context.app, handler.bundle)
    return handler
