"""Hostile and malformed input (issue 7): each kind ends its own task with its own reason, nothing
else escapes, and the worker keeps serving.

Three layers: the catalogue's images against ``shared/decode.py``; property-based tests
(hypothesis) of random bytes and random argument shapes at the decode and at the task entry
point (``worker.wire.message`` and ``BatchEngine.serve`` with the classification handler on the
tiny real bundle, in-process); and
the whole catalogue in one burst through a real worker on a real redis-server.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client import CollectorRegistry

import tests.hostile
from imgq.shared.bundle import ModelBundle
from imgq.shared.decode import DecodeLimits, decode_base64, decode_image
from imgq.shared.errors import InvalidImage, InvalidTask
from imgq.worker.broker.deadletters import DeadLetters
from imgq.worker.broker.intake import Intake, Taken
from imgq.worker.engine import BatchEngine
from imgq.worker.handlers.classify import ClassifyHandler, validate_kwargs
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from imgq.worker.wire import TASK_NAME
from imgq.worker.wire.message import parse_message
from tests.hostile import (
    DEAD_LETTER,
    FAILURE,
    SUCCESS,
    Hostile,
    b64,
    catalogue,
    enqueue,
    envelope,
    good_png,
    image_payloads,
    json_body,
)
from tests.tinymodel import COLOURS, colour_image
from tests.workerproc import wait_all

#: The exceptions a task may fail with on purpose; anything else reaching a result is a bug.
_DELIBERATE = {"InvalidImage", "InvalidTask"}
_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the catalogue ---------------------------------------------------------------------------------


def test_catalogue_matches_its_documented_table(tmp_path: Path) -> None:
    """The table in tests/hostile.py's docstring lists exactly the catalogue's kinds and outcomes,
    and covers every kind issue 7 names (at least 20)."""
    rows = re.findall(r"^(\w+) +(SUCCESS|FAILURE|DEAD_LETTER) +(\S+)", tests.hostile.__doc__ or "",
                      re.MULTILINE)  # fmt: skip
    table = {name: (outcome, "" if reason.startswith("(") else reason)
             for name, outcome, reason in rows}  # fmt: skip
    cases = catalogue(tmp_path / "trap")
    assert table == {c.name: (c.outcome, c.reason) for c in cases}
    assert len(cases) == len(table) >= 20
    issue_7 = {"empty", "random_bytes", "text", "html", "truncated_jpeg", "truncated_png",
               "png_bad_crc", "png_bomb_50000x50000", "over_byte_limit", "tiff_16bit",
               "cmyk_jpeg", "animated_gif", "one_pixel", "extreme_aspect", "not_base64",
               "missing_image", "top_k_wrong_type", "unknown_keyword", "non_json_message",
               "pickle"}  # fmt: skip
    assert issue_7 <= set(table)


@pytest.mark.parametrize("name", sorted(image_payloads()))
def test_image_kind_gets_its_reason_from_decode(name: str) -> None:
    """Each image kind of the catalogue decodes, or is refused with its own reason, in shared/."""
    image, outcome, reason = image_payloads()[name]
    if outcome == SUCCESS:
        rgb = decode_image(decode_base64(image))
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    else:
        with pytest.raises(InvalidImage) as info:
            decode_image(decode_base64(image))
        assert info.value.reason == reason, str(info.value)


# -- property-based: decode ------------------------------------------------------------------------


def _encodings() -> list[bytes]:
    """One small real image per format the decoder reads, to be mutated."""
    rgb = colour_image(COLOURS[0], size_px=12)
    out = [good_png(0)]
    for fmt in ("JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt)
        out.append(buf.getvalue())
    return out


_ENCODINGS = _encodings()
_SMALL_LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=4_000_000)


def _check_decode(data: bytes, limits: DecodeLimits) -> None:
    """Decoding gives an RGB uint8 array or InvalidImage; nothing else may escape."""
    try:
        rgb = decode_image(data, limits)
    except InvalidImage:
        return
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    assert rgb.shape[0] * rgb.shape[1] <= limits.max_pixels
    assert rgb.flags.c_contiguous


@_PROPERTY
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_invalid_image(data: bytes) -> None:
    """Random bytes: an image or InvalidImage, never another exception."""
    _check_decode(data, _SMALL_LIMITS)


@_PROPERTY
@given(st.sampled_from(_ENCODINGS), st.data())
def test_damaged_real_images_decode_or_invalid_image(original: bytes, data: st.DataObject) -> None:
    """Real images of every format, truncated, with bytes overwritten or inserted: an image or
    InvalidImage, never another exception (headers stay checked against the limits)."""
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, max(len(damaged) - 1, 0)))
        action = data.draw(st.sampled_from(["cut", "overwrite", "insert"]))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        if action == "cut":
            del damaged[where:]
        elif action == "overwrite":
            damaged[where : where + len(chunk)] = chunk
        else:
            damaged[where:where] = chunk
    _check_decode(bytes(damaged), _SMALL_LIMITS)


@_PROPERTY
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_random_text_base64_or_invalid_image(text: str | bytes) -> None:
    """Random text as the `image` argument: bytes or InvalidImage (bad_base64, empty)."""
    try:
        data = decode_base64(text, _SMALL_LIMITS)
    except InvalidImage as exc:
        assert exc.reason in {"bad_base64", "empty"}
    else:
        assert isinstance(data, bytes) and data


# -- property-based: the task entry point ----------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)  # fmt: skip
_IMAGES = st.sampled_from(
    [b64(good_png(0)), b64(good_png(1)), b64(b"junk"), "", "!!", b64(_ENCODINGS[2])]
)
_KWARGS = st.dictionaries(
    st.sampled_from(["image", "top_k", "request_id"]) | st.text(max_size=10),
    _IMAGES | _JSON,
    max_size=4,
)
_ARGS: st.SearchStrategy[Any] = st.just([]) | st.lists(_JSON, max_size=2) | _JSON
_TIME = (
    st.none()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.datetimes().map(lambda d: d.isoformat())
)


@st.composite
def _messages(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A queue element and the task id it carries (None when it has none): a JSON task with
    random arguments and headers, another content type or task name, or raw junk."""
    task_id = f"t-{draw(st.uuids())}"
    kind = draw(st.sampled_from(["task", "task", "task", "envelope", "junk"]))
    if kind == "junk":
        return draw(st.binary(max_size=64)), None
    if kind == "envelope":
        raw = envelope(
            task_id,
            draw(st.binary(max_size=64)),
            content_type=draw(st.sampled_from(["application/json", "application/x-yaml", ""])),
            task=draw(st.sampled_from([TASK_NAME, "os.system"])),
        )
        return raw, task_id
    body = json_body(draw(_ARGS), draw(_KWARGS))
    return envelope(task_id, body, expires=draw(_TIME), imgq_sent_at=draw(_TIME)), task_id


