"""One torchft replica group (1 process) for benchmarks/torchft_baseline.py.

Trains Odyssey's emulated-compute model (8 sleeping layers, fwd 10 ms / bwd 20 ms per layer
per microbatch, dim 16) with torchft's public API: Manager + DistributedDataParallel +
Optimizer (the manager-wrapped optimizer) + ProcessGroupGloo, against a lighthouse the
driver started. The global batch is Odyssey's: 8 microbatches x 2 samples per step; replica
group g statically owns microbatches [g*m, (g+1)*m) with m = 8 / num_groups (the way
torchft's own DistributedSampler shards by replica group: nothing is re-sharded when a
group dies). Each step's samples are keyed by the manager's committed step, so a step that
does not commit is retried with the same samples and a healed replica resumes at the
right place (the most favourable data handling torchft allows; torchft's train_ddp.py
iterates its loader regardless of commits, which loses more).

Every event is one JSON line (wall-clock time.time(); the driver runs on the same host)
in the file named by --events. Not meant to be run by hand.
"""

from __future__ import annotations

import time

T_PROC_START = time.time()  # before the heavy imports: a relaunch pays them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", type=int, required=True, help="replica group id")
    ap.add_argument("--num-groups", type=int, default=2)
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--microbatches", type=int, default=8, help="global, per step")
    ap.add_argument("--microbatch-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--forward-ms", type=float, default=10.0)
    ap.add_argument("--backward-ms", type=float, default=20.0)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--go-file", default=None,
                    help="wait for this file after the manager is up (start all groups together)")
    ap.add_argument("--stop-file", default=None,
                    help="a file holding a step number: stop once that many steps committed")
    ap.add_argument("--deadline-s", type=float, default=300.0,
                    help="hard self-exit after this many seconds (leak guard)")
    args = ap.parse_args()

    # leak guard: whatever happens to the driver, this process ends
    threading.Timer(args.deadline_s, lambda: os._exit(3)).start()

    out = open(args.events, "a", buffering=1)

    def emit(ev: str, **kw) -> None:
        out.write(json.dumps({"ev": ev, "t": time.time(), "group": args.group, **kw}) + "\n")

    emit("proc_start", t_proc_start=T_PROC_START, pid=os.getpid())

    import torch
    import torchft.checkpointing.http_transport as ft_http
    import torchft.manager as ft_manager
    from torch import nn
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

    from odyssey.data import RandomRegression, Sampler
    from odyssey.emulate import EmulationConfig, build_emulated, mse_per_sample
    from odyssey.engine import OptimizerConfig, make_optimizer

    _bind_loopback(ft_manager, ft_http)
    torch.set_num_threads(1)
    emit("imported")

    emu = EmulationConfig(num_layers=args.layers, forward_ms=args.forward_ms,
                          backward_ms=args.backward_ms, dim=args.dim)
    lm = build_emulated(emu)
    data = RandomRegression(dim=args.dim)
    sampler = Sampler(args.microbatches, args.microbatch_size)
    if args.microbatches % args.num_groups:
        sys.exit("microbatches must divide among the replica groups")
    per_group = args.microbatches // args.num_groups
    my_mbs = list(range(args.group * per_group, (args.group + 1) * per_group))

    # Warm-up outside the measured path, like Odyssey's own joiner does: the first
    # backward and AdamW step in a process pay lazy-import seconds.
    warm = nn.Sequential(*[lm.build_layer(i) for i in range(args.layers)])
    wopt = make_optimizer(warm, OptimizerConfig())
    x, y = data.batch(sampler.sample_ids(0, 0))
    mse_per_sample(warm(x), y).mean().backward()
    wopt.step()
    del warm, wopt
    emit("warm")

    model = nn.Sequential(*[lm.build_layer(i) for i in range(args.layers)])
    inner_opt = make_optimizer(model, OptimizerConfig())

    def state_dict():
        return {"model": model.state_dict(), "optim": inner_opt.state_dict()}

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        inner_opt.load_state_dict(sd["optim"])

    # One process per replica group, so the group's TCPStore lives in this process.
    store = _loopback_store_class()("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(),              # default timeout (60 s)
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=1,                 # the survivor may train alone
        replica_id=f"odyssey_bench_{args.group}",
        store_addr="127.0.0.1",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=args.lighthouse,
        hostname="127.0.0.1",
        # every replica builds identical seeded weights: torchft documents init_sync=False
        # for that case (with True, group 1 heals from group 0 at step 0 and sits out
        # step 0, which would drop 8 samples that have nothing to do with the failure)
        init_sync=False,
        # everything else at torchft's defaults: use_async_quorum=True, timeout=60 s,
        # quorum_timeout=60 s, connect_timeout=60 s, heartbeat_interval=100 ms,
        # HTTP checkpoint transport
    )
    ddp = DistributedDataParallel(manager, model)
    opt = Optimizer(manager, inner_opt)
    emit("manager_ready")
    if args.go_file:
        while not os.path.exists(args.go_file):
            time.sleep(0.01)
        emit("go")

    it = 0
    while True:
        t_iter = time.time()
        opt.zero_grad()             # starts the (async) quorum
        manager.wait_quorum()       # public; lets us time "training again" exactly
        t_quorum = time.time()
        step = manager.current_step()
        participating = manager.is_participating()
        n_part = manager.num_participants()
        emit("step_start", it=it, step=step, t_iter=t_iter, participating=participating,
             num_participants=n_part, participating_rank=manager.participating_rank())
        ids: list[int] = []
        for j, mb in enumerate(my_mbs):
            sids = sampler.sample_ids(step, mb)
            ids += sids
            x, y = data.batch(sids)
            loss = mse_per_sample(ddp(x), y).mean() / len(my_mbs)
            if j < len(my_mbs) - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()     # the comm hook all-reduces across replica groups
        t_bwd = time.time()
        opt.step()                  # should_commit(); steps AdamW only if it says yes
        err = manager.errored()
        after = manager.current_step()
        emit("step_end", it=it, step=step, t_iter=t_iter, t_quorum=t_quorum, t_bwd=t_bwd,
             committed=after > step, participating=participating, num_participants=n_part,
             sample_ids=ids, errored=None if err is None else str(err)[:300])
        it += 1
        if after >= _stop_step(args):
            break
    emit("done", step=manager.current_step())
    out.flush()
    manager.shutdown(wait=False)
    os._exit(0)


