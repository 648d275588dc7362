"""`odyssey report` on a real run with a real kill, plus TensorBoard and the progress line.

One short job (tiny GPT, 3 ranks under `odyssey run`, rank 2 SIGKILLed at step 3,
`--tensorboard`, plain progress lines every step) feeds every check: the PNG exists with
the pixel size asked for; TensorBoard holds the same losses as metrics.jsonl and the
recovery's MTTR; the progress lines show the plan change; malformed inputs give errors
that name the file and the field.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest

from launch.cli import main as odyssey
from odyssey.report import read_jsonl
from odyssey.report_plot import ReportError, png_size, render
from tests.helpers import run_odyssey

STEPS = 8
HAVE_TB = importlib.util.find_spec("tensorboard") is not None
TINY = ["--gpt-vocab-size", "32", "--gpt-seq-len", "16", "--gpt-d-model", "32",
        "--gpt-n-heads", "2", "--gpt-n-blocks", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, worker stdout) of one real job with a kill and a recovery."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    args = ["--dp", "3", "--pp", "1", "--num-microbatches", "6", "--microbatch-size", "2",
            "--steps", str(STEPS), "--log-every", "100",
            "--inject", "kill:rank=2,step=3,phase=backward",
            *(["--tensorboard"] if HAVE_TB else []),
            "--progress", "plain", "--progress-every-s", "0", *TINY]
    proc = run_odyssey(3, run_dir, "train_gpt.py", args, ["--finish-grace", "20"],
                       timeout=150)
    return run_dir, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_report_png_has_the_requested_size(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "r.png"
    assert odyssey(["report", str(run_dir), "-o", str(out), "--width", "8", "--height", "6",
                    "--dpi", "50"]) == 0
    assert png_size(out) == (400, 300)
    assert "(400x300 px)" in capsys.readouterr().out
    default = render(run_dir)  # RUN_DIR/report.png at 12 x 9 in, 100 dpi
    assert default == run_dir / "report.png" and png_size(default) == (1200, 900)
    assert 10_000 < default.stat().st_size < 400_000  # a real picture, not an empty canvas


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not HAVE_TB, reason="tensorboard is not installed")
def test_tensorboard_mirrors_metrics_and_recovery(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    losses = {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(tb) == list(range(STEPS))
    assert all(abs(tb[k] - losses[k]) <= 1e-6 * abs(losses[k]) for k in tb)  # float32
    [event] = [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "recovery"]
    [mttr] = acc.Scalars("recovery/mttr_s")
    assert mttr.step == event["resume_step"] and abs(mttr.value - event["mttr_s"]) < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_progress_lines_show_steps_eta_and_plan_change(run):
    _, out = run
    lines = [ln for ln in out.splitlines() if " | plan " in ln]
    pat = re.compile(r"\[gen (\d) step (\d+) rank 0\] (\d+)/8 +\d+% \| loss \d+\.\d{4} \| "
                     r"[\d.]+ samples/s \| ETA \d+:\d\d \| plan (\w+) (\S+) stages, (\d) ranks")
    parsed = [pat.fullmatch(ln) for ln in lines]
    assert all(parsed), lines
    steps = [int(m[2]) for m in parsed]
    assert steps[-1] == STEPS - 1 and steps == sorted(steps)
    first, last = parsed[0], parsed[-1]
    assert (first[1], first[4], first[5], first[6]) == ("0", "initial", "1+1+1", "3")
    assert last[1] == "1" and last[4] != "initial" and last[6] == "2"


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("file, edit, message", [
    ("report.json", lambda r: "{oops", r"report.json: not JSON"),
    ("report.json", lambda r: {**r, "steps": "eight"}, r"report.json: field 'steps' must be int"),
    ("report.json", lambda r: {**r, "events": [{**r["events"][0], "phases": {
        **r["events"][0]["phases"], "agree": "slow"}}]},
     r"events\[0\].phases: field 'agree' must be int/float, got 'slow'"),
    ("report.json", lambda r: {k: v for k, v in r.items() if k != "samples"},
     r"report.json: missing field 'samples'"),
    ("metrics.jsonl", None, r"metrics.jsonl line 2: missing field 'loss'"),
    ("events.jsonl", None, r"events.jsonl line 1: field 'mttr_s' must be int/float"),
])
def test_malformed_run_files_give_clear_errors(run, tmp_path, capsys, file, edit, message):
    src, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(src, bad, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.png"))
    path = bad / file
    if file == "report.json":
        new = edit(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    else:
        recs = read_jsonl(path)
        if file == "metrics.jsonl":
            del recs[1]["loss"]
        else:
            recs[0]["mttr_s"] = "n/a"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ReportError, match=message):
        render(bad)
    assert odyssey(["report", str(bad)]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (bad / "report.png").exists()


def test_missing_run_dir_is_explained(tmp_path, capsys):
    assert odyssey(["report", str(tmp_path / "nope")]) == 1
    assert "report.json does not exist" in capsys.readouterr().err


def test_cli_lists_report(capsys):
    assert odyssey(["--help"]) == 0
    assert re.search(r"report\s+Render a run as a PNG", capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_straggler_events_are_drawn_and_checked(run, tmp_path):
    src, _ = run
    d = tmp_path / "slow"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.png"))
    t = read_jsonl(d / "metrics.jsonl")[4]["time"]
    found = {"kind": "straggler", "time": t, "step": 4, "rank": 1, "factor": 3.1,
             "since_step": 2, "reference": "replicas"}
    cleared = {**found, "kind": "straggler_cleared", "time": t + 0.5, "step": 6, "factor": 1.1}
    report = json.loads((d / "report.json").read_text())
    report["events"] += [found, cleared]
    (d / "report.json").write_text(json.dumps(report))
    with open(d / "events.jsonl", "a") as f:
        f.write(json.dumps(found) + "\n" + json.dumps(cleared) + "\n")
    assert png_size(render(d, d / "r.png", 8, 6, 50)) == (400, 300)
    report["events"][-1] = {**cleared, "rank": "one"}
    (d / "report.json").write_text(json.dumps(report))
    (d / "events.jsonl").unlink()  # the report's events are then the ones checked
    with pytest.raises(ReportError, match=r"field 'rank' must be int, got 'one'"):
        render(d, d / "r.png")
