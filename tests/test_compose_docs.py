"""The compose commands the README, docs/ and the deployment files show, checked against the
docker-compose that Debian ships (1.29.2, `docker-compose`; bookworm has no `docker compose`
plugin): each command line is parsed by that docker-compose's own command-line parser, as
`docker-compose ...` would parse it, without running anything.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.test_compose import _COMPOSE, needs_compose

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    {ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("docker-compose*.yml"),
     *ROOT.glob("docker/*.yml"), *ROOT.glob("docker/Dockerfile*")}
)  # fmt: skip
#: A compose command: from `docker-compose` or `docker compose` to the end of the shell
#: command (a pipe, `;`, `&&`, a closing `$(...)`, the end of a code span, a comment).
_COMMAND = re.compile(r"\bdocker(-| )compose\b([^|;&)`#\n]*)")

# Run by the interpreter of docker-compose: its own parser, as compose.cli.main.dispatch uses it.
_PARSE = """
import json, sys
from compose.cli.docopt_command import DocoptDispatcher
from compose.cli.main import TopLevelCommand
errors = []
for argv in json.load(sys.stdin):
    try:
        DocoptDispatcher(TopLevelCommand, {"options_first": True}).parse(argv)
        errors.append(None)
    except BaseException as exc:  # docopt exits with the help text; NoSuchCommand
        usage = [ln for ln in str(exc).splitlines() if ln.startswith("Usage:")]
        errors.append(f"{type(exc).__name__}: {(usage or [str(exc)])[0][:300]}")
json.dump(errors, sys.stdout)
"""


def compose_commands() -> list[tuple[str, str, str]]:
    """``(where, spelling, arguments)`` of every compose command with arguments in the
    documents: ``where`` is ``file:line``, ``spelling`` ``-`` (v1) or `` `` (v2's plugin)."""
    found = []
    for path in DOCUMENTS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in _COMMAND.finditer(line):
                arguments = match.group(2).strip()
                if re.match(r"[a-z-]", arguments):  # a command, not the name in prose
                    where = f"{path.relative_to(ROOT)}:{number}"
                    found.append((where, match.group(1), arguments))
    return found


def _v1_parse_errors(argvs: list[list[str]]) -> list[str | None]:
    assert _COMPOSE is not None
    interpreter = Path(_COMPOSE).read_text(errors="replace").splitlines()[0].removeprefix("#!")
    proc = subprocess.run(
        [*interpreter.split(), "-c", _PARSE], input=json.dumps(argvs),
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return list(json.loads(proc.stdout))


def _argv(arguments: str) -> list[str]:
    """The words of a documented command line; a placeholder like N stays a word."""
    words = re.findall(r'"[^"]*"|\'[^\']*\'|\S+', arguments)
    return [w[1:-1] if w[:1] in "'\"" and w[-1:] == w[:1] else w for w in words]


def test_documents_show_compose_commands() -> None:
    """The extraction finds the commands (so the checks below have something to check)."""
    commands = compose_commands()
    assert len(commands) >= 15
    assert any("README.md" in where for where, _, _ in commands)


def test_compose_commands_are_spelled_for_debians_docker_compose() -> None:
    """Commands are written `docker-compose ...`: Debian bookworm's docker-compose is v1 and
    has no `docker compose` (v2's plugin runs the same commands, as the docs say)."""
    v2 = [f"{where}: docker compose {args}" for where, spelling, args in compose_commands()
          if spelling == " "]  # fmt: skip
    assert not v2, "write these as `docker-compose ...`:\n" + "\n".join(v2)


@needs_compose
def test_compose_commands_parse_in_docker_compose_v1() -> None:
    """Every documented compose command (subcommand, options, their arguments) is accepted by
    docker-compose 1.29's own parser."""
    commands = compose_commands()
    errors = _v1_parse_errors([_argv(args) for _, _, args in commands])
    bad = [f"{where}: docker-compose {args}\n    {error}"
           for (where, _, args), error in zip(commands, errors, strict=True) if error]  # fmt: skip
    assert not bad, "docker-compose 1.29 refuses:\n" + "\n".join(bad)


@needs_compose
def test_a_documented_command_kills_one_worker() -> None:
    """docs/operations.md shows how to kill one worker replica (a crash, to watch redelivery
    and the lost-worker alert): v1's `docker-compose kill` has no way to pick a replica."""
    text = (ROOT / "docs" / "operations.md").read_text()
    kills = re.findall(r'^docker kill "\$\((docker-compose [^)]*)\)"', text, re.MULTILINE)
    assert kills, "docs/operations.md shows no command that kills one worker"
    listing = kills[0].split("|")[0].removeprefix("docker-compose").strip()
    assert _v1_parse_errors([_argv(listing)]) == [None], listing
    assert "-q" in listing.split() and "worker" in listing.split(), listing


@pytest.mark.parametrize(
    ("line", "expected"),
    [("`docker compose up -d --scale worker=4`", [("docs/x.md:1", " ", "up -d --scale worker=4")]),
     ('docker kill "$(docker-compose ps -q worker | head -n1)"',
      [("docs/x.md:1", "-", "ps -q worker")]),
     ("#   docker-compose logs worker   # comment", [("docs/x.md:1", "-", "logs worker")]),
     ("Docker's `docker compose` plugin reads it too", [])],
)  # fmt: skip
def test_compose_commands_are_found_where_they_are_written(
    line: str, expected: list[tuple[str, str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code spans, `$(...)` and comments end a command; the bare name in prose is none."""
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text(line + "\n")
    monkeypatch.setattr(f"{__name__}.DOCUMENTS", [doc])
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert compose_commands() == expected
