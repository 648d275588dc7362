"""Docs that run: every fenced shell block in README.md and docs/*.md marked runnable is
executed, so the commands the docs show cannot rot.

Mark a block by putting `<!-- runnable -->` on the line before its opening fence. It runs
with `bash -euo pipefail` in a fresh directory holding a link to `examples/`, with the
virtualenv's `odyssey` first on PATH, each block under its own timeout. To keep the
suite quick, every `--steps N` in a runnable block is capped at DOCS_MAX_STEPS; write
`<!-- runnable as-is -->` for a block that must run exactly as shown.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS_MAX_STEPS = 8
MARK = re.compile(r"^<!--\s*runnable(?P<as_is>\s+as-is)?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
SHELLS = {"bash", "sh", "shell", "console", ""}


def runnable_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, script, as_is) of each block marked runnable in `path`."""
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        mark = MARK.match(line.strip())
        fence = FENCE.match(lines[i + 1].strip())
        if not mark or not fence:
            continue
        if fence.group("lang") not in SHELLS:
            raise AssertionError(f"{path}:{i + 1}: runnable block is not a shell block")
        body = []
        for text in lines[i + 2:]:
            if text.strip().startswith("```"):
                break
            body.append(text)
        out.append((i + 1, "\n".join(body) + "\n", bool(mark.group("as_is"))))
    return out


def shrink(script: str) -> str:
    return re.sub(r"--steps(\s+|=)(\d+)",
                  lambda m: f"--steps{m.group(1)}{min(int(m.group(2)), DOCS_MAX_STEPS)}",
                  script)


DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(p, line, script, as_is) for p in DOC_FILES for line, script, as_is in
          runnable_blocks(p)]


def test_docs_have_runnable_blocks():
    assert BLOCKS, "no block in README.md or docs/*.md is marked runnable"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path,line,script,as_is", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in BLOCKS])
def test_doc_block_runs(tmp_path, path, line, script, as_is):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script if as_is else shrink(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (f"{path.relative_to(ROOT)}:{line} failed "
                                  f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
