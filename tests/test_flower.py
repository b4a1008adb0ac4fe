"""Flower as docker-compose.yml runs it: the command, environment and health check that
`docker-compose config` renders, run for real (`celery flower` from PyPI, as in the image, on a
private redis-server). Only the port changes (a free one wherever the service names its own)
and the address (loopback, where compose publishes the port on the host).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgq.localredis import LocalRedis, free_port
from tests.test_compose import BASE, _config, needs_compose

pytestmark = [pytest.mark.integration, needs_compose]

#: Longest Flower may take to answer its first request (it imports Celery and Tornado).
START_TIMEOUT_S = 60.0
CREDENTIALS = "ops:correct horse battery staple"


def _container_port(service: dict[str, Any]) -> str:
    """The port inside the container, from the published `127.0.0.1:5555:5555/tcp`."""
    return str(service["ports"][0].split(":")[-1].split("/")[0])


class Flower:
    """One `celery flower` process running a rendered compose service."""

    def __init__(self, service: dict[str, Any], log: Path) -> None:
        self.port = free_port()
        container_port = _container_port(service)

        def moved(value: Any) -> str:
            # `config` writes a literal $ as $$, which the container is given as $.
            text = str(value).replace("$$", "$")
            return re.sub(rf"\b{container_port}\b", str(self.port), text)

        # The container's environment: the service's, with the image's PATH (celery, python).
        self.env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(log.parent),
            **{k: moved(v) for k, v in service["environment"].items()},
            "FLOWER_ADDRESS": "127.0.0.1",
        }
        self.healthcheck = [moved(a) for a in service["healthcheck"]["test"]]
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [moved(a) for a in service["command"]], env=self.env, cwd=log.parent,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.get("/healthcheck") != 200:  # answers without credentials, once serving
                assert self.process.poll() is None, f"flower exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"flower never answered:\n{log.read_text()}"
                time.sleep(0.2)
        except BaseException:
            self.stop()  # not left running for the fixture, which never saw it
            raise

    def get(self, path: str, credentials: str | None = None) -> int | None:
        """The HTTP status of GET ``path`` (None: no answer yet)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if credentials is not None:
            token = base64.b64encode(credentials.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def healthy(self) -> bool:
        """Whether the service's health check, run as Docker runs it, passes."""
        kind, *args = self.healthcheck
        argv = ["sh", "-c", args[0]] if kind == "CMD-SHELL" else args
        proc = subprocess.run(argv, env=self.env, capture_output=True, timeout=30)
        return proc.returncode == 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def flowers(tmp_path: Path) -> Iterator[list[Flower]]:
    started: list[Flower] = []
    yield started
    for flower in started:
        flower.stop()


def _flower_service(redis_server: LocalRedis, **variables: str) -> dict[str, Any]:
    rendered = _config(BASE, {"IMGQ_BROKER_URL": redis_server.url, **variables})
    return dict(rendered["services"]["flower"])


def test_flower_serves_without_credentials_by_default(redis_server, flowers, tmp_path) -> None:
    """FLOWER_BASIC_AUTH unset: Flower's pages answer without credentials, and it is healthy
    (its port is published on the host's loopback only)."""
    service = _flower_service(redis_server)
    assert service["ports"] == ["127.0.0.1:5555:5555/tcp"]
    flower = Flower(service, tmp_path / "flower.log")
    flowers.append(flower)
    assert flower.get("/") == 200, "Flower refuses its pages with no FLOWER_BASIC_AUTH set"
    assert flower.get("/workers") == 200
    assert flower.healthy()


def test_flower_asks_for_the_credentials_set(redis_server, flowers, tmp_path) -> None:
    """FLOWER_BASIC_AUTH set: pages answer 401 without them or with wrong ones, 200 with them;
    the health check passes (it sends them)."""
    flower = Flower(
        _flower_service(redis_server, FLOWER_BASIC_AUTH=CREDENTIALS), tmp_path / "flower.log"
    )
    flowers.append(flower)
    assert flower.get("/") == 401
    assert flower.get("/", "ops:wrong") == 401
    assert flower.get("/", CREDENTIALS) == 200
    assert flower.healthy()


def test_health_check_fails_on_a_flower_that_refuses_everything(
    redis_server, flowers, tmp_path
) -> None:
    """A Flower that answers 401 to every page (here: started with an empty credential, as the
    compose file once did) fails the health check, though its /healthcheck answers OK."""
    service = _flower_service(redis_server)
    # Flower itself, with no shell between: FLOWER_BASIC_AUTH="" reaches it.
    service["command"] = ["celery", "flower", f"--port={_container_port(service)}"]
    service["environment"]["FLOWER_BASIC_AUTH"] = ""
    flower = Flower(service, tmp_path / "flower.log")
    flowers.append(flower)
    assert flower.get("/") == 401 and flower.get("/healthcheck") == 200
    assert not flower.healthy()
