"""`CostModel`: the duration of every Program instruction and the memory of every rank.

Compute comes from the profile's per-layer tables (interpolated at the plan's microbatch
size, O(1) range sums), p2p and all-reduce from the communication fits of the link
class the ranks share ('intra' when on one node, else 'inter'), commit and optimizer
step from profile constants. Every duration is multiplied by the calibration factor of
its kind, learnt online from measured times (`observe`), and a slow rank's compute by
its measured slowdown (`slowdown`: what the straggler detector found), so predictions
cover plans that route work around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from planner.calibrate import Calibration, CalibrationConfig
from planner.memory import MemoryConfig, MemoryModel
from planner.partition import Partitioner
from planner.plan import Plan
from planner.program import Instruction, Op, Program
from profiler.profile import Profile


@dataclass(frozen=True)
class CostConfig:
    """Topology and modelling choices of the cost model."""

    ranks_per_node: int | None = None
    """Ranks per node (rank r lives on node r // ranks_per_node); None: all on one node."""
    send_overhead_s: float = 0.0
    """Time a sender is busy issuing an asynchronous send (the transfer runs apart)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Memory accounting knobs."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Online correction settings."""


class CostModel:
    """Durations and memory from a `Profile`; see the module docstring."""

    def __init__(self, profile: Profile, config: CostConfig | None = None,
                 slowdown: Mapping[int, float] | None = None):
        self.profile = profile.check()
        self.config = config or CostConfig()
        self.slowdown: dict[int, float] = dict(slowdown or {})
        """Rank -> factor its forward and backward take longer (absent: 1)."""
        self.memory = MemoryModel(profile, self.config.memory)
        self.calibration = Calibration(self.config.calibration)
        self._compute: dict[int, tuple[list[float], list[float]]] = {}
        opt = [0.0]
        for lp in profile.layers:
            opt.append(opt[-1] + lp.optimizer_s)
        self._opt = opt
        count = [0.0]
        for lp in profile.layers:
            count.append(count[-1] + lp.param_count)
        self._count = count

    @property
    def num_layers(self) -> int:
        return self.profile.num_layers

    # ---- compute --------------------------------------------------------------------
    def _prefix(self, mb: int) -> tuple[list[float], list[float]]:
        if mb not in self._compute:
            pf, pb = [0.0], [0.0]
            for f, b in zip(self.profile.column("forward_s", mb),
                            self.profile.column("backward_s", mb)):
                pf.append(pf[-1] + f)
                pb.append(pb[-1] + b)
            self._compute[mb] = (pf, pb)
        return self._compute[mb]

    def layer_times(self, mb: int) -> tuple[list[float], list[float]]:
        """Calibrated (forward, backward) seconds per layer for one microbatch of size mb."""
        ff, fb = self.factor("forward"), self.factor("backward")
        return ([f * ff for f in self.profile.column("forward_s", mb)],
                [b * fb for b in self.profile.column("backward_s", mb)])

    def partitioner(self, mb: int) -> Partitioner:
        """Layer time and memory tables for splitting layers into stages at size mb."""
        fwd, bwd = self.layer_times(mb)
        saved, out = self.memory.activation_tables(mb)
        return Partitioner([f + b for f, b in zip(fwd, bwd)], self.memory.static_layer_bytes(),
                           saved, out, self.memory.config.reserve_bytes)

    def forward_s(self, start: int, end: int, mb: int) -> float:
        pf, _ = self._prefix(mb)
        return (pf[end] - pf[start]) * self.factor("forward")

    def backward_s(self, start: int, end: int, mb: int) -> float:
        _, pb = self._prefix(mb)
        return (pb[end] - pb[start]) * self.factor("backward")

    def speed_factor(self, rank: int) -> float:
        """How many times longer `rank` computes than the profile says (1: not slow)."""
        return self.slowdown.get(rank, 1.0)

    def optimizer_s(self, start: int, end: int) -> float:
        return (self._opt[end] - self._opt[start]) * self.factor("optimizer")

    def commit_s(self) -> float:
        return self.profile.comm.commit_s * self.factor("commit")

    # ---- communication --------------------------------------------------------------
    def node_of(self, rank: int) -> int:
        rpn = self.config.ranks_per_node
        return 0 if not rpn else rank // rpn

    def link(self, a: int, b: int) -> str:
        """Link class between two ranks."""
        return "intra" if self.node_of(a) == self.node_of(b) else "inter"

    def group_link(self, group: Sequence[int]) -> str:
        nodes = {self.node_of(r) for r in group}
        return "intra" if len(nodes) <= 1 else "inter"

    def boundary_bytes(self, layer: int, mb: int) -> float:
        """Bytes sent across the boundary after `layer` (activation forward, grad back)."""
        return self.memory.activation_tables(mb)[1][layer]

    def grad_bytes(self, start: int, end: int) -> float:
        """Gradient bytes of layers [start, end) (what an all-reduce moves)."""
        return (self._count[end] - self._count[start]) * self.memory.grad_bpp

    def p2p_link_s(self, link: str, nbytes: float) -> float:
        return self.profile.comm.link("p2p", link).p2p_s(nbytes) * self.factor("p2p")

    def p2p_s(self, src: int, dst: int, nbytes: float) -> float:
        """Transfer time of one message from src to dst."""
        return self.p2p_link_s(self.link(src, dst), nbytes)

    def allreduce_link_s(self, link: str, n: int, nbytes: float) -> float:
        fit = self.profile.comm.link("allreduce", link)
        return fit.ring_allreduce_s(nbytes, n) * self.factor("allreduce")

    def allreduce_s(self, group: Sequence[int], nbytes: float) -> float:
        """Ring all-reduce of nbytes over `group`."""
        return self.allreduce_link_s(self.group_link(group), len(group), nbytes)

    # ---- instructions ---------------------------------------------------------------
    def instruction_s(self, ins: Instruction, rank: int, mb: int, boundary: int = -1,
                      group: Sequence[int] | None = None) -> float:
        """Calibrated duration of `ins` on `rank` at microbatch size mb.

        p2p ops: the transfer time of the output of layer `boundary` (the last layer
        before the cut the message crosses; see `boundaries`); a recv may wait longer
        for its sender. All-reduce and commit: the time after the last member arrived;
        `group` overrides the all-reduce members used for costing.
        """
        op = ins.op
        if op is Op.FORWARD:
            return self.forward_s(ins.start, ins.end, mb) * self.speed_factor(rank)
        if op is Op.BACKWARD:
            return self.backward_s(ins.start, ins.end, mb) * self.speed_factor(rank)
        if op in (Op.SEND_ACT, Op.RECV_GRAD, Op.RECV_ACT, Op.SEND_GRAD):
            if boundary < 0:
                raise ValueError(f"{ins} on rank {rank}: no stage boundary between "
                                 f"{rank} and {ins.peer}")
            return self.p2p_s(rank, ins.peer, self.boundary_bytes(boundary, mb))
        if op is Op.ALLREDUCE:
            return self.allreduce_s(group or ins.group, self.grad_bytes(ins.start, ins.end))
        if op is Op.COMMIT:
            return self.commit_s()
        if op is Op.OPTIMIZER_STEP:
            return self.optimizer_s(ins.start, ins.end)
        raise ValueError(f"no cost for instruction {ins}")

    @staticmethod
    def boundaries(plan: Plan) -> dict[tuple[int, int], int]:
        """(upstream rank, downstream rank) -> last layer before their stage cut."""
        return {(a.rank, b.rank): a.end - 1 for p in plan.pipelines
                for a, b in zip(p.stages, p.stages[1:])}

    @staticmethod
    def boundary_of(ins: Instruction, rank: int, cuts: dict[tuple[int, int], int]) -> int:
        """The boundary layer a p2p instruction's message crosses (-1 if none)."""
        if ins.op in (Op.SEND_ACT, Op.RECV_GRAD):
            return cuts.get((rank, ins.peer), -1)
        return cuts.get((ins.peer, rank), -1)

    def instruction_durations(self, program: Program) -> dict[int, list[float]]:
        """Predicted duration of every instruction of a `Program`, per rank, in order
        (for comparing with the engine's measured times instruction by instruction)."""
        plan = program.plan
        cuts = self.boundaries(plan)
        everyone = tuple(sorted(program.instructions))
        out: dict[int, list[float]] = {}
        for rank, instrs in program.instructions.items():
            out[rank] = [
                self.instruction_s(ins, rank, plan.microbatch_size,
                                   self.boundary_of(ins, rank, cuts),
                                   everyone if ins.op is Op.COMMIT else None)
                for ins in instrs]
        return out

    # ---- calibration ----------------------------------------------------------------
    def factor(self, op: object) -> float:
        """Current correction factor of an op kind (1.0 until observed)."""
        return self.calibration.factor(op)

    def observe(self, op: object, predicted_s: float, measured_s: float) -> bool:
        """Feed one measured time; `predicted_s` is the uncalibrated prediction
        (`instruction_s(...) / factor(op)`). Returns False for a rejected outlier."""
        return self.calibration.observe(op, predicted_s, measured_s)

    def calibrate(self, observations: Iterable[tuple[object, float, float]]) -> dict:
        """Feed many (op kind, uncalibrated predicted s, measured s); return the report."""
        for op, pred, meas in observations:
            self.observe(op, pred, meas)
        return self.calibration.report()
