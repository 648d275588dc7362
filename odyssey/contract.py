"""The contract between the launcher and its workers, spelled in exactly one place.

Every store key, environment variable, run-directory file name and the exit record that
`odyssey run` (launch/) and the workers (odyssey/) share is defined here and nowhere
else; this module imports neither torch nor anything of the project, so both sides (and
tools that read a store or run directory) can import it. `docs/launcher.md` describes it.

All store keys live in the launcher-hosted TCPStore at ``ODYSSEY_STORE_ADDR:PORT`` under
``odyssey/``. Generation-scoped keys carry ``gen{g}`` so a new generation never reads a
stale value of an old one. JSON values are UTF-8 bytes.
"""

from __future__ import annotations

import json
import re
import signal as _signal
from dataclasses import asdict, dataclass

# --- environment variables the launcher sets for every worker ------------------------
# (torchrun's own names, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR..., are set in
# launch.workers as torchrun does)
ENV_STORE_ADDR = "ODYSSEY_STORE_ADDR"
ENV_STORE_PORT = "ODYSSEY_STORE_PORT"
ENV_RUN_DIR = "ODYSSEY_RUN_DIR"
ENV_LAUNCHER = "ODYSSEY_LAUNCHER"
"""'odyssey' (survivors kept) or absent (plain torchrun)."""
ENV_HOST = "ODYSSEY_HOST"
"""Address this worker binds and advertises for its communication transport (gloo)."""
ENV_JOIN = "ODYSSEY_JOIN"
"""'1' for a replacement worker joining a running job."""
ENV_TOKEN = "ODYSSEY_TOKEN"
"""The job token (hex): workers sign the control commands they write (fences) and
ignore those without a valid HMAC (injects); see odyssey/control.py."""
ENV_GLOO_IFNAME = "GLOO_SOCKET_IFNAME"
"""gloo's own variable: the interface ``init_process_group("gloo")`` binds (set by the
launcher of a multi-node job to the interface of ``ODYSSEY_HOST``, unless already set)."""
ENV_LIVENESS_DIR = "ODYSSEY_LIVENESS_DIR"
"""A node-local directory the launcher creates for the "node" control plane: each worker
bumps its heartbeat file there and watches the notice files its launcher relays
(LIVENESS_* names below; launch/node_liveness.py)."""
ENV_LIVENESS_WAKE_FD = "ODYSSEY_LIVENESS_WAKE_FD"
"""The "node" control plane: the read end of a pipe (a file descriptor number) into which
the launcher writes a byte after it relays each notice, so the worker's watcher blocks
on it instead of polling the notice file."""
ENV_BENCH_PROFILE_DIR = "ODYSSEY_BENCH_PROFILE_DIR"
"""Benchmarks only: where the DeepSpeed-comparison worker writes per-rank op timings."""
ENV_OPLOG_DIR = "ODYSSEY_OPLOG_DIR"
"""Benchmarks only: where the model-accuracy worker writes per-op timing lines."""

EXIT_ABORT_HUNG = 75
"""Exit status of a worker that left the job because aborting its NCCL communicators
hung (it fences itself; the survivors recover without it)."""


