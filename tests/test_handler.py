"""The handler seam: the engine serves any handler that keeps the batch contract, refuses one
that breaks it (the batch fails visibly, the engine serves on), and routes each task name to its
handler; the null handler serves through a real worker with no model at all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry

from imgq.shared.errors import InvalidTask
from imgq.worker.broker.intake import Intake
from imgq.worker.engine import BatchEngine
from imgq.worker.handler import (
    DEFERRED,
    Failure,
    Outcome,
    Request,
    Success,
    check_outcomes,
)
from imgq.worker.handlers import HANDLERS
from imgq.worker.handlers.null import NULL_TASK_NAME, NullHandler
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from tests.workerproc import wait_all


class Echo:
    """A handler of the test's own: answers each request with its kwargs, fails on "fail",
    defers from the first "later" on (once per task), and can be made to break the contract."""

    task_name = "test.echo"
    observers: Sequence[Any] = ()

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.short_by = 0
        self.deferred: set[str] = set()

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        self.batches.append([r.task_id for r in requests])
        out: list[Outcome] = []
        for r in requests:
            tick()
            if (
                out
                and out[-1] is DEFERRED
                or r.kwargs.get("later")
                and r.task_id not in self.deferred
            ):
                self.deferred.add(r.task_id)
                out.append(DEFERRED)
            elif r.kwargs.get("fail"):
                out.append(Failure(InvalidTask("bad_argument", "asked to fail")))
            else:
                out.append(Success({"echo": dict(r.kwargs)}))
        return out[: len(out) - self.short_by]

    def close(self) -> None:
        pass


@pytest.fixture
def app(redis_server) -> Celery:
    return Celery("client", broker=redis_server.url, backend=redis_server.url)


def _engine(redis_server, app: Celery, *handlers: Any) -> BatchEngine:
    settings = WorkerSettings(broker_url=redis_server.url, queue="q")
    r = redis.Redis.from_url(redis_server.url)
    intake = Intake(r, "q", "w-test", lease_ttl_s=30)
    intake.renew_lease()
    metrics = WorkerMetrics(CollectorRegistry())
    return BatchEngine(settings, {h.task_name: h for h in handlers}, r, intake.lanes[0],
                       app.backend, metrics)  # fmt: skip


def test_a_handler_of_ones_own_is_served(redis_server, app) -> None:
    """Results, failures and deferrals of a new task kind, end to end through the engine; the
    deferred requests go back to the queue head and are served by the next batch."""
    echo = Echo()
    engine = _engine(redis_server, app, echo)
    sent = [
        app.send_task("test.echo", kwargs={"n": 1}, queue="q"),
        app.send_task("test.echo", kwargs={"fail": True}, queue="q"),
        app.send_task("test.echo", kwargs={"later": True}, queue="q"),
        app.send_task("test.echo", kwargs={"n": 4}, queue="q"),
    ]
    assert engine.run_once() == 4
    assert engine.run_once() == 2  # the deferred two, now first in line
    assert echo.batches == [[s.id for s in sent], [s.id for s in sent[2:]]]
    assert sent[0].get(timeout=5) == {"echo": {"n": 1}}
    with pytest.raises(InvalidTask, match="^bad_argument: asked to fail"):
        sent[1].get(timeout=5)
    assert sent[2].get(timeout=5) == {"echo": {"later": True}}
    assert sent[3].get(timeout=5) == {"echo": {"n": 4}}
    assert redis.Redis.from_url(redis_server.url).llen("q") == 0


def test_a_handler_that_breaks_the_contract_fails_its_batch(redis_server, app) -> None:
    """A handler that returns fewer outcomes than requests: every task of the batch fails with
    internal_error (kept in the dead letters), and the engine serves the next batch."""
    echo = Echo()
    echo.short_by = 1
    engine = _engine(redis_server, app, echo)
    sent = [app.send_task("test.echo", kwargs={"n": i}, queue="q") for i in range(2)]
    assert engine.run_once() == 2
    for s in sent:
        with pytest.raises(InvalidTask, match="got 2 requests but returned 1 outcomes"):
            s.get(timeout=5)
    echo.short_by = 0
    after = app.send_task("test.echo", kwargs={"n": 9}, queue="q")
    assert engine.run_once() == 1 and after.get(timeout=5) == {"echo": {"n": 9}}


def test_each_task_name_goes_to_its_handler(redis_server, app) -> None:
    """Two handlers on one queue each get their own tasks; a name no handler serves fails at
    once with the names that are served."""
    echo = Echo()
    engine = _engine(redis_server, app, echo, NullHandler())
    a = app.send_task("test.echo", kwargs={"n": 1}, queue="q")
    b = app.send_task(NULL_TASK_NAME, kwargs={"image": "x"}, queue="q")
    c = app.send_task("someone.else", kwargs={}, queue="q")
    assert engine.run_once() == 3
    assert a.get(timeout=5) == {"echo": {"n": 1}}
    assert b.get(timeout=5) == {"ok": True}
    with pytest.raises(InvalidTask, match="serves imgq.null, test.echo, not 'someone.else'"):
        c.get(timeout=5)
    assert echo.batches == [[a.id]]


def test_the_contract_checker_names_both_numbers_and_the_suffix_rule() -> None:
    """check_outcomes: one outcome per request, Outcome types only, DEFERRED only as a suffix."""
    reqs = [Request("a", {}), Request("b", {})]
    check_outcomes(reqs, [Success({}), DEFERRED])
    with pytest.raises(ValueError, match="got 2 requests but returned 3 outcomes"):
        check_outcomes(reqs, [Success({})] * 3)
    with pytest.raises(TypeError, match="outcome 1 is a dict"):
        check_outcomes(reqs, [Success({}), {"label": "cat"}])
    with pytest.raises(ValueError, match="only a suffix can be deferred"):
        check_outcomes(reqs, [DEFERRED, Success({})])


@pytest.mark.integration
def test_the_null_handler_serves_through_a_real_worker_without_a_model(
    redis_server, app, workers
) -> None:
    """`imgq worker --handlers null`: no bundle, tasks answered by the engine alone."""
    assert "null" in HANDLERS
    worker = workers.start("null", IMGQ_HANDLERS="null")
    worker.wait_ready(app)
    sent = [app.send_task(NULL_TASK_NAME, kwargs={"image": "aGk="}, queue="imgq")
            for _ in range(50)]  # fmt: skip
    records = wait_all(app, [s.id for s in sent], timeout_s=60, watch=[worker])
    assert {r["status"] for r in records.values()} == {"SUCCESS"}
    assert all(r["result"] == {"ok": True} for r in records.values())
