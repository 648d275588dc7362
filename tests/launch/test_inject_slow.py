"""`odyssey inject --kind slow --factor F [--until U]`: a persistent slowdown is checked,
signed with the job token and written where the ranks poll for requests."""

from __future__ import annotations

from launch.cli import main as odyssey
from odyssey import contract
from odyssey.control import verify
from odyssey.faults import FaultSpec
from tests.launch.live_store import live_store


def test_inject_a_persistent_slowdown(tmp_path, capsys):
    with live_store(tmp_path) as (store, token):
        base = ["inject", "--run-dir", str(tmp_path), "--rank", "1", "--kind", "slow"]
        assert odyssey([*base, "--factor", "3", "--at-step", "4", "--until", "9"]) == 0
        assert "3x slowdown into rank 1 from step 4 until step 9" in capsys.readouterr().out
        key = contract.inject_key(0)
        spec = FaultSpec.parse(verify(token, key, store.get(key).decode()))
        assert (spec.kind, spec.rank, spec.step, spec.factor, spec.until) == (
            "slow", 1, 4, 3.0, 9)
        # refused before anything is written
        assert odyssey([*base, "--factor", "0.5"]) == 2
        assert "factor must be >= 1" in capsys.readouterr().err
        assert odyssey([*base, "--factor", "2", "--at-step", "5", "--until", "5"]) == 2
        assert "until must be > step" in capsys.readouterr().err
        assert odyssey([*base, "--until", "7"]) == 2
        assert "until= needs factor=" in capsys.readouterr().err
        assert odyssey(["inject", "--run-dir", str(tmp_path), "--rank", "1", "--kind", "kill",
                        "--factor", "2"]) == 2
        assert store.add(contract.INJECT_COUNT, 0) == 1
        # the one-off delay is unchanged
        assert odyssey([*base, "--delay", "0.5"]) == 0
        key = contract.inject_key(1)
        once = FaultSpec.parse(verify(token, key, store.get(key).decode()))
        assert not once.persistent and once.delay == 0.5
