"""worker.logs.mask_url: no Redis password reaches a log line or printed setting, wherever the URL
carries it (user part, query string, or a password that breaks the URL's syntax), and the rest
of the URL stays readable."""

from __future__ import annotations

import json
import logging

import pytest

from imgq.worker.logs import JsonFormatter, mask_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://user:s3cret@redis:6380/1", "rediss://user:***@redis:6380/1"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://:s3cret@Redis.Internal/0", "redis://:***@Redis.Internal/0"),
        ("unix://:s3cret@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0?password=***"),
        ("redis://redis/0?db=1&password=s3cret", "redis://redis/0?db=1&password=***"),
        (
            "redis://redis/0?PASSWORD=s3cret&socket_timeout=5&Password=again",
            "redis://redis/0?PASSWORD=***&socket_timeout=5&Password=***",
        ),
        ("redis://redis/0?pass%77ord=s3cret", "redis://redis/0?pass%77ord=***"),
        (
            "rediss://u:s3cret@redis/0?ssl_cert_reqs=none&password=s3cret",
            "rediss://u:***@redis/0?ssl_cert_reqs=none&password=***",
        ),
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock?password=***"),
        ("redis://:pa#s3cret@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://user:pa/s3cret@redis/0?password=x", "redis://***@redis/0?password=***"),
        ("redis://:pa?s3cret@redis", "redis://***@redis"),
        ("redis://[::1:s3cret@redis/0", "redis://[:***@redis/0"),
    ],
)
def test_passwords_are_masked_and_the_rest_kept(url: str, expected: str) -> None:
    """Every password is replaced by *** (user part, query parameter of any case, a password
    with unencoded '#', '/' or '?'); host, port, database and the other parameters stay as
    written."""
    assert mask_url(url) == expected
    assert "s3cret" not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://redis.internal:6380/1?ssl_cert_reqs=required",
        "redis://user@redis/0",
        "unix:///run/redis.sock?db=0",
        "redis://redis/0?password=",
        "redis://redis/0?passwords=list&old_password",
        "redis://redis/0?client_name=a@b",
    ],
)
def test_urls_without_a_password_are_unchanged(url: str) -> None:
    """Nothing secret, nothing touched: the URL comes back exactly as written (no re-encoding,
    no 'unix:/' for 'unix:///')."""
    assert mask_url(url) == url


@pytest.mark.parametrize(
    "url", ["redis://[::1/0", "redis://host:port/0", "not a url ]", "[::1", "", "redis://"]
)
def test_what_is_not_a_url_comes_back_unchanged(url: str) -> None:
    """mask_url runs in error paths (a setting that is not a valid URL): it must not raise,
    and with no password in sight it changes nothing."""
    assert mask_url(url) == url


def test_masked_url_in_a_json_log_line() -> None:
    """The way the worker logs it: the JSON line holds the masked URL only."""
    url = "redis://:s3cret@redis:6379/0?password=s3cret"
    record = logging.makeLogRecord(
        {"msg": "waiting for Redis at %s", "args": (mask_url(url),), "levelname": "WARNING"}
    )
    line = JsonFormatter().format(record)
    assert "s3cret" not in line
    assert json.loads(line)["msg"] == "waiting for Redis at redis://:***@redis:6379/0?password=***"
