"""Sentinel URLs as kombu spells them, Redis Cluster refused: the parsing, the settings, the
clients of worker/broker/connection.py on real redis-server and redis-sentinel processes, and
the one-line refusals of `imgq worker` and an `imgq` command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from imgq.launcher import worker_env
from imgq.localredis import LocalRedis, free_port
from imgq.localsentinel import LocalSentinels
from imgq.worker.broker.capped import ReplyTooLarge, capped_client
from imgq.worker.broker.connection import (
    FOLLOW_INTERVAL_S,
    RedisRefused,
    connect,
    parse_sentinel_url,
    url_problem,
)
from imgq.worker.logs import mask_url
from imgq.worker.settings import SettingsError, WorkerSettings

PASSWORD = "s3cret-pw"
OPTIONS = "IMGQ_BROKER_TRANSPORT_OPTIONS"


# -- parsing and settings (no Redis) -----------------------------------------------------------


def test_a_sentinel_list_reads_as_kombu_reads_it() -> None:
    """Hosts in order, kombu's default port, the database and password of the first URL."""
    parsed = parse_sentinel_url("sentinel://:p%40ss@h1:26380/3;sentinel://h2;sentinel://:p%40ss@h3")
    assert parsed.hosts == (("h1", 26380), ("h2", 26379), ("h3", 26379))
    assert (parsed.db, parsed.password) == (3, "p@ss")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("sentinel://h1/0;sentinel://h2/1", "another database"),
        ("sentinel://:a@h1;sentinel://:b@h2", "another database or password"),
        ("sentinel://h1;redis://h2", "must start with sentinel://"),
        ("sentinel://h1?ssl=true", "has a query"),
        ("sentinel://:26379", "names no host"),
        ("sentinel://h1/x", "must be a number"),
        ("sentinel://h1:port", "sentinel URL list"),
    ],
)
def test_a_wrong_sentinel_list_says_which_part(url: str, why: str) -> None:
    """Each mistake in a list is named, not read some other way."""
    with pytest.raises(ValueError, match=why):
        parse_sentinel_url(url)


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://h:7000/0", "rediss+cluster://h:7000", "redis-cluster://h", "cluster://h"],
)
def test_a_cluster_url_is_refused_naming_sentinel(url: str) -> None:
    """A Redis Cluster URL: one line with the reason and the Sentinel alternative."""
    problem = url_problem(url, {}, OPTIONS)
    assert problem is not None and "\n" not in problem
    assert "Redis Cluster" in problem and "hash slots" in problem and "sentinel://" in problem


def test_settings_refuse_a_sentinel_url_without_master_name() -> None:
    """The worker's settings name the option to set; the results Redis, defaulting to the
    broker, is not reported twice."""
    with pytest.raises(SettingsError) as info:
        WorkerSettings.from_env({"IMGQ_BROKER_URL": "sentinel://h1;sentinel://h2"})
    message = str(info.value)
    assert f"master_name in {OPTIONS}" in message
    assert "IMGQ_RESULT_BACKEND" not in message


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"sentinel_kwargs": {"bogus": 1}}, "redis-py does not know: 'bogus'"),
        ({"sentinel_kwargs": {"host": "h"}}, "redis-py does not know: 'host'"),
        ({"sentinel_kwargs": {"socket_timeout": "x"}}, "sentinel_kwargs: socket_timeout must"),
        ({"min_other_sentinels": float("inf")}, "min_other_sentinels must be a number >= 0"),
        ({"visibility_timeout": float("nan")}, "visibility_timeout must be a number >= 0"),
    ],
)
def test_odd_sentinel_options_are_refused_at_start(options: dict, why: str) -> None:
    """Options that redis-py would reject only on connecting (a TypeError, an OverflowError, a
    traceback from every command) are refused with the settings, naming the option."""
    env = {"IMGQ_BROKER_URL": "sentinel://h1;sentinel://h2",
           OPTIONS: json.dumps({"master_name": "m", **options})}  # fmt: skip
    with pytest.raises(SettingsError, match=why):
        WorkerSettings.from_env(env)


def test_results_follow_the_brokers_sentinel_options() -> None:
    """Results in the broker's Redis (the default) reach it through the same master; another
    master named for the results is another Redis."""
    env = {"IMGQ_BROKER_URL": "sentinel://h1;sentinel://h2",
           OPTIONS: '{"master_name": "m", "sentinel_kwargs": {"password": "x"}}'}  # fmt: skip
    settings = WorkerSettings.from_env(env)
    assert settings.result_backend_transport_options["master_name"] == "m"
    assert settings.results_in_broker
    other = WorkerSettings.from_env(
        {**env, "IMGQ_RESULT_BACKEND_TRANSPORT_OPTIONS": '{"master_name": "r"}'}
    )
    assert not other.results_in_broker


