"""The fleet as Redis knows it (worker/broker/fleet.py): a worker whose lease lapses without a clean
release is recorded lost, once, after a grace; a clean shutdown is not; every surviving worker
exports it. Real redis-server; the last test runs real `imgq worker` processes."""

from __future__ import annotations

import time
import urllib.request

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from imgq.localredis import free_port
from imgq.worker.broker.fleet import LOST_KEPT, LOST_KEY, MEMBERS_KEY, MISSING_KEY, Fleet
from imgq.worker.broker.intake import Intake, lease_key
from tests.workerproc import LEASE_TTL_S, RESTORE_INTERVAL_S, wait_for

#: The grace of the tests that drive the sweep themselves.
GRACE_S = 0.5


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def _lapse(r: redis.Redis, intake: Intake) -> None:
    """The worker's lease expires (a crash, a stall, an outage longer than the lease)."""
    r.delete(lease_key(intake.worker_id))


def _sweep_until_lost(fleet: Fleet) -> tuple[str, ...]:
    return tuple(wait_for(lambda: fleet.sweep().lost, timeout_s=30))


def test_a_lapsed_lease_is_recorded_lost_once_after_the_grace(r: redis.Redis) -> None:
    """Gone at one sweep: missing; still gone ``grace_s`` later (Redis's clock): lost, dropped
    from the members, recorded with its time once; the live count is the members with a
    lease."""
    alive, dead = Intake(r, "q", "alive", 30.0), Intake(r, "gpu", "dead", 30.0)
    alive.renew_lease()
    dead.renew_lease()
    fleet = Fleet(r, grace_s=GRACE_S)
    assert fleet.sweep().live == 2 and r.hgetall(MEMBERS_KEY) == {b"alive": b"q", b"dead": b"gpu"}
    _lapse(r, dead)
    first = fleet.sweep()
    assert (first.live, first.lost, first.last_lost_at) == (1, (), 0.0)
    missing_since = float(r.hget(MISSING_KEY, "dead") or 0)
    assert _sweep_until_lost(fleet) == ("dead",)
    lost_at = r.zscore(LOST_KEY, "dead")
    assert lost_at is not None and lost_at - missing_since >= GRACE_S
    again = fleet.sweep()
    assert (again.live, again.lost, again.last_lost_at) == (1, (), lost_at)
    assert r.hkeys(MEMBERS_KEY) == [b"alive"] and not r.exists(MISSING_KEY)
    assert r.zcard(LOST_KEY) == 1


def test_a_clean_release_is_no_loss(r: redis.Redis) -> None:
    """A worker that shuts down cleanly (``Intake.release``) leaves the fleet: never lost."""
    staying, leaving = Intake(r, "q", "staying", 30.0), Intake(r, "q", "leaving", 30.0)
    staying.renew_lease()
    leaving.renew_lease()
    fleet = Fleet(r, grace_s=0.0)
    leaving.release()
    for _ in range(3):
        view = fleet.sweep()
        assert (view.live, view.lost, view.last_lost_at) == (1, (), 0.0)
    assert r.hkeys(MEMBERS_KEY) == [b"staying"] and not r.exists(LOST_KEY)


def test_a_lease_taken_again_within_the_grace_is_no_loss(r: redis.Redis) -> None:
    """After a Redis outage longer than the lease every lease has lapsed; a live worker takes a
    new one at its next renewal, which makes it a member again, no longer missing."""
    worker = Intake(r, "q", "w", 30.0)
    worker.renew_lease()
    fleet = Fleet(r, grace_s=GRACE_S)
    _lapse(r, worker)
    assert fleet.sweep().live == 0 and r.hexists(MISSING_KEY, "w")
    worker.renew_lease()
    assert not r.hexists(MISSING_KEY, "w")
    time.sleep(GRACE_S)  # the grace must have passed for the sweep to be a test of it
    view = fleet.sweep()
    assert (view.live, view.lost) == (1, ()) and not r.exists(LOST_KEY)


def test_the_record_of_lost_workers_is_bounded(r: redis.Redis) -> None:
    """Only the newest LOST_KEPT losses are kept; the time of the newest is exported."""
    r.hset(MEMBERS_KEY, mapping={f"w{i}": "q" for i in range(LOST_KEPT + 5)})
    fleet = Fleet(r, grace_s=0.0)
    assert fleet.sweep().lost == ()  # all marked missing
    assert len(fleet.sweep().lost) == LOST_KEPT + 5
    assert r.zcard(LOST_KEY) == LOST_KEPT and r.hlen(MEMBERS_KEY) == 0


def _fleet_gauges(port: int) -> dict[str, float]:
    """The fleet gauges a worker's metrics endpoint exports."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("imgq_fleet_")
    }


@pytest.mark.integration
def test_survivors_export_a_killed_worker_but_not_a_stopped_one(
    redis_server, workers, r: redis.Redis
) -> None:
    """Three real workers. One stops cleanly (SIGTERM), then one is SIGKILLed: the survivor's
    metrics show the fleet shrink to 1 and the time the killed one was recorded lost, which is
    the only loss recorded; the survivor logs it."""
    app = Celery("probe", broker=redis_server.url)
    ports = {name: free_port() for name in ("survivor", "stopped", "killed")}
    started = {name: workers.start(name, IMGQ_METRICS_PORT=str(port))
               for name, port in ports.items()}  # fmt: skip
    for worker in started.values():
        worker.wait_ready(app)
    gauges = _fleet_gauges(ports["survivor"])
    assert "imgq_fleet_workers" in gauges, f"no fleet gauges exported: {gauges}"
    assert gauges["imgq_fleet_worker_lost_timestamp_seconds"] == 0
    wait_for(lambda: _fleet_gauges(ports["survivor"])["imgq_fleet_workers"] == 3)

    assert started["stopped"].stop() == 0
    killed_pid = started["killed"].pid
    started["killed"].kill()
    killed_at = time.time()
    lost_at = wait_for(
        lambda: _fleet_gauges(ports["survivor"])["imgq_fleet_worker_lost_timestamp_seconds"]
    )
    lost = [w.decode() for w in r.zrange(LOST_KEY, 0, -1)]
    assert len(lost) == 1 and lost[0].startswith(f"{started['killed'].name}:{killed_pid}:"), lost
    # Not before the lease could have lapsed and the grace (one more lease) passed.
    assert lost_at >= killed_at + 2 * LEASE_TTL_S - RESTORE_INTERVAL_S - 1
    assert _fleet_gauges(ports["survivor"])["imgq_fleet_workers"] == 1
    assert f"worker {lost[0]} lost" in started["survivor"].log_tail(100_000)


def test_fleet_keys_of_another_type_cost_no_lease_and_no_release(r: redis.Redis) -> None:
    """Fleet keys Redis refuses to use (here: strings where hashes belong) fail the sweep,
    which the keeper retries, but never a worker's lease or its release at shutdown."""
    r.set(MEMBERS_KEY, "not a hash")
    r.set(MISSING_KEY, "not a hash")
    worker = Intake(r, "q", "w", 30.0)
    worker.renew_lease()
    worker.check_lease()
    assert r.exists(lease_key("w"))
    with pytest.raises(redis.ResponseError):
        Fleet(r, grace_s=0.0).sweep()
    r.lpush("q", b"m")
    assert len(worker.lanes[0].take(1)) == 1
    assert worker.release() == 1 and not r.exists(lease_key("w"))
    assert r.llen("imgq:suspect:q") == 1  # given back, counted: no result was stored
