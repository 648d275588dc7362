"""Plan validation, JSON round-trip and the compiled Program's structure."""

import pytest

from planner import Op, Pipeline, Plan, PlanError, Stage, compile_plan


def unequal_plan(schedule="1f1b") -> Plan:
    # one pipeline of 2 stages and one of 1 stage, microbatches split 2:1
    return Plan(6, 6, 2, [
        Pipeline([Stage(0, 0, 3), Stage(1, 3, 6)], [0, 1, 3, 4]),
        Pipeline([Stage(2, 0, 6)], [2, 5]),
    ], schedule).validate()


def test_uniform_plan_shape_and_json_roundtrip():
    p = Plan.uniform(8, dp=2, pp=2, num_microbatches=4, microbatch_size=3, schedule="gpipe")
    assert p.ranks == [0, 1, 2, 3] and p.global_batch == 12
    assert [s.layers for s in p.pipelines[0].stages] == [range(0, 4), range(4, 8)]
    assert p.pipelines[1].microbatches == [1, 3]
    assert Plan.from_json(p.to_json()) == p


def test_lookups_are_indexed_and_follow_edits():
    p = unequal_plan()
    assert p.stage(1) == Stage(1, 3, 6) and p.stage_of(2) == (1, 0)
    assert p.holders(4) == [1, 2] and p.holders(6) == [] and p.has_rank(2)
    assert not p.has_rank(7) and p.world_size == 3 and not p.has_shared_stages
    assert p.layer_groups() == [((0, 3), (0, 2)), ((3, 6), (1, 2))]
    with pytest.raises(PlanError, match="rank 7 is not in the plan"):
        p.stage(7)
    p.ranks.append(99)  # a copy: the plan's ranks are unchanged
    assert p.ranks == [0, 1, 2]
    # an edit in place is seen after validate(); assigning a field drops the index
    p.pipelines[1] = Pipeline([Stage(3, 0, 3), Stage(4, 3, 6)], [2, 5])
    p.validate()
    assert p.ranks == [0, 1, 3, 4] and p.holders(0) == [0, 3] and p.stage_of(4) == (1, 1)
    p.pipelines = [Pipeline([Stage(5, 0, 6)], list(range(6)))]
    assert p.ranks == [5] and p.holders(2) == [5] and not p.has_rank(0)
    assert "_lookup" not in p.to_dict() and Plan.from_json(p.to_json()) == p
    shared = Plan(4, 2, 1, [Pipeline([Stage(0, 0, 2), Stage(1, 2, 4)], [0]),
                            Pipeline([Stage(2, 0, 2), Stage(1, 2, 4)], [1])]).validate()
    assert shared.has_shared_stages and shared.holders(3) == [1] and shared.stage_of(1) == (0, 1)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pipelines[0].stages.__setitem__(1, Stage(1, 5, 8)),
     "pipeline 0: layer 4 is held by no rank (hole)"),
    (lambda p: p.pipelines[0].stages.__setitem__(1, Stage(1, 3, 8)),
     "pipeline 0: layer 3 is held by ranks [0, 1] (overlap)"),
    (lambda p: p.pipelines[1].stages.__setitem__(1, Stage(0, 4, 8)),
     "rank 0 is used with different layer ranges [(0, 4), (4, 8)]"),
    (lambda p: p.pipelines[0].stages.__setitem__(1, Stage(0, 4, 8)),
     "pipeline 0: rank 0 is used 2 times"),
    (lambda p: p.pipelines[1].microbatches.remove(3),
     "microbatch(es) [3] are missing"),
    (lambda p: p.pipelines[1].microbatches.append(0),
     "microbatch 0 is duplicated"),
    (lambda p: p.pipelines[0].microbatches.append(9),
     "microbatch 9 is out of range"),
])
def test_invalid_plans_are_rejected_with_a_precise_message(mutate, message):
    p = Plan.uniform(8, dp=2, pp=2, num_microbatches=4, microbatch_size=1)
    mutate(p)
    with pytest.raises(PlanError) as e:
        p.validate()
    assert message in str(e.value)


