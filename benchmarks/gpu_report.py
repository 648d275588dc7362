"""Append what benchmarks/gpu_check.sh measured to docs/BENCHMARKS.md, dated, with the
device, failures included (never edits earlier sections).

    python benchmarks/gpu_report.py runs/gpu_check --tests-rc 0 --bench-rc 0 \
        --doc docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _test_outcomes(log: Path) -> list[str]:
    """pytest -rA summary lines: PASSED/FAILED/SKIPPED/ERROR with the test id."""
    if not log.exists():
        return ["(no pytest log)"]
    pat = re.compile(r"^(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) ")
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if pat.match(ln)]
    return lines or [log.read_text(errors="replace").strip().splitlines()[-1]]


def render(out: Path, tests_rc: int, bench_rc: int) -> str:
    device = (out / "device.txt").read_text().strip() if (out / "device.txt").exists() else "?"
    rows = [json.loads(ln) for ln in (out / "figures.jsonl").read_text().splitlines()
            if ln.strip()] if (out / "figures.jsonl").exists() else []
    text = [f"\n## GPU checks, {time.strftime('%Y-%m-%d')} on {device}\n",
            "`bash benchmarks/gpu_check.sh` (real compute; tests exit "
            f"{tests_rc}, swap benchmark exit {bench_rc}).\n", "Tests:\n"]
    text += [f"- {ln}" for ln in _test_outcomes(out / "pytest.log")]
    text.append("\nFigures (one line per check, as the tests recorded them):\n")
    for r in rows:
        name = r.pop("check")
        for k in ("date", "device"):
            r.pop(k, None)
        text.append(f"- `{name}`: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
    bench = out / "swap_bench.json"
    if bench.exists():
        text.append("\nChameleon swap benchmark (`benchmarks/swap_bench.py --device cuda "
                    "--steps 3`), raw result:\n\n```json")
        text.append(json.dumps(json.loads(bench.read_text()), default=str)[:6000])
        text.append("```")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="gpu_check.sh's output folder")
    ap.add_argument("--tests-rc", type=int, default=-1)
    ap.add_argument("--bench-rc", type=int, default=-1)
    ap.add_argument("--doc", type=Path, default=None, help="append to this markdown file")
    a = ap.parse_args(argv)
    section = render(a.out, a.tests_rc, a.bench_rc)
    print(section)
    if a.doc is not None:
        with open(a.doc, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
