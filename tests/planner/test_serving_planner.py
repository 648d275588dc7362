"""Serving estimator: scheduler, KV memory, iteration cost, configuration search, GPU loss,
and a real continuous-batching server run checked against a full recompute."""

from __future__ import annotations

import pytest

from planner.serving.batching import (
    Request,
    Scheduler,
    SchedulerConfig,
    TraceConfig,
    generate_requests,
    percentile,
)
from planner.serving.estimator import (
    ServingCostConfig,
    ServingCostModel,
    ServingLayout,
    SLOError,
    simulate_trace,
)
from planner.serving.search import (
    ServeRecoveryConfig,
    ServeSearchConfig,
    SLOConfig,
    candidate_layouts,
    plan_gpu_loss,
    search_serving,
)
from profiler.profile import LinkFit
from tests.profiler.test_serving_profile import linear_profile


def _constant(iteration_s: float) -> dict:
    return dict(dense_s=[iteration_s] * 4, prefill_attn_s=[0.0] * 3,
                decode_step_s=[[iteration_s] * 3 for _ in range(6)], head_s=[0.0, 0.0])


def constant_profile(iteration_s: float = 0.01):
    """Every iteration takes exactly `iteration_s` (all in the dense table)."""
    return linear_profile(**_constant(iteration_s))


def test_simulated_trace_follows_the_batching_policy_exactly():
    reqs = [Request(0, 0.0, 10, 3), Request(1, 0.005, 10, 2)]
    res = simulate_trace(reqs, ServingCostModel(constant_profile()))
    assert [(r["kind"], r["prefill_lens"], r["decode_kv"]) for r in res.iterations] == [
        ("prefill", [10], []), ("mixed", [10], [11]), ("decode", [], [12, 11])]
    r0, r1 = res.records
    assert (r0.ttft_s, r1.ttft_s) == pytest.approx((0.01, 0.015))
    assert (r0.tpot_s, r1.tpot_s) == pytest.approx((0.01, 0.01))
    assert r0.finish_s == r1.finish_s == pytest.approx(0.03)


def test_wake_cost_is_charged_once_per_idle_wait():
    """The profile's wake_s lands on the first iteration after each idle wait only (a
    request arriving while the server is busy does not wait for it), and not at all with
    idle_wake=False (the CPU-clock server, which never sleeps)."""
    reqs = [Request(0, 0.001, 10, 2), Request(1, 0.1, 10, 2), Request(2, 0.105, 5, 1)]
    cost = ServingCostModel(linear_profile(**{**_constant(0.01), "wake_s": 0.002}))
    res = simulate_trace(reqs, cost)
    assert [r["after_idle"] for r in res.iterations] == [True, False, True, False]
    assert [r["duration_s"] for r in res.iterations] == pytest.approx([0.012, 0.01, 0.012, 0.01])
    assert res.iterations[3]["kind"] == "mixed"  # r2 joined r1's decode, no wake
    assert [r.ttft_s for r in res.records] == pytest.approx([0.012, 0.012, 0.122 - 0.105])
    assert res.records[0].tpot_s == pytest.approx(0.01)
    cold = simulate_trace(reqs, cost, idle_wake=False)
    assert [r.ttft_s for r in cold.records] == pytest.approx([0.01, 0.01, 0.12 - 0.105])
    assert [r["after_idle"] for r in cold.iterations] == [True, False, True, False]


def test_token_budget_kv_capacity_and_fcfs():
    reqs = [Request(0, 0.0, 10, 3), Request(1, 0.005, 10, 2), Request(2, 0.006, 1, 1)]
    cost = ServingCostModel(constant_profile())
    # 10 tokens per iteration: r1 (10) cannot join r0's decode, and r2 may not overtake it
    res = simulate_trace(reqs, cost, SchedulerConfig(max_batch_tokens=10))
    kinds = [(r["prefill_lens"], r["decode_kv"]) for r in res.iterations]
    assert kinds == [([10], []), ([], [11]), ([], [12]), ([10], []), ([1], [11])]
    # KV capacity 20 slots: r0 reserves 13, r1 (12) waits for r0 to finish
    res = simulate_trace(reqs[:2], cost, SchedulerConfig(kv_capacity_tokens=20))
    assert res.records[1].first_token_s == pytest.approx(0.04)
    with pytest.raises(ValueError, match="needs 13 KV slots"):
        Scheduler(reqs, SchedulerConfig(kv_capacity_tokens=12))
    with pytest.raises(ValueError, match="exceeds max_batch_tokens"):
        Scheduler([Request(0, 0, 600, 2)], SchedulerConfig(max_batch_tokens=512))


