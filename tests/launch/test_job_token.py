"""The job token: control commands without its HMAC are refused, and the job carries on.

Anyone who can reach a job's store port can write keys. One live job (2 ranks, emulated
compute) gets, straight into its store, an unsigned kill, a kill signed with the wrong
token, an unsigned fence and an unsigned replacement request; `odyssey inject` with a
wrong token is refused with exit 2. The job must finish as if nothing had happened: no
recovery, no rank killed or fenced, no replacement started, one log line per refusal.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from launch.cli import main as odyssey
from launch.run_files import read_launcher_file
from odyssey import contract
from odyssey.control import sign
from tests.helpers import odyssey_in_background

pytestmark = pytest.mark.slow  # starts an `odyssey run` job

ARGS = ["--mode", "emulated", "--dp", "2", "--steps", "300", "--num-microbatches", "2",
        "--microbatch-size", "1", "--emu.num-layers", "2", "--log-every", "1000"]


def _lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _forge(store: TCPStore, counter: str, key_of, value_of) -> str:
    """Write a control command the way an intruder on the network would."""
    key = key_of(store.add(counter, 1) - 1)
    store.set(key, value_of(key))
    return key


@pytest.mark.timeout(200)
def test_forged_control_commands_are_ignored_and_a_wrong_token_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    metrics = run_dir / contract.METRICS_FILE
    with odyssey_in_background(2, run_dir, "train_gpt.py", ARGS) as job:
        deadline = time.monotonic() + 90
        while _lines(metrics) < 2:
            assert time.monotonic() < deadline and job.poll() is None, "no training steps"
            time.sleep(0.1)
        wrong = "0" * 64
        assert odyssey(["inject", "--run-dir", str(run_dir), "--rank", "1", "--kind", "kill",
                        "--token", wrong]) == 2
        assert "refused: the token is not this job's" in capsys.readouterr().err

        info = read_launcher_file(str(run_dir))
        store = TCPStore(info["store_addr"], info["store_port"], is_master=False,
                         timeout=timedelta(seconds=10))
        forged = [
            _forge(store, contract.INJECT_COUNT, contract.inject_key,
                   lambda key: "kill:rank=1,step=-1,phase=step"),
            _forge(store, contract.INJECT_COUNT, contract.inject_key,
                   lambda key: sign(wrong, key, "kill:rank=0,step=-1,phase=backward")),
            _forge(store, contract.SPAWN_COUNT, contract.spawn_key,
                   lambda key: json.dumps({"node": 0, "reason": "forged"})),
        ]
        fence = contract.fence_key(1)
        store.set(fence, "forged fence")
        seen = _lines(metrics)
        while _lines(metrics) < seen + 5:  # every rank has polled its inject keys since
            assert time.monotonic() < deadline + 60 and job.poll() is None, "job stalled"
            time.sleep(0.1)
        del store
        out, _ = job.communicate(timeout=150)
    assert job.returncode == 0, out[-3000:]
    report = json.loads((run_dir / contract.REPORT_FILE).read_text())
    assert [e for e in report["events"] if e["kind"] == "recovery"] == [], out[-3000:]
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    final = read_launcher_file(str(run_dir))
    assert sorted(final["exits"]) == ["0", "1"]  # no replacement worker was started
    assert all(e["exitcode"] == 0 for e in final["exits"].values())
    assert final["fenced"] == {}
    # each rank refuses each forged inject once; the launcher its fence and spawn request
    for key in forged[:2]:
        assert out.count(f"ignoring {key}") == 2, out[-3000:]
    assert out.count(f"ignoring {forged[2]}") == 1
    assert out.count(f"ignoring {fence}") == 1
