"""Dead letters (worker/broker/deadletters.py) and `imgq dlq` on a real redis-server."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from imgq.cli import main
from imgq.localredis import LocalRedis, free_port
from imgq.worker.broker.deadletters import (
    HEAD_BYTES,
    LUA_DEAD_LETTER,
    BodyNotKept,
    DeadLetterLimits,
    DeadLetters,
    UnknownDeadLetter,
    dead_letter_keys,
)
from tests.blocked_imports import run_without

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    """A client of the private redis-server."""
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def _msg(i: int, size: int = 300) -> bytes:
    """A distinct raw message of ``size`` bytes."""
    return f'{{"n": {i}}}'.encode().ljust(size, b"x")


def _accounting(client: redis.Redis, queue: str) -> tuple[int, int, int]:
    """(bytes key, sum of the sorted set's lengths, sum of the body keys that exist)."""
    keys = dead_letter_keys(queue)
    members = [m.decode() for m in cast(list[bytes], client.zrange(keys.bodies, 0, -1))]
    stored = sum(client.strlen(keys.body(m.rsplit(":", 1)[0])) for m in members)
    listed = sum(int(m.rsplit(":", 1)[1]) for m in members)
    return int(client.get(keys.bytes) or 0), listed, stored


def test_add_list_show_round_trip(client: redis.Redis) -> None:
    """What is added reads back: metadata, a head of HEAD_BYTES bytes, the exact body."""
    dl = DeadLetters(client, "q", worker="w1@host")
    first = b"\x00\xff" + _msg(1, 1000)
    dl.add(first, "malformed_message", "not JSON: " + "é" * 400, "t-1")
    dl.add(_msg(2), "content_refused", "pickle", "é" * 10_000, keep_body=False)
    newest, oldest = dl.list()
    assert (newest.reason, newest.body) == ("content_refused", "not_kept")
    assert newest.task_id == "é" * 100  # a sender's task id is cut too
    assert oldest.reason == "malformed_message" and oldest.task_id == "t-1"
    assert oldest.length == len(first) and oldest.sha1 == hashlib.sha1(first).hexdigest()
    assert oldest.head == first[:HEAD_BYTES] and oldest.worker == "w1@host"
    assert len(oldest.detail.encode()) <= 500 and oldest.detail.endswith("é")  # whole chars
    assert oldest.time_s == pytest.approx(time.time(), abs=5)
    letter, body = dl.show(oldest.id)
    assert letter == oldest and body == first
    assert dl.show(newest.id) == (newest, None)
    assert [d.id for d in dl.list(count=1)] == [newest.id]
    stats = dl.stats()
    assert (stats["entries"], stats["kept_bodies"], stats["kept_bytes"]) == (2, 1, len(first))
    assert stats["oldest_time_s"] <= stats["newest_time_s"]


def test_same_message_twice_is_one_entry(client: redis.Redis) -> None:
    """A raw message dead-lettered again within the TTL (lost reply, redelivery) is not added."""
    dl = DeadLetters(client, "q")
    dl.add(_msg(1), "malformed_message", "first")
    dl.add(_msg(1), "redelivered_too_often", "again")
    assert [d.detail for d in dl.list()] == ["first"]
    assert _accounting(client, "q") == (300, 300, 300)


def test_byte_budget_keeps_the_newest_bodies(client: redis.Redis) -> None:
    """Kept bodies never exceed the budget; the oldest go first and their entries stay."""
    dl = DeadLetters(client, "q", DeadLetterLimits(max_body_bytes=1000))
    for i in range(10):
        dl.add(_msg(i), "malformed_message", "x")
        total, listed, stored = _accounting(client, "q")
        assert total == listed == stored <= 1000
    states = [d.body for d in dl.list()]
    assert states == ["kept"] * 3 + ["evicted"] * 7
    assert dl.show(dl.list()[2].id)[1] == _msg(7)


def test_body_larger_than_the_budget_is_not_kept(client: redis.Redis) -> None:
    """A body over the whole budget is recorded without it and evicts nothing."""
    dl = DeadLetters(client, "q", DeadLetterLimits(max_body_bytes=1000))
    dl.add(_msg(1), "malformed_message", "x")
    dl.add(_msg(2, 1001), "message_too_large", "x")
    assert [d.body for d in dl.list()] == ["over_budget", "kept"]
    assert _accounting(client, "q") == (300, 300, 300)
    assert not client.exists(dead_letter_keys("q").body(dl.list()[0].id))


def test_count_cap_drops_the_oldest_entries_with_their_keys(client: redis.Redis) -> None:
    """At most max_entries; a dropped entry takes its body and de-duplication key along."""
    dl = DeadLetters(client, "q", DeadLetterLimits(max_entries=5))
    for i in range(8):
        dl.add(_msg(i), "malformed_message", str(i))
    keys = dead_letter_keys("q")
    assert client.xlen(keys.stream) == 5
    assert [d.detail for d in dl.list()] == ["7", "6", "5", "4", "3"]
    assert _accounting(client, "q") == (1500, 1500, 1500)
    assert len(list(client.scan_iter(keys.stream + ":seen:*"))) == 5
    dl.add(_msg(0), "malformed_message", "again")  # no longer a duplicate
    assert dl.list(1)[0].detail == "again"


def test_entries_and_bodies_age_out(client: redis.Redis) -> None:
    """Past the TTL, entries are trimmed, bodies leave the accounting, duplicates count anew."""
    dl = DeadLetters(client, "q", DeadLetterLimits(ttl_s=1))
    dl.add(_msg(1), "malformed_message", "old")
    dl.add(_msg(2), "malformed_message", "old")
    time.sleep(1.1)
    dl.add(_msg(3), "malformed_message", "new")
    assert [d.detail for d in dl.list()] == ["new"]
    assert _accounting(client, "q") == (300, 300, 300)
    dl.add(_msg(1), "malformed_message", "back")
    assert [d.detail for d in dl.list()] == ["back", "new"]


def test_every_key_expires(client: redis.Redis) -> None:
    """Each add gives every key it touches the TTL, so nothing outlives a quiet queue."""
    dl = DeadLetters(client, "q", DeadLetterLimits(ttl_s=3600))
    dl.add(_msg(1), "malformed_message", "x")
    keys = dead_letter_keys("q")
    letter = dl.list()[0]
    for key in (keys.stream, keys.bodies, keys.bytes, keys.body(letter.id), keys.seen(letter.sha1)):
        assert 3500 < client.ttl(key) <= 3600, key


def test_requeue_puts_the_exact_bytes_back(client: redis.Redis) -> None:
    """Requeue LPUSHes the body, forgets the entry, its keys and the delivery count."""
    dl = DeadLetters(client, "q")
    raw = b'{"task": "imgq.classify"}\x00\xff' + _msg(1)
    dl.add(raw, "redelivered_too_often", "3 deliveries", "t-1")
    dl.add(_msg(2), "malformed_message", "x")
    letter = dl.list()[1]
    keys = dead_letter_keys("q")
    client.set(f"imgq:deliveries:{letter.sha1}", 3)
    assert dl.requeue(letter.id).task_id == "t-1"
    assert client.lrange("q", 0, -1) == [raw]
    assert [d.detail for d in dl.list()] == ["x"]
    for key in (keys.body(letter.id), keys.seen(letter.sha1), f"imgq:deliveries:{letter.sha1}"):
        assert not client.exists(key), key
    assert _accounting(client, "q") == (300, 300, 300)
    dl.add(raw, "redelivered_too_often", "again")  # a fresh dead letter, not a duplicate
    assert dl.list(1)[0].detail == "again"


def test_requeue_says_why_it_cannot(client: redis.Redis) -> None:
    """Unknown ids and bodies not kept fail with the reason and what to do."""
    dl = DeadLetters(client, "q", DeadLetterLimits(max_body_bytes=600))
    dl.add(_msg(1), "malformed_message", "x", keep_body=False)
    dl.add(_msg(2, 601), "message_too_large", "x")
    dl.add(_msg(3), "malformed_message", "x")
    dl.add(_msg(4), "malformed_message", "x")
    dl.add(_msg(5), "malformed_message", "x")  # evicts 3
    ids = {d.detail + d.body: d.id for d in dl.list()}
    for state in ("not_kept", "over_budget", "evicted"):
        with pytest.raises(BodyNotKept, match=f"not kept \\({state}") as info:
            dl.requeue(ids["x" + state])
        assert info.value.state == state
    with pytest.raises(UnknownDeadLetter, match="no dead letter 1-0.*imgq dlq list"):
        dl.requeue("1-0")
    with pytest.raises(UnknownDeadLetter, match="not a dead-letter id"):
        dl.show("1; DEL *")
    for huge in ("18446744073709551616-0", "1-" + "9" * 20):  # past what Redis accepts
        with pytest.raises(UnknownDeadLetter, match="not a dead-letter id"):
            dl.show(huge)
    assert client.llen("q") == 0


def test_purge_deletes_one_queue_only(client: redis.Redis) -> None:
    """Purge removes every key of its queue's dead letters and leaves other queues alone."""
    a, b = DeadLetters(client, "a"), DeadLetters(client, "b")
    for i in range(5):
        a.add(_msg(i), "malformed_message", "x", keep_body=i % 2 == 0)
    b.add(_msg(9), "malformed_message", "x")
    assert a.purge() == 5
    assert list(client.scan_iter("imgq:dlq:a*")) == []
    assert b.stats()["entries"] == 1 and a.purge() == 0
    a.add(_msg(1), "malformed_message", "after")
    assert [d.body for d in a.list()] == ["kept"]


def test_add_on_a_pipeline(client: redis.Redis) -> None:
    """``pipe=`` queues the add with the batch's other writes (a MULTI pipeline)."""
    dl = DeadLetters(client, "q")
    pipe = client.pipeline(transaction=True)
    pipe.set("result", "ok")
    dl.add(_msg(1), "malformed_message", "x", pipe=pipe)
    dl.add(_msg(1), "malformed_message", "x", pipe=pipe)
    reply = pipe.execute()
    assert reply[1] == reply[2] == dl.list()[0].id.encode()
    assert client.xlen(dead_letter_keys("q").stream) == 1


def test_lua_function_from_another_script(client: redis.Redis) -> None:
    """Another script prepends LUA_DEAD_LETTER and calls dead_letter() from Lua."""
    caller = LUA_DEAD_LETTER + (
        "local a = dead_letter(ARGV[1], false, 5000000, ARGV[2], ARGV[3], 'message_too_large', "
        "'5 MB', false, 'intake', '1', 60, 100, 10000000)\n"
        "local b = dead_letter(ARGV[1], ARGV[4], 0, false, false, 'malformed_message', 'x', "
        "'t-9', 'intake', '1', 60, 100, 1000)\n"
        "return {a, b}"
    )
    raw = _msg(4)
    ids = client.eval(caller, 0, "q", "ab" * 20, b"head", raw)
    dl = DeadLetters(client, "q")
    dl.add(raw, "malformed_message", "duplicate")  # same sha1 as the Lua-computed one
    big, small = dl.list()[::-1]
    assert [big.id.encode(), small.id.encode()] == ids
    assert (big.body, big.length, big.head, big.task_id) == ("too_large", 5000000, b"head", None)
    assert (small.body, small.length, small.head, small.task_id) == ("kept", 300, raw[:200], "t-9")
    assert dl.show(small.id)[1] == raw


@pytest.mark.parametrize(
    ("field", "value"), [("max_entries", 0), ("max_body_bytes", -1), ("ttl_s", 0), ("ttl_s", 1.5)]
)
def test_limits_say_what_is_allowed(field: str, value: object) -> None:
    """A bad limit names the field, the value given and the range."""
    with pytest.raises(ValueError, match=f"{field} must be an integer in .*got {value!r}"):
        DeadLetterLimits(**{field: value})  # type: ignore[arg-type]


def test_to_dict_escapes_the_head(client: redis.Redis) -> None:
    """The JSON form shows a hostile head as printable ASCII."""
    dl = DeadLetters(client, "q")
    dl.add(b"\x1b[2J\n\xff", "malformed_message", "x")
    shown = dl.list()[0].to_dict()
    assert shown["head"] == "\\x1b[2J\\n\\xff" and shown["time"].endswith("+00:00")
    assert json.loads(json.dumps(shown)) == shown


def test_imports_without_numpy() -> None:
    """`imgq dlq` stays light: no numpy, no OpenCV."""
    run_without(["numpy", "cv2"], "import imgq.worker.commands.dlq")


# ------------------------------------------------------------------------------- imgq dlq


def test_cli_list_show_requeue_purge(
    client: redis.Redis,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The operator's whole round: list (text and JSON), show --body, requeue, purge --yes."""
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    monkeypatch.setenv("IMGQ_DEAD_LETTER_MAX_BYTES", "1000")
    dl = DeadLetters(client, "cq", DeadLetterLimits(max_body_bytes=1000))
    dl.add(b"\x1b]0;pwned\x07" + _msg(1), "malformed_message", "bad\x1b[31m", "t\n1")
    dl.add(_msg(2, 2000), "message_too_large", "x")
    big, kept = dl.list()

    assert main(["dlq", "list", "--queue", "cq"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b]0;pwned\\x07" in out and "task=t\\n1" in out
    assert kept.id in out and "body=over_budget" in out and "2 dead letters" in out
    assert main(["dlq", "list", "--queue", "cq", "--json", "--count", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in shown["entries"]] == [big.id] and shown["stats"]["entries"] == 2

    body_file = tmp_path / "body.bin"
    assert main(["dlq", "show", kept.id, "--queue", "cq", "--body", str(body_file)]) == 0
    assert body_file.read_bytes() == dl.show(kept.id)[1]
    assert "\x1b" not in capsys.readouterr().out
    assert main(["dlq", "show", big.id, "--queue", "cq", "--body", str(tmp_path / "x")]) == 1
    assert "not kept (over_budget)" in capsys.readouterr().err and not (tmp_path / "x").exists()

    assert main(["dlq", "requeue", kept.id, "--queue", "cq"]) == 0
    assert client.lrange("cq", 0, -1) == [body_file.read_bytes()]
    assert main(["dlq", "requeue", kept.id, "--queue", "cq"]) == 1
    assert f"no dead letter {kept.id}" in capsys.readouterr().err

    assert main(["dlq", "purge", "--queue", "cq"]) == 2
    assert "--yes" in capsys.readouterr().err and dl.stats()["entries"] == 1
    assert main(["dlq", "purge", "--queue", "cq", "--yes"]) == 0
    assert "purged 1 dead letters" in capsys.readouterr().out and dl.stats()["entries"] == 0


def test_cli_failures(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Unreachable Redis: one line on stderr, password masked, exit 1; bad --count: exit 2."""
    monkeypatch.setenv("IMGQ_BROKER_URL", f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    assert main(["dlq", "list"]) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err and ":***@127.0.0.1" in err and err.count("\n") == 1
    assert main(["dlq", "list", "--count", "0"]) == 2
    assert "--count must be >= 1" in capsys.readouterr().err
