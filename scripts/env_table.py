"""Rewrite the configuration reference tables of README.md and docs/operations.md from
imgq.worker.settings (tests/test_compose.py checks that they match).

    .venv/bin/python scripts/env_table.py
"""

from __future__ import annotations

import re
from pathlib import Path

from imgq.worker.settings import ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/operations.md")


def main() -> int:
    table = [f"| `{name}` | {d} | {meaning} |" for name, (d, meaning) in ENV_VARS.items()]
    for doc in DOCS:
        path = ROOT / doc
        head, rest = path.read_text().split("\n## Configuration reference\n", 1)
        section, sep, tail = rest.partition("\n## ")
        lines = section.split("\n")
        rows = [i for i, line in enumerate(lines) if re.match(r"^\| `IMGQ_\w+` \|", line)]
        lines[rows[0] : rows[-1] + 1] = table
        path.write_text(head + "\n## Configuration reference\n" + "\n".join(lines) + sep + tail)
        print(f"rewrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