@_PROPERTY
@given(st.binary(max_size=256) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_parse_message_of_junk_raises_only_invalid_task(raw: bytes) -> None:
    """Whatever bytes sit in the queue, reading them gives a request or InvalidTask."""
    try:
        parse_message(raw, "imgq")
    except InvalidTask as exc:
        assert exc.reason == "malformed_message"


@_PROPERTY
@given(_KWARGS)
def test_validate_kwargs_raises_only_invalid_task(kwargs: dict[str, Any]) -> None:
    """Any keyword arguments: validated values of the right types, or InvalidTask."""
    try:
        image, top_k, request_id = validate_kwargs(kwargs, n_labels=3)
    except InvalidTask as exc:
        assert exc.reason in {"missing_argument", "bad_argument", "unknown_argument"}
    else:
        assert isinstance(image, str) and 1 <= top_k <= 3
        assert request_id is None or isinstance(request_id, str | int)


@pytest.fixture(scope="module")
def runner(bundle_dir: Path) -> BatchEngine:
    """An engine with the classification handler on the tiny real bundle; ``serve`` never
    touches Redis, so none runs."""
    settings = WorkerSettings(queue="imgq")
    client = redis.Redis(port=1)  # never connected: serve() does no I/O
    intake = Intake(client, "imgq", "hypothesis", lease_ttl_s=10)
    bundle = ModelBundle.load(bundle_dir, device="cpu")
    metrics = WorkerMetrics(CollectorRegistry())
    handler = ClassifyHandler(bundle, settings, metrics)
    return BatchEngine(settings, {TASK_NAME: handler}, client, intake.lanes[0], None, metrics)


@_PROPERTY
@given(st.lists(_messages(), min_size=1, max_size=6))
def test_batch_of_random_messages_gets_one_outcome_each(
    runner: BatchEngine, batch: list[tuple[bytes, str | None]]
) -> None:
    """A batch of random messages: exactly one stored result per task id and one dead letter per
    message without one; every failure is InvalidImage or InvalidTask; results are JSON."""
    raws = [raw for raw, _ in batch]
    out = runner.serve(Taken(raws, [False] * len(raws)))
    assert sorted(tid for tid, _ in out.records) == sorted(t for _, t in batch if t is not None)
    assert len(out.dead) == sum(t is None for _, t in batch)
    for task_id, meta in out.records:
        assert meta["task_id"] == task_id
        assert meta["status"] in {"SUCCESS", "FAILURE", "REVOKED"}
        if meta["status"] == "FAILURE":
            assert meta["result"]["exc_type"] in _DELIBERATE, meta["result"]
        json.dumps(meta, allow_nan=False)


def test_regression_issue_7_args_not_a_list_is_malformed() -> None:
    """Regression (issue 7): a body whose args are a number raised TypeError out of
    parse_message, crashing the batch runner (and, redelivered, every worker after it)."""
    req = parse_message(envelope("t-1", json_body(5, {})), "imgq")
    assert req.error is not None and req.error.reason == "malformed_message"


def test_regression_issue_7_overflowing_expires_is_malformed() -> None:
    """Regression (issue 7): an integer `expires` too large for a float raised OverflowError out
    of parse_message."""
    req = parse_message(envelope("t-1", json_body([], {}), expires=10**400), "imgq")
    assert req.error is not None and req.error.reason == "malformed_message"


def test_regression_issue_7_deeply_nested_json_is_malformed() -> None:
    """Regression (issue 7): nested JSON deeper than the recursion limit raised RecursionError out
    of parse_message; the worker shut down and gave the message back to the queue, where it
    stopped the next worker too."""
    with pytest.raises(InvalidTask, match="^malformed_message: "):
        parse_message(b"[" * 100_000 + b"]" * 100_000, "imgq")
    req = parse_message(envelope("t-1", b"[[], " + b"[" * 100_000 + b"]" * 100_000 + b"]"), "q")
    assert req.error is not None and req.error.reason == "malformed_message"


# -- the whole catalogue through a real worker -----------------------------------------------------


def _check_record(case: Hostile, record: dict[str, Any]) -> None:
    """The stored record has the case's status, and for a failure its exception and reason."""
    assert record["status"] == case.outcome, (case.name, record)
    if case.outcome == FAILURE:
        assert record["result"]["exc_type"] == case.error, (case.name, record["result"])
        assert record["result"]["exc_message"][0].startswith(f"{case.reason}: "), case.name


@pytest.mark.integration
def test_hostile_burst_fails_exactly_the_bad_ones(redis_server, workers, tmp_path) -> None:
    """The whole catalogue, interleaved with good images so they share batches, twice (queued
    before the worker starts, then while it runs): every hostile task ends with its own outcome
    and reason, every good one succeeds, junk goes to the dead-letter list, nothing is unpickled,
    and a good task is answered after each burst by the same worker process."""
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    r = redis.Redis.from_url(redis_server.url)
    trap = tmp_path / "unpickled"
    worker = None
    for burst in range(2):
        cases = catalogue(trap)
        hostile: dict[str, Hostile] = {}
        good: dict[str, str] = {}  # task id -> expected label
        for i, case in enumerate(cases):
            sent = app.send_task(TASK_NAME, kwargs={"image": b64(good_png(i))}, queue="imgq")
            good[sent.id] = "abc"[i % 3]
            task_id = enqueue(case, app, r)
            if task_id is not None:
                hostile[task_id] = case
        if worker is None:
            worker = workers.start("hostile")
            worker.wait_ready(app)
        records = wait_all(app, [*good, *hostile], timeout_s=60, watch=[worker])
        for task_id, case in hostile.items():
            _check_record(case, records[task_id])
        for task_id, label in good.items():
            assert records[task_id]["status"] == SUCCESS, records[task_id]
            assert records[task_id]["result"]["label"] == label
        dead = {c.raw for c in cases if c.outcome == DEAD_LETTER}
        letters = DeadLetters(r, "imgq")
        entries = letters.list(100)
        assert {letters.show(e.id)[1] for e in entries} == dead
        assert {e.reason for e in entries} == {"malformed_message"}
        letters.purge()
        if burst == 0:
            sizes = [records[task_id]["result"]["batch_size"] for task_id in good]
            assert max(sizes) > 1, "the burst did not share batches"
        after = app.send_task(TASK_NAME, kwargs={"image": b64(good_png(2))}, queue="imgq")
        assert after.get(timeout=10)["label"] == "c"
        assert worker.process.poll() is None, worker.log.read_text()[-3000:]
    assert not trap.exists(), "a pickled message was unpickled"
    assert r.keys("imgq:inflight:*") == [], "messages left unacknowledged"