def test_kv_memory_and_capacity():
    prof = linear_profile(kv_bytes_per_token=1024.0, param_bytes=1e6)
    cfg = ServingCostConfig(memory_bytes_per_gpu=float(1 << 20))
    one, split = ServingCostModel(prof, 1, 1, cfg), ServingCostModel(prof, 2, 2, cfg)
    assert one.kv_memory_bytes(1000) == 1024 * 1000
    assert split.kv_memory_bytes(1000) == 256 * 1000  # heads over tp, blocks over pp
    assert split.kv_capacity_tokens() == int(((1 << 20) - 1e6 / 4) // 256)
    assert one.kv_capacity_tokens() == int(((1 << 20) - 1e6) // 1024)
    small = ServingCostConfig(memory_bytes_per_gpu=0.6e6)
    with pytest.raises(ValueError, match="does not fit"):
        ServingCostModel(prof, 1, 1, small).kv_capacity_tokens()
    assert ServingCostModel(prof, 2, 1, small).kv_capacity_tokens() > 0
    with pytest.raises(ValueError, match="does not divide n_heads"):
        ServingCostModel(prof, 3, 1)


def test_tensor_parallel_iteration_adds_two_allreduces_per_block():
    prof = linear_profile(overhead_s=2e-4, overhead_per_request_s=1e-5)
    link = LinkFit(5e-6, 1e9, [], "assumed")
    base = ServingCostModel(prof, 1, 1, ServingCostConfig(link=link))
    tp = ServingCostModel(prof, 4, 1, ServingCostConfig(link=link))
    pre, dec = [100], [50, 80]
    # one GPU: the decode-only iteration, plus the prompt's rows, attention and head row,
    # plus one prompt's overhead (the iteration's fixed cost is inside decode_step)
    one = (prof.decode_step(2, 130) + prof.dense(102) - prof.dense(2)
           + prof.prefill_attn(100) + prof.head(3) - prof.head(2) + 1e-5)
    assert base.iteration_from_shape(pre, dec) == pytest.approx(one)
    assert base.iteration_from_shape([100], []) == pytest.approx(
        2e-4 + 1e-5 + prof.dense(100) + prof.prefill_attn(100) + prof.head(1))
    assert base.iteration_from_shape([], dec) == pytest.approx(prof.decode_step(2, 130))
    host = 2e-4 + 3 * 1e-5  # host-side overhead does not shrink with tp
    tokens_bytes = (100 + 2) * 64 * 4.0
    expected = host + (one - host) / 4 + 2 * 2 * link.ring_allreduce_s(tokens_bytes, 4)
    assert tp.iteration_from_shape(pre, dec) == pytest.approx(expected)
    pp = ServingCostModel(prof, 1, 2, ServingCostConfig(link=link))
    assert pp.iteration_from_shape(pre, dec) == pytest.approx(
        base.iteration_from_shape(pre, dec) + link.p2p_s(tokens_bytes))


def small_search(gpus: int, **slo) -> ServeSearchConfig:
    return ServeSearchConfig(gpus=gpus, slo=SLOConfig(**slo),
                             trace=TraceConfig(num_requests=40, prompt_len=(16, 128),
                                               output_len=(4, 32), seed=1),
                             bisect_steps=3)


def test_configuration_search_and_impossible_slo():
    prof = linear_profile()
    assert {str(x) for x in candidate_layouts(4, prof)} == {
        "4 x (tp1 pp1)", "2 x (tp1 pp2)", "2 x (tp2 pp1)", "1 x (tp2 pp2)", "1 x (tp4 pp1)"}
    res = search_serving(prof, small_search(4, ttft_s=0.05, tpot_s=0.01))
    assert res.best.max_rate == max(r.max_rate for r in res.results) > 0
    assert res.best.summary["ttft_p90_s"] <= 0.05 and res.best.summary["tpot_p90_s"] <= 0.01
    one = search_serving(prof, small_search(1, ttft_s=0.05, tpot_s=0.01))
    assert res.best.max_rate > 2 * one.best.max_rate  # four replicas beat one
    with pytest.raises(SLOError, match=r"best achievable: TTFT p90 \d+\.\d ms, TPOT p90"):
        search_serving(prof, small_search(2, ttft_s=1e-5, tpot_s=1e-5))


def test_gpu_loss_uses_recovery_candidates_and_choice():
    prof = linear_profile()
    cfg = small_search(4, ttft_s=0.05, tpot_s=0.01)
    best, cands = plan_gpu_loss(prof, cfg, ServingLayout(4, 1, 1), lost_gpu=1)
    assert {c.kind for c in cands} == {"reroute", "reparallelize"}
    assert best.score == max(c.score for c in cands) > 0
    for c in cands:
        assert 1 not in c.plan.ranks and c.plan.validate()
    reroute = next(c for c in cands if c.kind == "reroute")
    assert reroute.plan.ranks == [0, 2, 3] and len(reroute.plan.pipelines) == 3
    # a horizon shorter than any weight reload: only rerouting serves anything
    short = ServeRecoveryConfig(horizon_s=1.2, rebuild_s=1.0, weight_load_Bps=1e6)
    best, _ = plan_gpu_loss(prof, cfg, ServingLayout(4, 1, 1), 1, short)
    assert best.kind == "reroute"
    # a single replica has nothing to reroute to
    best, cands = plan_gpu_loss(prof, cfg, ServingLayout(1, 2, 2), lost_gpu=3)
    assert {c.kind for c in cands} == {"reparallelize"}


def test_trace_generation_and_percentile():
    a = generate_requests(TraceConfig(rate=5, num_requests=50, seed=3))
    assert a == generate_requests(TraceConfig(rate=5, num_requests=50, seed=3))
    assert all(16 <= r.prompt_len <= 192 and 4 <= r.output_len <= 64 for r in a)
    assert 5 < len(a) / a[-1].arrival_s * 2 and len(a) / a[-1].arrival_s < 10
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        generate_requests(TraceConfig(rate=0))


@pytest.mark.timeout(120)
def test_real_server_kv_cache_decode_equals_full_recompute():
    torch = pytest.importorskip("torch")
    from examples.gpt_kv import KVCacheGPT, ServeModelConfig
    from examples.serve_gpt import prompt_tokens, serve

    torch.set_num_threads(1)
    model = KVCacheGPT(ServeModelConfig(vocab_size=64, context=64, d_model=64, n_heads=4,
                                        n_blocks=2, seed=5), max_slots=8)
    reqs = [Request(0, 0.0, 12, 9), Request(1, 0.0, 5, 6), Request(2, 1e-4, 20, 7),
            Request(3, 2e-3, 3, 1), Request(4, 50.0, 4, 2)]  # r4: the CPU clock jumps to it
    res = serve(model, reqs, SchedulerConfig(max_running=4), warmup_iterations=1,
                clock="cpu")
    kinds = {r["kind"] for r in res.iterations}
    assert "mixed" in kinds and max(len(r["decode_kv"]) for r in res.iterations) >= 2
    # only r4's prefill follows an idle wait (the others arrive while the server is busy)
    assert [r["prefill_lens"] for r in res.iterations if r["after_idle"]] == [[4]]
    # on the CPU clock an iteration's duration is the thread's CPU time in it
    assert all(0 < r["cpu_s"] == pytest.approx(r["duration_s"], abs=1e-4)
               for r in res.iterations)
    prompts = prompt_tokens(reqs, 64)
    for rec in res.records:
        r = rec.request
        assert len(rec.tokens) == r.output_len
        full = torch.cat([prompts[r.rid], torch.tensor(rec.tokens[:-1], dtype=torch.long)])
        ref = model.full_logits(full).argmax(-1)[r.prompt_len - 1:]
        assert rec.tokens == ref.tolist(), f"request {r.rid}"
    assert not model.caches and len(model.free_slots) == 8  # every slot returned


def test_plan_serve_cli(tmp_path, capsys):
    from launch.cli import main

    path = tmp_path / "sp.json"
    linear_profile().save(path)
    common = ["plan-serve", "--profile", str(path), "--requests", "30", "--max-tp", "2",
              "--max-pp", "1"]
    assert main([*common, "--gpus", "2", "--ttft-ms", "50", "--tpot-ms", "10",
                 "--lose-gpu", "0"]) == 0
    out = capsys.readouterr().out
    assert "chosen: " in out and "TTFT p50/p90/p99 = " in out and "TPOT p50/p90/p99" in out
    assert "after losing GPU 0" in out and "* " in out
    assert main([*common, "--gpus", "2", "--ttft-ms", "0.001", "--tpot-ms", "0.001"]) == 3
    assert "best achievable: TTFT p90" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["plan-serve", "--profile", str(bad)]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
