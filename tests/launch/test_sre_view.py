"""What an SRE sees of a live job, in one run with a SIGKILL: `odyssey status --json` and
the Prometheus endpoint node 0's launcher serves, before and after the recovery, and the
final state once the job has ended.

One job (3 ranks, data parallel, emulated compute) is scraped while it trains; a rank is
made 3x slower for a while with `odyssey inject --kind slow --factor 3 --until U` (it must
show as a straggler in the status and the gauge, then be cleared); then a rank is killed
with `odyssey inject`: the status must show the recovery within about a second of the
decision, the counters must move (recoveries_total, generation, MTTR histogram) and the
job must still finish with nothing lost.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from launch import prometheus
from launch.cli import main as odyssey
from launch.live_job import connect_job
from odyssey import contract
from tests.helpers import odyssey_in_background

pytestmark = [pytest.mark.slow,  # starts an `odyssey run` job
              pytest.mark.skipif(not prometheus.available(),
                                 reason="prometheus_client (the `prom` extra) not installed")]

ARGS = ["--mode", "emulated", "--dp", "3", "--steps", "260", "--num-microbatches", "3",
        "--microbatch-size", "1", "--emu-num-layers", "2", "--emu-forward-ms", "4",
        "--emu-backward-ms", "8", "--log-every", "1000", "--progress", "off",
        "--prometheus-addr", "127.0.0.1:0",
        # worked around in place, not parked (a parked rank leaves the plan: its status
        # entry reads "parked"; tests/odyssey/test_park.py)
        "--straggler.no-park"]


def _status(run_dir, capsys) -> dict | None:
    assert odyssey(["status", "--run-dir", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _scrape(endpoint: str) -> dict[str, float]:
    """Every sample of the endpoint: {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _until(what, timeout_s: float, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.mark.timeout(300)
def test_status_and_prometheus_follow_a_recovery(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with odyssey_in_background(3, run_dir, "train_gpt.py", ARGS) as job:
        _until(lambda: job.poll() is not None or (run_dir / contract.METRICS_FILE).exists(),
               120)
        assert job.poll() is None, job.stdout.read()[-3000:]
        before = _until(lambda: (s := _status(run_dir, capsys)) and s.get("step", 0) >= 5
                        and s, 60)
        assert before["generation"] == 0 and len(before["members"]) == 3
        assert before["plan"]["pipelines"] == 3 and before["steps_per_s"] > 0
        assert before["members"][0]["node"] == 0 and before["members"][0]["host"]  # spawn records

        # the endpoint, announced in the store once the launcher serves it
        endpoint = _until(lambda: _endpoint(run_dir), 30)
        m0 = _until(lambda: (m := _scrape(endpoint)).get("odyssey_step", 0) > 0 and m, 30)
        assert m0["odyssey_generation"] == 0 and m0["odyssey_alive_ranks"] == 3
        assert m0["odyssey_mttr_seconds_count"] == 0
        assert not any(k.startswith("odyssey_recoveries_total") for k in m0)

        # a persistent slowdown injected live: found as a straggler, shown, then cleared
        # (60 steps: on a loaded machine detection can come late in a shorter slowdown,
        # and the gauge must still be there to scrape)
        until = before["step"] + 60
        assert odyssey(["inject", "--run-dir", str(run_dir), "--rank", "1", "--kind", "slow",
                        "--factor", "3", "--until", str(until)]) == 0
        capsys.readouterr()
        slow = _until(lambda: (s := _status(run_dir, capsys))["stragglers"] and s, 60)
        assert [(x["rank"], x["reference"]) for x in slow["stragglers"]] == [(1, "replicas")]
        assert slow["stragglers"][0]["factor"] > 2 and slow["step"] < until
        gauge = 'odyssey_straggler_factor{rank="1"}'
        assert _until(lambda: _scrape(endpoint).get(gauge), 10) > 2
        _until(lambda: not _status(run_dir, capsys)["stragglers"], 150)  # 60 slow steps
        assert gauge not in _until(lambda: (m := _scrape(endpoint)).get(gauge) is None and m, 10)

        assert odyssey(["inject", "--run-dir", str(run_dir), "--rank", "2",
                        "--kind", "kill", "--phase", "backward"]) == 0
        capsys.readouterr()
        seen = _until(lambda: (s := _status(run_dir, capsys))["generation"] == 1 and s, 60, 0.05)
        lag = time.time() - seen["last_recovery"]["time"]
        assert lag < 1.5, f"status showed the recovery {lag:.2f}s after the decision"
        assert seen["last_recovery"]["ranks_lost"] == [2]
        assert sorted(m["rank"] for m in seen["members"]) == [0, 1]
        done = _until(lambda: (s := _status(run_dir, capsys))["last_recovery"]["mttr_s"]
                      and s, 30)
        assert set(done["last_recovery"]["phases"]) == {
            "detect", "agree", "plan", "rebuild", "migrate", "first_step"}
        kind = done["last_recovery"]["chosen"]
        assert done["recovery_counts"] == [{"kind": kind, "cause": "failure", "count": 1}]

        m1 = _until(lambda: (m := _scrape(endpoint))["odyssey_mttr_seconds_count"] >= 1 and m,
                    30)
        assert m1[f'odyssey_recoveries_total{{cause="failure",kind="{kind}"}}'] == 1
        assert m1["odyssey_generation"] == 1 and m1["odyssey_alive_ranks"] == 2
        assert m1["odyssey_step"] > m0["odyssey_step"]
        assert m1["odyssey_mttr_seconds_sum"] == pytest.approx(done["last_recovery"]["mttr_s"])
        assert m1["odyssey_detection_delay_seconds_count"] == 1
        out, _ = job.communicate(timeout=150)
    assert job.returncode == 0, out[-3000:]
    # ended: the final state, from the run directory
    final = _status(run_dir, capsys)
    assert final["state"] == "finished" and final["step"] == 259 and final["generation"] == 1
    report = json.loads((run_dir / contract.REPORT_FILE).read_text())
    assert report["samples"]["lost"] == 0 and report["samples"]["duplicated"] == 0
    assert report["replicas_identical"] is True
    assert [(e["kind"], e["rank"]) for e in report["events"] if "straggler" in e["kind"]] == [
        ("straggler", 1), ("straggler_cleared", 1)]


def _endpoint(run_dir) -> str | None:
    store, _ = connect_job(run_dir)
    if store.check([contract.METRICS_ENDPOINT]):
        return store.get(contract.METRICS_ENDPOINT).decode()
    return None
