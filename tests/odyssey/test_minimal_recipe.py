"""`examples/pretrain_minimal.py`: every recipe feature from a user script under 60 lines,
with no monkeypatch and no private name, trained through a SIGKILL and exported."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import ROOT
from tests.helpers import run_odyssey

SCRIPT = ROOT / "examples" / "pretrain_minimal.py"


def test_the_script_is_short_and_uses_public_names_only():
    text = SCRIPT.read_text()
    assert len(text.splitlines()) < 60
    code = re.sub(r'""".*?"""', "", text, flags=re.S)  # docstrings may say anything
    assert not re.search(r"\._[a-z]", code), "a private attribute"
    assert "monkeypatch" not in code and "setattr" not in code


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_the_script_trains_through_a_kill_and_exports(corpus, tmp_path):
    pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    args = ["--data", str(corpus), "--dp", "2", "--pp", "2", "--steps", "8",
            "--num-microbatches", "2", "--microbatch-size", "2", "--eval-every", "4",
            "--eval-microbatches", "2", "--warmup-steps", "2", "--log-every", "100",
            "--inject", "kill:rank=3,step=5,phase=backward"]
    run_odyssey(4, run_dir, SCRIPT.name, args, ["--finish-grace", "20"], 240)
    report = json.loads((run_dir / "report.json").read_text())
    s = report["samples"]
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["trained"] == s["expected"]
    assert report["replicas_identical"] is True
    assert [e["ranks_lost"] for e in report["events"] if e["kind"] == "recovery"] == [[3]]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(8))
    assert metrics[0]["lr"] < metrics[1]["lr"] > metrics[7]["lr"]  # warmup, then decay
    assert all(m["grad_norm"] > 0 for m in metrics)
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 7]
    assert (run_dir / "checkpoints" / "step_00000007").is_dir()  # the end is saved

    from transformers import AutoModelForCausalLM

    from launch.export import main as export_main
    assert export_main([str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == 4