def test_every_password_of_a_sentinel_setup_is_masked() -> None:
    """The start-up log line's settings: each URL of the list and the sentinels' password."""
    options = {"master_name": "m", "sentinel_kwargs": {"password": PASSWORD}}
    env = {"IMGQ_BROKER_URL": f"sentinel://:{PASSWORD}@h1/0;sentinel://:{PASSWORD}@h2/0",
           OPTIONS: json.dumps(options)}  # fmt: skip
    described = json.dumps(WorkerSettings.from_env(env).describe())
    assert PASSWORD not in described
    assert mask_url(env["IMGQ_BROKER_URL"]) == "sentinel://:***@h1/0;sentinel://:***@h2/0"


# -- clients on real processes -----------------------------------------------------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LocalSentinels]:
    with LocalSentinels(tmp_path / "sentinel", password=PASSWORD) as sentinels:
        yield sentinels


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[LocalRedis]:
    """A redis-server with cluster mode on (a node of a cluster not yet formed)."""
    config = tmp_path / "cluster-node" / "nodes.conf"
    # Its cluster bus port must be free too (by default the port + 10000, past 65535 for some).
    args = ["--cluster-enabled", "yes", "--cluster-config-file", str(config),
            "--cluster-port", str(free_port())]  # fmt: skip
    with LocalRedis(tmp_path / "cluster-node", appendonly=False, args=args) as node:
        yield node


def _url(group: LocalSentinels) -> str:
    """The group's list with the master's password in its first URL, as kombu reads it."""
    return group.url.replace("sentinel://", f"sentinel://:{PASSWORD}@", 1)


def _port(client: redis.Redis) -> int:
    """The port of the server that answers this client now."""
    return int(client.info("server")["tcp_port"])


@pytest.mark.integration
def test_a_sentinel_client_and_its_capped_take_client_reach_the_master(
    group: LocalSentinels,
) -> None:
    """Both reach the master the sentinels name; the take client's byte cap still holds."""
    client = connect(_url(group), group.transport_options, socket_timeout=5)
    capped = capped_client(client, 1000)
    client.set("small", b"x" * 10)
    client.set("large", b"x" * 5000)
    assert _port(client) == _port(capped) == group.master_port()
    assert capped.get("small") == b"x" * 10
    with pytest.raises(ReplyTooLarge):
        capped.get("large")


@pytest.mark.integration
def test_clients_follow_a_master_demoted_alive(group: LocalSentinels) -> None:
    """SENTINEL FAILOVER: the old master keeps accepting writes on the connections it has
    until Sentinel demotes it, seconds later, and those writes are lost. imgq's clients move
    to the new master by themselves (checked every FOLLOW_INTERVAL_S), while the old one is
    still a master."""
    client = connect(_url(group), group.transport_options, socket_timeout=5)
    capped = capped_client(client, 1 << 20)
    old = _port(client)
    assert _port(capped) == old
    group.failover()
    deadline = time.monotonic() + 60
    while (named := group.sentinels_report()) in ({old}, set()) or len(named) > 1:
        assert time.monotonic() < deadline, "the sentinels never named a new master"
        time.sleep(0.01)
    named_at = time.monotonic()
    moved: dict[str, float] = {}
    old_master = group.client(old)
    while len(moved) < 2:
        assert time.monotonic() - named_at < 60, f"still on {old}: {moved}"
        # Moved by the clients' own check, not by Sentinel demoting the old master (later).
        assert old_master.execute_command("ROLE")[0] == b"master", f"demoted first: {moved}"
        for name, c in (("client", client), ("take", capped)):
            try:
                if name not in moved and _port(c) in named:
                    moved[name] = time.monotonic() - named_at
            except redis.ConnectionError:
                pass  # dropped for the new master: the next command reconnects
        time.sleep(0.01)
    print(
        f"moved {moved} s after the sentinels named the new master; checked every "
        f"{FOLLOW_INTERVAL_S} s"
    )
    client.incr("after")  # a write lands on the new master
    assert group.client(next(iter(named))).get("after") == b"1"


@pytest.mark.integration
def test_a_master_name_no_sentinel_knows_is_a_clear_error(group: LocalSentinels) -> None:
    """A mistake, said in one line with the names they monitor; not an outage to retry."""
    client = connect(_url(group), {"master_name": "nope"}, socket_timeout=5)
    with pytest.raises(RedisRefused) as info:
        client.ping()
    message = str(info.value)
    assert "named 'nope'" in message and "they monitor: imgq" in message and "\n" not in message


@pytest.mark.integration
def test_sentinels_that_do_not_answer_are_an_outage(tmp_path: Path) -> None:
    """No sentinel answers: a connection error, which the worker waits out."""
    url = f"sentinel://127.0.0.1:{free_port()};sentinel://127.0.0.1:{free_port()}"
    client = connect(url, {"master_name": "imgq"}, socket_timeout=1, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError) as info:
        client.ping()
    assert not isinstance(info.value, RedisRefused)
    # Said in a line that names each sentinel and why, not redis-py's kilobyte of client reprs.
    message = str(info.value)
    assert message.startswith("no sentinel at 127.0.0.1:")
    assert "answers for master 'imgq'" in message
    assert message.count("Connection refused") == 2 and "redis.client" not in message
    assert len(message) < 400, message