# --- files in a run directory ------------------------------------------------------
REPORT_FILE = "report.json"
METRICS_FILE = "metrics.jsonl"
LEDGER_FILE = "ledger.jsonl"
EVENTS_FILE = "events.jsonl"
FAULTS_FILE = "faults.jsonl"
"""Injected faults as they fire (also readable by a later torchrun attempt)."""
EVAL_FILE = "eval.jsonl"
"""Validation loss, one record per evaluation (leader only; `--eval.every`)."""
HF_CONFIG_FILE = "hf_config.json"
"""The Hugging Face config of a model built by `odyssey.hf` (`odyssey export` makes a
`from_pretrained` directory of a run that has one)."""
EXPORT_WEIGHTS_FILE = "model.safetensors"
"""The consolidated state dict `odyssey export` writes (Hugging Face's file name)."""
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_META = "meta.json"
"""In each step's checkpoint directory: step, sampler position, the plan that wrote it."""
CHECKPOINT_STEP_DIR = re.compile(r"^step_(\d{8})$")
"""Name of one step's checkpoint directory under CHECKPOINT_DIR (group 1: the step)."""
CHECKPOINT_MANIFEST = "manifest.json"
"""In each step's checkpoint directory, written last: sha256 and size of every other file
of the step (a step is complete only when it verifies; docs/checkpoints.md)."""
PEER_CHECKPOINT_DIR = "peer-checkpoints"
"""Beside the checkpoint directory: one directory per rank holding peer copies."""
RUN_LOCK_FILE = "odyssey.lock"
"""The run directory's lock: JSON {"host","pid","job_id","time"} of the launcher that owns
it (launch/run_lock.py)."""
WORKER_LOG_DIR = "logs"
"""Per-worker files the launcher reads when workers fail (under the run directory)."""


def liveness_beat_file(rank: int) -> str:
    """In ENV_LIVENESS_DIR: `rank`'s heartbeat, a counter the worker rewrites every
    heartbeat period; removed when its monitor stops (no longer watched)."""
    return f"rank{rank}.beat"


def liveness_info_file(rank: int) -> str:
    """In ENV_LIVENESS_DIR: JSON {"rank","pid","heartbeat_timeout_s"}, written once before
    the first beat, so the launcher knows how long a stall it may allow."""
    return f"rank{rank}.json"


def liveness_notice_file(gen: int) -> str:
    """In ENV_LIVENESS_DIR: generation `gen`'s notice (the JSON of `notice_key(gen)`),
    relayed by the launcher from the store; written atomically (rename)."""
    return f"notice-gen{gen}.json"


def peer_checkpoint_dir(rank: int) -> str:
    return f"rank{rank}"


def worker_log_file(rank: int) -> str:
    """A failed worker's full traceback, under WORKER_LOG_DIR."""
    return f"rank{rank}.log"


def worker_error_file(rank: int) -> str:
    """A failed worker's one-line cause, JSON {"rank","cause","bad_input"}, under
    WORKER_LOG_DIR; the launcher prints each distinct cause once."""
    return f"rank{rank}.error.json"