def _stop_step(args) -> int:
    if args.stop_file:
        try:
            return int(Path(args.stop_file).read_text())
        except (OSError, ValueError):  # absent, or being written
            return 1 << 30
    return args.steps


_LISTENERS: list = []  # sockets handed to TCPStore servers: keep them open


def _loopback_store_class():
    """A TCPStore whose server (is_master, port 0) listens on 127.0.0.1 only.

    TCPStore has no bind-address argument; it accepts an already listening socket
    (master_listen_fd), so hand it one bound to the loopback address.
    """
    import socket

    from torch.distributed import TCPStore

    class LoopbackTCPStore(TCPStore):
        def __init__(self, host_name, port, *a, **kw):
            if kw.get("is_master") and port == 0 and kw.get("master_listen_fd") is None:
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                sock.listen(4096)
                _LISTENERS.append(sock)
                port, kw["master_listen_fd"] = sock.getsockname()[1], sock.fileno()
            super().__init__(host_name, port, *a, **kw)

    return LoopbackTCPStore


def _bind_loopback(ft_manager, ft_http) -> None:
    """Bind torchft's servers to 127.0.0.1 instead of every interface.

    torchft's Manager hard-codes the ManagerServer bind to "[::]:port", its HTTP
    checkpoint server to ("", 0) on IPv6, and its process group's rendezvous TCPStore to
    every interface; none has a public knob. This only rewrites listen addresses; the
    protocol is untouched. (Advertised addresses use socket.gethostname(), which must
    resolve to 127.0.0.1 - it does on this machine.)
    """
    import socket

    import torchft.process_group as ft_pg

    ft_pg.TCPStore = _loopback_store_class()

    real_server = ft_manager.ManagerServer

    def loopback_server(*a, **kw):
        if "bind" in kw:
            kw["bind"] = "127.0.0.1:" + kw["bind"].rsplit(":", 1)[1]
        return real_server(*a, **kw)

    ft_manager.ManagerServer = loopback_server

    class LoopbackHTTPServer(ft_http._IPv6HTTPServer):
        address_family = socket.AF_INET

        def __init__(self, server_address, handler):
            super().__init__(("127.0.0.1", server_address[1]), handler)

    ft_http._IPv6HTTPServer = LoopbackHTTPServer


if __name__ == "__main__":
    main()