@pytest.mark.integration
def test_a_plain_url_to_a_cluster_node_is_refused(cluster_node: LocalRedis) -> None:
    """``INFO cluster`` on the first connection: refused, naming Sentinel."""
    with pytest.raises(RedisRefused, match="Redis Cluster node.*sentinel://"):
        connect(cluster_node.url, socket_timeout=5).ping()


# -- the one-line refusals of the commands -------------------------------------------------------


def _imgq(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``imgq ARGS`` with only ``env``'s imgq settings (a worker refused at start returns
    before it loads anything)."""
    return subprocess.run(
        [sys.executable, "-m", "imgq.cli", *args], capture_output=True, text=True, timeout=120,
        env=worker_env(env.pop("IMGQ_BROKER_URL"), IMGQ_METRICS_PORT="0", **env),
    )  # fmt: skip


def _refusal(done: subprocess.CompletedProcess[str], prog: str) -> str:
    """The one line a refused command printed last, checked for no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode in (1, 2), output
    assert "Traceback" not in output, output
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"imgq {prog}"), output
    return last


_ARGS = {"worker": ("--device", "cpu"), "models": ("list",), "dlq": ("list",), "backlog": ()}


def _args(command: str, bundle: Path) -> tuple[str, ...]:
    """``imgq COMMAND ...``; the worker gets a real bundle, so that only Redis is refused."""
    return (command, *(("--model", str(bundle)) if command == "worker" else ()), *_ARGS[command])


@pytest.mark.integration
@pytest.mark.parametrize("command", ["worker", "models", "dlq"])
def test_a_cluster_url_is_refused_in_one_line(command: str, bundle_dir: Path) -> None:
    """The must-show one-liner: a Redis Cluster URL, refused naming Sentinel."""
    done = _imgq(*_args(command, bundle_dir), IMGQ_BROKER_URL="redis+cluster://127.0.0.1:7000/0")
    line = _refusal(done, command)
    assert "Redis Cluster" in line and "Sentinel" in line


@pytest.mark.integration
@pytest.mark.parametrize("command", ["worker", "models"])
def test_a_plain_url_to_a_cluster_node_is_refused_in_one_line(
    command: str, cluster_node: LocalRedis, bundle_dir: Path
) -> None:
    """A redis:// URL that turns out to be a Cluster node: found on connecting, one line."""
    line = _refusal(_imgq(*_args(command, bundle_dir), IMGQ_BROKER_URL=cluster_node.url), command)
    assert "cluster_enabled:1" in line and "Sentinel" in line


@pytest.mark.integration
@pytest.mark.parametrize("command", ["worker", "models", "dlq", "backlog"])
def test_a_wrong_master_name_is_a_clear_error(
    command: str, group: LocalSentinels, bundle_dir: Path
) -> None:
    """The must-show one-liner: a sentinel URL with a master name no sentinel monitors; no
    password in anything printed."""
    done = _imgq(*_args(command, bundle_dir), IMGQ_BROKER_URL=_url(group),
                 IMGQ_BROKER_TRANSPORT_OPTIONS='{"master_name": "nope"}')  # fmt: skip
    line = _refusal(done, command)
    assert "monitors a master named 'nope'" in line and "they monitor: imgq" in line
    assert PASSWORD not in done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.parametrize("command", ["worker", "models"])
def test_a_sentinel_url_without_master_name_is_refused_in_one_line(
    command: str, bundle_dir: Path
) -> None:
    """Refused before anything connects, naming the option to set."""
    done = _imgq(*_args(command, bundle_dir), IMGQ_BROKER_URL="sentinel://127.0.0.1:1")
    assert f"master_name in {OPTIONS}" in _refusal(done, command)


@pytest.mark.integration
def test_backlog_reads_the_master_through_sentinel(group: LocalSentinels) -> None:
    """`imgq backlog` (and the exporter, on the same client) reads the master the sentinels
    name, with the master's password from the URL list."""
    master = group.master_port()
    assert master is not None
    group.client(master).lpush("imgq", b"not even a task")
    done = _imgq("backlog", "--json", IMGQ_BROKER_URL=_url(group),
                 IMGQ_BROKER_TRANSPORT_OPTIONS=json.dumps(group.transport_options))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ready"] == 1


@pytest.mark.integration
def test_health_ends_with_a_first_sentinel_that_never_answers(group: LocalSentinels) -> None:
    """The first sentinel of the list accepts connections and never answers (a stopped
    process, a half-open link): `imgq health` asks the next ones and ends (kombu gave the
    sentinels' connections no timeout, and Celery's broadcast hung for ever)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        first = f"sentinel://:{PASSWORD}@127.0.0.1:{silent.getsockname()[1]};"
        done = _imgq("health", "--timeout", "5", IMGQ_BROKER_URL=first + group.url,
                     IMGQ_BROKER_TRANSPORT_OPTIONS=json.dumps(group.transport_options))  # fmt: skip
    output = done.stdout + done.stderr
    assert "redis   ok" in output and "no imgq worker on the broker answered" in output, output
    assert PASSWORD not in output