def checkpoint_step_dir(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_layer_file(layer: int) -> str:
    """One layer's parameters and optimizer state in a step's checkpoint directory."""
    return f"layer_{layer:04d}.pt"


TENSORBOARD_DIR = "tensorboard"
STATUS_FILE = "status.json"
"""The leader's last status record (see STATUS_RECORD), written when the run ends, for
`odyssey status` once the store is gone."""
TOKEN_FILE = "job-token"
"""The job token, readable by its owner only (mode 0600); `odyssey inject`/`replay` read it."""


def launcher_file(node_rank: int) -> str:
    """Name of the JSON file each node's launcher writes into the run directory."""
    return f"launcher-node{node_rank}.json"


# --- store keys ----------------------------------------------------------------------
GENERATION = "odyssey/generation"
"""Number of the newest generation (set by its leader once agreed)."""
SAMPLER_BASE = "odyssey/sampler/base"
"""JSON {"first_step","first_sample"}: where the sampler continues after a resume under
another batch layout (set by the leader; a joining worker adopts it)."""
CALIBRATION_FACTOR = "odyssey/calibration/step_factor"
"""Measured / predicted step time, shared by the leader for candidate scoring."""
LAUNCH_STORE = "odyssey/launch/store"
"""Multi-node start-up (rendezvous store): ``addr:port`` of the job store node 0 hosts."""
LAUNCH_RUN_DIR = "odyssey/launch/run_dir"
"""Multi-node start-up (rendezvous store): the run directory node 0 chose."""
LAUNCH_TOKEN = "odyssey/launch/token"
"""Multi-node start-up (rendezvous store): the job token node 0 created, unless every
launcher was given one (--token-file)."""


def launch_nproc_key(node: int) -> str:
    """Multi-node start-up (rendezvous store): that node's worker count."""
    return f"odyssey/launch/nproc/{node}"


EVAL_STORE_PREFIX = "odyssey/eval/"
"""Evaluations run their own commit protocol under this prefix (the step-scoped keys
below): votes carry each rank's validation loss sum, one decision says that every member
finished the evaluation."""


def step_prefix(generation: int, step: int) -> str:
    """Prefix of the commit-protocol keys of one step in one generation."""
    return f"odyssey/gen{generation}/step{step}"


def vote_key(generation: int, step: int, rank: int) -> str:
    """JSON vote of `rank` for that step (loss sum, sample ids, timings)."""
    return f"{step_prefix(generation, step)}/vote/{rank}"


def vote_count_key(generation: int, step: int) -> str:
    """How many members voted for that step (the last voter decides commit)."""
    return f"{step_prefix(generation, step)}/votes"


def decision_key(generation: int, step: int) -> str:
    """That step's outcome, commit or abort: one compare-and-set, first writer wins."""
    return f"{step_prefix(generation, step)}/decision"


def abort_reason_key(generation: int, step: int) -> str:
    """Why that step was aborted (the first reason given)."""
    return f"{step_prefix(generation, step)}/reason"


def group_prefix(generation: int, name: str) -> str:
    """Store prefix under which the process group `name` of a generation meets."""
    return f"odyssey/gen{generation}/pg/{name}"


STATUS_RECORD = "odyssey/status/record"
"""JSON status of the job (generation, members, plan, step rate, recoveries, stragglers,
fences, checkpoint), set by the leader on every committed step and recovery
(odyssey/status.py); `odyssey status` and the Prometheus exporter read it."""
METRICS_ENDPOINT = "odyssey/status/metrics_endpoint"
"""``host:port`` where node 0's launcher serves Prometheus metrics (set once it listens;
launch/prometheus.py)."""

# written by the launcher
EXITS_COUNT = "odyssey/exits/count"
JOB_STATUS = "odyssey/job/status"
JOB_DONE = "done"


def exit_key(rank: int) -> str:
    """JSON exit record {"rank","pid","exitcode","signal","time"} written by the launcher."""
    return f"odyssey/exits/{rank}"


def fence_key(rank: int) -> str:
    """Set (value: the reason, signed with the job token) to ask the owning launcher to
    kill `rank`, then add 1 to FENCES_COUNT and write that count's fence_note_key; an
    unsigned or forged value is ignored (odyssey/control.py)."""
    return f"odyssey/fence/{rank}"


FENCES_COUNT = "odyssey/fences/count"
"""Bumped after every fence request (then its note is written: fence_note_key); a
launcher looks at its ranks' fence keys when a note appears (or, as a backstop, once a
second; without its watch thread: when this counter moved)."""


def fence_note_key(k: int) -> str:
    """Written (value: the rank) by the fencer whose bump of FENCES_COUNT returned `k`:
    each launcher's watch thread blocks on the next one (launch/fence_watch.py)."""
    return f"odyssey/fences/note/{k}"


def fenced_key(rank: int) -> str:
    """JSON {"rank","time","reason"} written by the launcher once `rank` is dead."""
    return f"odyssey/fenced/{rank}"


# written by workers
def heartbeat_key(rank: int) -> str:
    return f"odyssey/hb/{rank}"


def notice_key(gen: int) -> str:
    """First membership event seen in generation `gen` (compare-and-set once)."""
    return f"odyssey/gen{gen}/notice"


def join_key(gen: int, rank: int) -> str:
    return f"odyssey/gen{gen}/join/{rank}"


def joined_count_key(gen: int) -> str:
    return f"odyssey/gen{gen}/joined"


def members_key(gen: int) -> str:
    return f"odyssey/gen{gen}/members"


def plan_key(gen: int) -> str:
    return f"odyssey/gen{gen}/plan"


def checksum_key(tag: int | str, rank: int) -> str:
    return f"odyssey/gen{tag}/checksum/{rank}"


def verdict_key(tag: int | str) -> str:
    return f"odyssey/gen{tag}/verdict"


def started_key(gen: int, rank: int) -> str:
    return f"odyssey/gen{gen}/started/{rank}"


def copied_key(gen: int, rank: int) -> str:
    """Set by `rank` once a two-phase background copy of generation `gen` has brought it
    every layer's state (its value: the wall time)."""
    return f"odyssey/gen{gen}/copied/{rank}"


def switch_key(gen: int) -> str:
    """Set by the leader of two-phase generation `gen` once its copy is done (JSON: time,
    reason); the step's last voter reads it into the commit decision, so every member
    leaves for the switch at the same step boundary, no step aborted."""
    return f"odyssey/gen{gen}/switch"


def parked_key(rank: int) -> str:
    """JSON {"rank","factor","step","reference_s","generation","by","reason","time"} set by the
    leader when straggler mitigation parks `rank` (it leaves the plan, stays in the job,
    probes its speed); the rank deletes it when it rejoins. While it is set, membership
    neither expects nor admits the rank (odyssey/parked.py)."""
    return f"odyssey/parked/{rank}"


def unparked_key(rank: int) -> str:
    """JSON {"rank","factor","probes","parked_step","time"} the parked `rank` writes when
    its probe clears it, just before it deletes its park record and rejoins."""
    return f"odyssey/parked/back/{rank}"


PARKED_COUNT = "odyssey/parked/count"
"""Bumped once per park (then that count's parked_note_key names the rank)."""


def parked_note_key(k: int) -> str:
    """The rank the park whose bump of PARKED_COUNT returned `k` parked."""
    return f"odyssey/parked/note/{k}"


def injected_key(rank: int) -> str:
    """When an injected fault fired in `rank` (wall time), for MTTR accounting."""
    return f"odyssey/injected/{rank}"


def checkpoint_files_key(tag: int, step: int, rank: int) -> str:
    """JSON {file: {"sha256","size"}} a checkpoint writer reports once its files of that
    step are written (`tag`: the generation); the leader then writes the manifest."""
    return f"odyssey/gen{tag}/ckpt/{step}/files/{rank}"


def checkpoint_copy_key(tag: int, step: int, layer: int) -> str:
    """A layer file's bytes on their way from its writer to the rank that keeps its peer
    copy (a chunked blob, `odyssey/store_blob.py`); the receiver deletes it."""
    return f"odyssey/gen{tag}/ckpt/{step}/copy/{layer}"


def checkpoint_manifest_key(tag: int, step: int) -> str:
    """JSON {"meta", "manifest"} (file texts) the leader publishes when it completes a
    step, or {"abandoned": true}: peer-copy holders write them beside their copies."""
    return f"odyssey/gen{tag}/ckpt/{step}/manifest"


def checkpoint_inventory_key(attempt: int, rank: int) -> str:
    """JSON {step: {"manifest": text or null, "files": [names that verify here],
    "problems": [...]}}: what one rank's disks hold, published when the job (re)starts to
    agree on the step to resume (odyssey/checkpoint_share.py)."""
    return f"odyssey/attempt{attempt}/ckpt/inventory/{rank}"


def checkpoint_fetch_key(attempt: int, step: int, name: str, rank: int) -> str:
    """A checkpoint file's bytes sent at a (re)start to `rank`, which needs it and has no
    copy on its own disks (a chunked blob)."""
    return f"odyssey/attempt{attempt}/ckpt/{step}/fetch/{name}/{rank}"


STOP_REQUEST = "odyssey/stop/request"
"""Set by a launcher that received SIGTERM/SIGINT (value: the signal, signed with the job
token): workers stop at the next step boundary, checkpoint the last committed step, exit 0."""
STOP_AT = "odyssey/stop/at"
"""The step the job stops before (compare-and-set by the first rank that saw the request,
so every rank stops at the same boundary)."""

NEWCOMERS_COUNT = "odyssey/newcomers/count"


def newcomer_key(index: int) -> str:
    return f"odyssey/newcomers/{index}"


INJECT_COUNT = "odyssey/inject/count"


def inject_key(index: int) -> str:
    """A fault spec string from `odyssey inject` (step=-1: the next step), signed with the
    job token; ranks ignore one without a valid HMAC (odyssey/control.py)."""
    return f"odyssey/inject/{index}"


TOKEN_CHECK = "odyssey/token/check"
"""HMAC of this very key name under the job token, set by the launchers: a control CLI
checks its token against it before sending anything (the token itself is never stored)."""
SPAWN_COUNT = "odyssey/spawn/count"
"""Counter of replacement-worker requests; request i is ``odyssey/spawn/{i}``."""
NEXT_RANK = "odyssey/next_rank"
"""Counter of replacement workers started; the i-th gets global rank world_size + i."""


def spawn_key(index: int) -> str:
    """JSON ``{"node", "reason"}``, signed with the job token: start one replacement
    worker on that node (launchers ignore an unsigned or forged request)."""
    return f"odyssey/spawn/{index}"


def worker_key(rank: int) -> str:
    """Key of the JSON spawn record ``{"rank","pid","node","host"}`` (an Odyssey addition)."""
    return f"odyssey/workers/{rank}"


def node_done_key(node: int) -> str:
    """Set by a node's launcher once all its workers have exited (multi-node bookkeeping)."""
    return f"odyssey/nodes/{node}/done"


def node_beat_key(node: int) -> str:
    """Counter a node's launcher bumps every fraction of a second (liveness, multi-node)."""
    return f"odyssey/nodes/{node}/beat"


def node_lost_key(node: int) -> str:
    """JSON ``{"node","by","time","last_beat","silent_s"}``: set once (compare-and-set) by
    the watcher that declared ``node`` lost (launch/node_watch.py)."""
    return f"odyssey/nodes/{node}/lost"


NODES_CONFIG = "odyssey/nodes/config"
"""JSON ``{"nnodes","world_size","node_timeout_s"}`` set by every multi-node launcher, so
``odyssey store`` knows which heartbeats to watch."""


@dataclass(frozen=True)
class ExitRecord:
    """What the launcher records when a worker process ends.

    ``exitcode`` follows :class:`subprocess.Popen`: the exit status, or ``-N`` when the
    process was killed by signal ``N`` (then ``signal`` holds its name, e.g. ``SIGKILL``).
    A rank whose whole node was lost gets ``exitcode`` 255, no ``signal``, and
    ``node_lost`` set to the node (written by the watcher that declared it lost).
    """

    rank: int
    pid: int
    exitcode: int
    signal: str | None
    time: float
    node_lost: int | None = None

    @classmethod
    def from_returncode(cls, rank: int, pid: int, returncode: int, when: float) -> ExitRecord:
        """Build a record from a ``Popen.returncode``."""
        sig = signal_name(-returncode) if returncode < 0 else None
        return cls(rank, pid, returncode, sig, when)

    def to_json(self) -> str:
        """Serialise as the JSON object stored under :func:`exit_key`."""
        return json.dumps(asdict(self))

    def describe(self) -> str:
        """Human-readable outcome, e.g. ``exit 0`` or ``killed by SIGKILL``."""
        if self.node_lost is not None:
            return f"lost with node {self.node_lost}"
        return f"killed by {self.signal}" if self.signal else f"exit {self.exitcode}"


def signal_name(signum: int) -> str:
    """``9 -> "SIGKILL"``; unknown numbers become ``"SIG<n>"``."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"
