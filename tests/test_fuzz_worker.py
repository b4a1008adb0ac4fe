"""The whole envelope fuzzed through a real worker (issue 14): any JSON in any header, property or
body field, truncated and bit-flipped messages, pushed onto the queue of a real `imgq worker` on a
real redis-server. The worker stays up, and every message ends with a stored result (its task id
was readable) or a dead-letter entry (it was not).

Hypothesis draws each example; the test waits for every message's outcome before the next, so a
failing example is the exact batch that broke the worker.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgq.localredis import LocalRedis
from imgq.shared.errors import InvalidTask
from imgq.worker.broker.deadletters import DeadLetters
from imgq.worker.wire import TASK_NAME
from imgq.worker.wire.message import parse_message
from tests.hostile import b64, good_png
from tests.workerproc import Worker

pytestmark = pytest.mark.integration

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
#: Fields of kombu's envelope and of Celery's protocol 2 headers a fuzzed value may replace.
_FIELDS = [
    ("body",), ("content-type",), ("content-encoding",), ("headers",), ("properties",),
    ("headers", "id"), ("headers", "task"), ("headers", "expires"), ("headers", "eta"),
    ("headers", "retries"), ("headers", "root_id"), ("headers", "parent_id"),
    ("headers", "timelimit"), ("headers", "argsrepr"), ("headers", "imgq_sent_at"),
    ("headers", "x-extra"), ("properties", "body_encoding"), ("properties", "delivery_tag"),
    ("properties", "priority"), ("properties", "delivery_info"), ("unexpected",),
]  # fmt: skip
_KWARGS_FIELDS = [("image",), ("top_k",), ("request_id",), ("other",)]


def _envelope(task_id: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A well-formed message as kombu's Redis transport stores it."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id,
                    "parent_id": None, "expires": None, "retries": 0, "eta": None},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": "imgq"},
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }  # fmt: skip


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(obj.get(key), dict):
            return  # an earlier mutation replaced the parent
        obj = obj[key]
    obj[path[-1]] = value


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    """One message: a valid task, with some fields replaced by any JSON, then possibly cut
    short or with a bit flipped."""
    kwargs: dict[str, Any] = {"image": b64(good_png(draw(st.integers(0, 5))))}
    for path in draw(st.lists(st.sampled_from(_KWARGS_FIELDS), max_size=2)):
        kwargs[path[0]] = draw(_JSON)
    env = _envelope(uuid.uuid4().hex, kwargs)
    for path in draw(st.lists(st.sampled_from(_FIELDS), max_size=3)):
        _set(env, path, copy.deepcopy(draw(_JSON)))
    raw = json.dumps(env).encode()
    damage = draw(st.sampled_from(["none", "none", "truncate", "bitflip"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif damage == "bitflip":
        bit = draw(st.integers(0, len(raw) * 8 - 1))
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        raw = bytes(flipped)
    return raw


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Iterator[Any]:
    """One redis-server and one worker for every example (starting a worker per example would
    cost seconds each)."""
    folder = tmp_path_factory.mktemp("fuzz")
    server = LocalRedis(folder / "redis").start()
    worker = Worker("fuzz", bundle_dir, server.url, folder, IMGQ_MAX_BATCH="8")
    try:
        worker.wait_ready(Celery("fuzz", broker=server.url, backend=server.url))
        yield server, worker
    finally:
        worker.kill()
        server.stop()


def _outcome_exists(r: redis.Redis, raw: bytes, letters: dict[str, str]) -> bool:
    """True once the message has its outcome: a stored result for a readable task id, else a
    dead-letter entry with its hash."""
    try:
        task_id = parse_message(raw, "imgq").task_id
    except InvalidTask:
        return hashlib.sha1(raw).hexdigest() in letters
    return bool(r.exists(f"celery-task-meta-{task_id}"))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(_messages(), min_size=1, max_size=6))
def test_fuzzed_envelopes_end_in_a_result_or_a_dead_letter(
    fuzz_target: Any, batch: list[bytes]
) -> None:
    """Every fuzzed message ends in a result or a dead letter, and the worker stays up."""
    server, worker = fuzz_target
    r = redis.Redis.from_url(server.url)
    r.lpush("imgq", *batch)
    deadline = time.monotonic() + 30
    while True:
        letters = {e.sha1: e.id for e in DeadLetters(r, "imgq").list(1000)}
        missing = [raw for raw in batch if not _outcome_exists(r, raw, letters)]
        if not missing and not r.llen("imgq"):
            break
        assert worker.process.poll() is None, worker.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no outcome for {[m[:300] for m in missing]}"
        time.sleep(0.02)
    assert worker.process.poll() is None, worker.log.read_text()[-3000:]
