"""Online op monitor: per-stage signatures (light), records (detailed), overhead."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from chameleon.reference_models import TinyConfig, TinyGPT, TinyMoE, batch
from profiler.op_monitor import OpMonitor, find_layers, shape_class

torch.set_num_threads(1)
CFG = TinyConfig(d_model=32, n_layers=3)


class Skippy(TinyGPT):
    """TinyGPT whose block 1 can be skipped (a conditional block)."""

    skip = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            if not (self.skip and i == 1):
                x = blk(x)
        return self.head(self.ln(x))


def run(mon: OpMonitor, m: nn.Module, x: torch.Tensor, y: torch.Tensor,
        detailed: bool | None = None) -> None:
    with mon.step(detailed):
        m.loss(x, y).backward()


@pytest.mark.timeout(30)
def test_light_signatures_compare_per_stage() -> None:
    m = Skippy(CFG)
    mon = OpMonitor()
    mon.attach(m)
    x, y = batch(CFG, 2, 16, 0)
    run(mon, m, x, y)
    assert mon.last is not None and mon.last.detailed  # first step is detailed
    run(mon, m, x, y)
    assert not mon.last.detailed and mon.changed == [] and not mon.detail_requested
    slots = {s for _, s in mon.last.signatures}
    assert slots == {0, 1, 2, 3, 4}, "embedding, three blocks, head"
    # a skipped block changes exactly its own stage (total count alone would hide where)
    m.skip = True
    run(mon, m, x, y)
    assert mon.changed == [(0, 2)]
    assert mon.detail_requested
    # a sequence-length change changes every stage that saves length-shaped tensors
    m.skip = False
    x2, y2 = batch(CFG, 2, 24, 0)
    run(mon, m, x2, y2)
    assert {s for _, s in mon.changed} == {0, 1, 2, 3, 4}
    assert mon.last.detailed, "the step after a change is profiled in detail"


@pytest.mark.timeout(30)
def test_same_count_different_shapes_is_a_change() -> None:
    m = TinyGPT(CFG)
    mon = OpMonitor()
    mon.attach(m)
    run(mon, m, *batch(CFG, 2, 16, 0))
    before = mon.last
    run(mon, m, *batch(CFG, 4, 8, 0))  # same token count, same tensor count per stage
    after = mon.last
    assert mon.changed, "shapes differ although counts match"
    for sid in mon.changed:
        assert before.signatures[sid][0] == after.signatures[sid][0]
        assert before.signatures[sid][1] != after.signatures[sid][1]


@pytest.mark.timeout(30)
def test_detailed_records_order_and_lifetimes() -> None:
    m = TinyMoE(CFG)
    mon = OpMonitor()
    mon.attach(m)
    x, y = batch(CFG, 2, 16, 0)
    run(mon, m, x, y, detailed=True)
    prof = mon.last
    recs = prof.records
    assert recs and all(r.nbytes > 0 for r in recs)
    assert [r.rid for r in recs] == list(range(len(recs)))
    packs = [r.pack_t for r in recs]
    assert packs == sorted(packs), "records are in producer order"
    unpacked = [r for r in recs if r.unpack_t is not None]
    assert len(unpacked) >= len(recs) * 0.8
    assert all(r.unpack_t >= r.pack_t for r in unpacked)
    orders = sorted(r.unpack_order for r in unpacked)
    assert orders == list(range(len(unpacked)))
    # backward runs later layers first: the last block's tensors are unpacked before the first
    first = min(r.unpack_t for r in unpacked if r.key.stage[1] == 1)
    last = min(r.unpack_t for r in unpacked if r.key.stage[1] == 3)
    assert last < first
    assert set(prof.bwd_t) >= {(0, 1), (0, 2), (0, 3)}
    assert all(r.free_t is not None for r in recs)
    gelu = [r for r in recs if r.key.kind == "GeluBackward0"]
    assert gelu and all(r.recompute == "gelu" for r in gelu)
    for r in gelu:  # the GELU input, saved earlier by the GELU node itself
        assert r.recompute_src is not None and recs[r.recompute_src].pack_t < r.pack_t
    d = prof.to_dict()
    assert d["records"] and "0:1" in d["signatures"]


@pytest.mark.timeout(30)
def test_find_layers_and_shape_class() -> None:
    m = TinyGPT(CFG)
    assert find_layers(m) == list(m.blocks)
    assert shape_class((4, 100)) == (2, 9) and shape_class((4, 128)) == (2, 9)
    assert shape_class((4, 129)) == (2, 10)


@pytest.mark.timeout(60)
def test_light_mode_overhead_is_small() -> None:
    """Light-mode cost = hook cost per saved tensor (timed on the tensors of a real step,
    best of several rounds) x saved tensors per step, against the bare step (best of 3).
    End-to-end A/B step times cannot resolve 1% on a shared 2-core machine."""
    cfg = TinyConfig(d_model=64, n_layers=8)
    m = TinyGPT(cfg)
    x, y = batch(cfg, 8, 128, 0)
    bare = []
    for _ in range(3):
        t0 = time.perf_counter()
        m.loss(x, y).backward()
        bare.append(time.perf_counter() - t0)
    mon = OpMonitor()
    mon.attach(m)
    run(mon, m, x, y)  # detailed first step
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = m.loss(x, y)

    def cost(detailed: bool) -> float:
        best = float("inf")
        with mon.step(detailed=detailed):
            pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(False)
            for _ in range(10):
                t0 = time.perf_counter()
                for h in [pack(t) for t in saved]:
                    unpack(h)
                best = min(best, time.perf_counter() - t0)
        return best / len(saved)

    light, detailed = cost(False), cost(True)
    frac = light * len(saved) / min(bare)
    print(f"light monitor: {len(saved)} saved tensors/step, {light * 1e6:.2f} us/tensor "
          f"(detailed {detailed * 1e6:.2f} us) = {frac * 100:.3f}% of a "
          f"{min(bare) * 1e3:.0f} ms step (+ ~2 us/tensor hook dispatch, any hook)")
    del loss
    assert light < 10e-6
    assert light < detailed, "light mode is the cheap one"
    assert frac < 0.01
