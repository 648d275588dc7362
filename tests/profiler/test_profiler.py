"""Profiler: layer measurements, comm fits, profile files and their validation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from profiler import (
    PROFILE_VERSION,
    FormulaConfig,
    Profile,
    ProfileError,
    emulated_profile,
    formula_profile,
    interpolate,
    robust_stat,
    trim_outliers,
)
from profiler.cli import profile_main
from profiler.comm import fit_link


def _emu(n=4) -> Profile:
    return emulated_profile(SimpleNamespace(num_layers=n, forward_ms=(1, 2, 3, 4)[:n],
                                            backward_ms=5.0, dim=8))


def test_robust_timing_drops_outliers():
    assert trim_outliers([1.0, 1.1, 0.9, 1.0, 50.0]) == [0.9, 1.0, 1.0, 1.1]
    st = robust_stat([1.0, 1.1, 0.9, 1.0, 50.0])
    assert st.median == pytest.approx(1.0) and st.dropped == 1


def test_interpolation():
    assert interpolate([1, 4], [1.0, 4.0], 2) == pytest.approx(2.0)
    assert interpolate([1, 4], [1.0, 4.0], 8) == pytest.approx(8.0)  # extrapolates
    assert interpolate([2], [3.0], 4) == pytest.approx(6.0)  # one point: proportional
    assert interpolate([1, 2], [5.0, 1.0], 10) == 0.0  # never negative


def test_emulated_profile_reads_configured_durations():
    prof = _emu()
    assert prof.forward_s(2, 1) == pytest.approx(3e-3)
    assert prof.forward_s(2, 32) == pytest.approx(3e-3)  # sleeps do not scale
    assert prof.backward_s(0, 5) == pytest.approx(5e-3)
    # each layer is charged its saved input (its output is the next one's input); the
    # last also its output and the loss's saved difference
    assert prof.activation_bytes(0, 4) == 4 * 8 * 4 and prof.output_bytes(0, 4) == 128
    assert prof.activation_bytes(prof.num_layers - 1, 4) == 3 * 4 * 8 * 4


def test_formula_profile_gpt3_shapes():
    prof = formula_profile(FormulaConfig(preset="gpt3-175b"))
    assert prof.num_layers == 98 and prof.layers[1].name == "Block"
    blocks = sum(lp.param_count for lp in prof.layers if lp.name == "Block")
    assert 170e9 < blocks < 176e9
    assert prof.backward_s(1, 2) == pytest.approx(2 * prof.forward_s(1, 2))
    assert prof.forward_s(1, 2) == pytest.approx(2 * prof.forward_s(1, 1), rel=1e-9)
    # Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per block
    assert prof.activation_bytes(1, 1) == pytest.approx(2048 * 12288 * (34 + 5 * 96 * 2048
                                                                        / 12288))
    assert set(prof.comm.p2p) == {"intra", "inter"}


def test_profile_json_round_trip(tmp_path):
    prof = _emu()
    path = tmp_path / "p.json"
    prof.save(path)
    again = Profile.load(path, num_layers=4)
    assert again == prof
    assert json.loads(path.read_text())["version"] == PROFILE_VERSION


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d.pop("version"), "no 'version' field"),
    (lambda d: d.pop("layers"), "missing field(s) ['layers']"),
    (lambda d: d["layers"][1].pop("backward_s"), "layer entry 1 is missing"),
    (lambda d: d["layers"][0].update(forward_s=[1.0, 2.0, 3.0]), "has 3 values for 2"),
    (lambda d: d["layers"][2].update(output_bytes=[-1.0, 1.0]), "negative value"),
    (lambda d: d.update(microbatch_sizes=[4, 1]), "ascending"),
    (lambda d: d["comm"]["p2p"].pop("intra"), "no 'intra' link fit"),
    (lambda d: d["comm"]["allreduce"]["intra"].update(beta_Bps=0), "beta > 0"),
    (lambda d: d.update(kind="guessed"), "kind 'guessed'"),
    (lambda d: d["layers"][0].update(param_count="many"), "malformed profile"),
])
def test_malformed_profile_rejected(mutate, message):
    d = _emu().to_dict()
    mutate(d)
    with pytest.raises(ProfileError) as ei:
        Profile.from_dict(d)
    assert message in str(ei.value)


def test_profile_layer_count_mismatch_and_bad_files(tmp_path):
    path = tmp_path / "p.json"
    _emu().save(path)
    with pytest.raises(ProfileError, match="profile has 4 layers but the model has 6"):
        Profile.load(path, num_layers=6)
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="cannot read profile"):
        Profile.load(tmp_path / "nope.json")


def test_fit_link_recovers_alpha_beta():
    alpha, beta = 5e-5, 2e9
    pts = [[b, 2, alpha + b / beta] for b in (1e3, 1e5, 1e6, 1e7)]
    fit = fit_link(pts, "p2p")
    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert fit.beta_Bps == pytest.approx(beta, rel=1e-6)
    ring = [[b, n, 2 * (n - 1) * alpha + 2 * (n - 1) / n * b / beta]
            for b in (1e3, 1e6, 1e7) for n in (2, 4, 8)]
    fit = fit_link(ring, "ring")
    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert fit.ring_allreduce_s(1e6, 4) == pytest.approx(6 * alpha + 1.5e6 / beta)
    flat = fit_link([[b, 2, 1e-3] for b in (1e3, 1e6)], "p2p")  # no bandwidth term seen
    assert flat.alpha_s == pytest.approx(1e-3, rel=1e-3) and flat.beta_Bps > 1e12


def test_layer_profiler_measures_fwd_and_bwd_separately():
    import torch

    from examples.gpt import GPTConfig, build_gpt
    from profiler.layers import LayerProfilerConfig, profile_model
    from profiler.timing import TimingConfig

    cfg = GPTConfig(vocab_size=32, seq_len=16, d_model=32, n_heads=2, n_blocks=1)
    model = build_gpt(cfg)

    def tokens(mb: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (mb, cfg.seq_len))

    lcfg = LayerProfilerConfig((1, 4), TimingConfig(1, 3), optimizer_repeats=0,
                               global_warmup=False, num_threads=1)
    threads = torch.get_num_threads()
    prof = profile_model(model, lcfg, input_fn=tokens, target_fn=tokens)
    assert torch.get_num_threads() == threads
    assert prof.kind == "measured" and prof.num_layers == 3
    assert prof.config["microbatch_sizes"] == [1, 4] and "torch" in prof.device
    for i, lp in enumerate(prof.layers):
        params = model.build_layer(i).parameters()
        assert lp.param_bytes == sum(p.numel() * p.element_size() for p in params)
        assert all(t > 0 for t in lp.forward_s + lp.backward_s)
        assert lp.forward_s != lp.backward_s  # two measurements, not one and a rule
        assert lp.activation_bytes[0] > 0
    block = prof.layers[1]
    assert 3.0 <= block.activation_bytes[1] / block.activation_bytes[0] <= 5.0
    assert block.output_bytes == [1 * 16 * 32 * 4, 4 * 16 * 32 * 4]
    Profile.from_json(prof.to_json(), num_layers=3)  # a valid file


@pytest.mark.timeout(120)
def test_comm_benchmark_with_real_gloo_groups():
    from profiler.comm import CommBenchConfig, bench_comm
    from profiler.timing import TimingConfig

    comm = bench_comm(CommBenchConfig(group_sizes=(2, 3), message_bytes=(1024, 1 << 16),
                                      timing=TimingConfig(1, 3), store_roundtrips=5))
    for table in (comm.p2p, comm.allreduce):
        fit = table["intra"]
        assert fit.alpha_s >= 0 and fit.beta_Bps > 0 and fit.source == "measured"
    assert len(comm.p2p["intra"].points) == 2
    assert sorted({p[1] for p in comm.allreduce["intra"].points}) == [2.0, 3.0]
    assert all(p[2] > 0 for p in comm.allreduce["intra"].points)
    assert comm.commit_s > 0


def test_profile_cli_emulated_and_formula(tmp_path, capsys):
    out = tmp_path / "emu.json"
    assert profile_main(["--model", "emulated", "--num-layers", "3", "--forward-ms", "1,2,3",
                         "--out", str(out), "--inter-alpha-us", "20", "--inter-gbps", "10"]) == 0
    prof = Profile.load(out, num_layers=3)
    assert prof.forward_s(2, 1) == pytest.approx(3e-3)
    assert prof.comm.p2p["inter"].source == "assumed"
    out2 = tmp_path / "f.json"
    assert profile_main(["--model", "formula", "--preset", "gpt3-125m", "--out", str(out2)]) == 0
    assert Profile.load(out2).num_layers == 14
    assert "wrote" in capsys.readouterr().out
    assert profile_main(["--model", "formula", "--preset", "nope", "--out", str(out2)]) == 2
