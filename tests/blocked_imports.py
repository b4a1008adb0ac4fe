"""Run code in a fresh interpreter where some packages cannot be imported: the proof that a
light part of imgq (the client, the launcher, ``imgq dlq``) needs none of the heavy ones."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

_PRELUDE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def run_without(blocked: Sequence[str], body: str) -> list[str]:
    """Run ``body`` with every package of ``blocked`` unimportable; assert it succeeds and that
    none of them got imported anyway; return the lines it printed."""
    epilogue = f"\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {list(blocked)!r}))\n"
    code = _PRELUDE.format(blocked=list(blocked)) + body + epilogue
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    *lines, loaded = out.stdout.splitlines()
    assert loaded == "[]", loaded
    return lines
