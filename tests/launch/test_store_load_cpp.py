"""The compiled control-plane load generator (benchmarks/store_load_gen.cpp) and the one
traffic description both generators replay (benchmarks/store_load_traffic.py)."""

import pytest

from benchmarks import store_load_cpp
from benchmarks import store_load_traffic as tr
from odyssey import contract


def test_schedule_matches_the_planes_rates():
    # 3 s at 0.5 s steps (5 steps), 64 ranks. Per rank: poll's periodic polls and its
    # step's 4 reads + 4 vote requests; notify: heartbeat and watcher period, the vote
    # (its step-boundary reads come in the decision: the last voter's 3 reads, 1/64
    # each); node: the vote only. Per node (node): its launcher's beat and relay slice.
    layout = tr.Layout(64, 8)
    per_rank = {}
    for name in tr.PLANES:
        ranks, nodes = tr.scheduled_requests(tr.plane_for(name), layout, 0.5, 3.0)
        per_rank[name] = (ranks / 64 / 3, nodes / 8 / 3)
    assert per_rank["poll"][0] == pytest.approx(122.7, abs=0.1)
    assert per_rank["notify"][0] == pytest.approx(18.1, abs=0.1)
    assert per_rank["node"] == pytest.approx((5 * (4 + 4 / 64) / 3, 4.33), abs=0.01)
    assert per_rank["poll"][1] == per_rank["notify"][1] == 0
    # the launcher loop adds the same per-node traffic under notify and node (its beat,
    # 2 watched nodes, the fence backstop, job status and spawns, the fence watch: 33/s
    # at 8 nodes, flat in nodes); the old loop (the fence counter each 20 ms, every other
    # node watched) 186/s at 8 nodes, growing with nodes
    loop = {p: tr.offered_per_s(tr.plane_for(p, True), layout, 0.5)[1]
            for p in ("poll", "notify", "notify-sliced")}
    assert loop["poll"] == loop["notify-sliced"] == pytest.approx(186.0)
    assert loop["notify"] == pytest.approx(33.0)
    big = tr.Layout(1024, 8)
    assert tr.offered_per_s(tr.plane_for("node", True), big, 0.5)[1] == pytest.approx(33.5)
    assert tr.offered_per_s(tr.plane_for("node-sliced", True), big, 0.5)[1] > 1500
    # the old planes' decision waits slice every 20 ms; the new ones are woken
    assert tr.plane_for("node-sliced").vote_slice_s == tr.POLL_S < tr.NODE.vote_slice_s


def test_spec_resolves_keys_from_the_contract():
    layout = tr.Layout(16, 8)
    spec = store_load_cpp.spec(layout, tr.plane_for("node", launcher_loop=True), 1234, 1.0, 0.5)
    roles = [c["role"] for c in spec["clients"]]
    # per node: a launcher loop and its fence watch (role 1), a notice relay (role 2)
    assert roles.count(0) == 16 and roles.count(1) == 4 and roles.count(2) == 2
    keys = {k for g in spec["groups"] for k in g}
    assert {contract.node_beat_key(1), contract.FENCES_COUNT, contract.fence_key(15),
            contract.fence_note_key(1)} <= keys
    assert tr.Templates.key(spec["templates"]["vote"], 3, 7) == contract.vote_key(0, 3, 7)
    # every client's periodic phase lies inside its period
    for c in spec["clients"]:
        for period, phase, _ in c["every"]:
            assert 0 <= phase < period


@pytest.mark.slow  # builds the extension (~1 min the first time), a server and a worker
@pytest.mark.timeout(600)
def test_compiled_generator_offers_the_load_at_8_ranks():
    if store_load_cpp.missing_tools():
        pytest.skip(f"no compiler: {store_load_cpp.missing_tools()}")
    from benchmarks.store_load import measure

    r = measure(8, "notify", seconds=2.0, step_s=0.5, engine="cpp")
    assert r["engine"] == "cpp" and r["ranks"] == 8
    assert 0.95 <= r["achieved_over_offered"] <= 1.05
    assert r["per_rank_per_s"] == pytest.approx(r["offered_requests_per_s"] / 8, rel=0.05)
    assert 0 < r["p50_ms"] <= r["p99_ms"] < 1000
    assert r["notice_to_all_seen_ms"] is not None
    assert r["notice_to_all_agreed_ms"] >= r["notice_to_all_seen_ms"]
    assert r["connect_s"] < 5  # no reverse-DNS stall (the numeric-names shim)