def test_malformed_json_and_bad_uniform_args():
    with pytest.raises(PlanError, match="malformed plan JSON"):
        Plan.from_json("{not json")
    with pytest.raises(PlanError, match="malformed plan JSON"):
        Plan.from_json('{"num_layers": 4}')
    with pytest.raises(PlanError, match="cannot split"):
        Plan.uniform(2, dp=1, pp=3, num_microbatches=4, microbatch_size=1)
    with pytest.raises(PlanError, match="partition"):
        Plan.uniform(8, dp=1, pp=2, num_microbatches=4, microbatch_size=1, partition=[3, 3])


def _counts(instrs):
    out = {}
    for i in instrs:
        out[i.op] = out.get(i.op, 0) + 1
    return out


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_compiled_program_sends_match_receives(schedule):
    prog = compile_plan(unequal_plan(schedule))
    sends = sorted((r, i.peer, i.microbatch, i.op.value[5:]) for r, ins in prog.instructions.items()
                   for i in ins if i.op in (Op.SEND_ACT, Op.SEND_GRAD))
    recvs = sorted((i.peer, r, i.microbatch, i.op.value[5:]) for r, ins in prog.instructions.items()
                   for i in ins if i.op in (Op.RECV_ACT, Op.RECV_GRAD))
    assert sends == recvs and len(sends) == 8  # 4 microbatches x (act + grad) on one edge
    # every rank: each of its microbatches forward and backward once, then commit + step
    for r, ins in prog.instructions.items():
        c = _counts(ins)
        assert c[Op.FORWARD] == c[Op.BACKWARD] == (2 if r == 2 else 4)
        assert ins[-2].op is Op.COMMIT and ins[-1].op is Op.OPTIMIZER_STEP
    # layers 0..2 are shared by ranks 0 and 2, layers 3..5 by ranks 1 and 2
    ar = {r: [(i.start, i.end, i.group) for i in ins if i.op is Op.ALLREDUCE]
          for r, ins in prog.instructions.items()}
    assert ar == {0: [(0, 3, (0, 2))], 1: [(3, 6, (1, 2))],
                  2: [(3, 6, (1, 2)), (0, 3, (0, 2))]}


def test_1f1b_limits_microbatches_in_flight():
    p = Plan.uniform(4, dp=1, pp=4, num_microbatches=8, microbatch_size=1)
    prog = compile_plan(p)
    for s, rank in enumerate(p.pipelines[0].ranks):
        live = peak = 0
        for i in prog.for_rank(rank):
            live += (i.op is Op.FORWARD) - (i.op is Op.BACKWARD)
            peak = max(peak, live)
        assert peak == 4 - s  # stage s keeps at most p - s microbatches alive
    gp = compile_plan(Plan.uniform(4, 1, 4, 8, 1, schedule="gpipe"))
    first = [i.op for i in gp.for_rank(0) if i.op in (Op.FORWARD, Op.BACKWARD)]
    assert first == [Op.FORWARD] * 8 + [Op.BACKWARD] * 8


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_shared_stage_program_is_consistent(schedule):
    # 2 x 4, rank 1 lost: pipeline 0's second stage is served by rank 5 (ReCycle reroute)
    p = Plan(8, 8, 1, [
        Pipeline([Stage(0, 0, 2), Stage(5, 2, 4), Stage(2, 4, 6), Stage(3, 6, 8)], [0, 2, 4, 6]),
        Pipeline([Stage(4, 0, 2), Stage(5, 2, 4), Stage(6, 4, 6), Stage(7, 6, 8)], [1, 3, 5, 7]),
    ], schedule).validate()
    prog = compile_plan(p)
    assert sorted(prog.instructions) == [0, 2, 3, 4, 5, 6, 7]
    assert _counts(prog.for_rank(5))[Op.FORWARD] == 8
    # each channel's sends and receives visit microbatches in the same order (FIFO)
    for ch in prog.channels():
        op_s, op_r = (Op.SEND_ACT, Op.RECV_ACT) if ch.kind == "act" else (Op.SEND_GRAD,
                                                                          Op.RECV_GRAD)
        sent = [i.microbatch for i in prog.for_rank(ch.src) if i.op is op_s and i.peer == ch.dst]
        got = [i.microbatch for i in prog.for_rank(ch.dst) if i.op is op_r and i.peer == ch.src]
        assert sent == got and sent
    # layers 2..3 now live on rank 5 alone: no all-reduce for them
    assert (5,) not in prog.allreduce_groups() and (1, 5) not in prog.allreduce_groups()
