"""Multi-node over real network interfaces: "machines" made of Linux network namespaces.

Each test builds its own namespaces (as root), joined by a veth pair (two hosts) or a
bridge (three), with addresses from 10.231.77.0/24 that exist only between them: no
traffic leaves for anywhere but those addresses and each namespace's loopback. In each
"node" it runs the README's multi-node command (`odyssey run --nnodes 2 --nproc-per-node 2
--rdzv-backend c10d --rdzv-endpoint NODE0:PORT ...`) through `ip netns exec`, with no
--local-addr and no hand-set variable: the launchers must find their addresses, node 0
must see that the endpoint is its own, and gloo must bind the node's address.

1. SIGKILL of rank 3 (node 1) mid-run: the job recovers in place across the nodes and
   ends on the failure-free loss trajectory with nothing lost or trained twice.
2. The store runs apart (`odyssey store` in a third namespace); SIGKILL of node 0's
   launcher (its workers, the leader among them, die with it): node 1 finishes the job.

Namespaces and every process in them are removed whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from odyssey import contract
from tests.conftest import ROOT
from tests.odyssey.test_fault_tolerance import TINY, check_same_numbers, recoveries

pytestmark = pytest.mark.slow

SUBNET = "10.231.77"
"""Test-only addresses: .1 node 0, .2 node 1, .3 the store; nothing else uses them."""
RDZV_PORT = 29400
STORE_PORT = 29600
STEPS = 12
TRAIN = [str(ROOT / "examples" / "train_gpt.py"), "--log-every", "100", "--dp", "2",
         "--pp", "2", "--steps", str(STEPS), "--num-microbatches", "4",
         "--microbatch-size", "2", *TINY]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _cannot_make_namespaces() -> str | None:
    """Why this machine cannot run these tests, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    probe = f"odyprobe{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class Hosts:
    """Network namespaces standing in for machines, and what runs in them."""

    def __init__(self, tag: str, n: int) -> None:
        self.prefix = f"ody{os.getpid()}{tag}"
        self.names = [f"{self.prefix}h{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.bridge = f"{self.prefix}br" if n > 2 else None
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def _add_netns(self, name: str) -> None:
        self._must("netns", "add", name)
        self.made.append(name)
        self._must("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        """Two hosts: one veth pair between them; three: each on a port of a bridge that
        lives in a namespace of its own (it has no address)."""
        for name in self.names:
            self._add_netns(name)
        if self.bridge is None:
            a, b = self.names
            self._must("-n", a, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1",
                       "netns", b)
        else:
            self._add_netns(self.bridge)
            self._must("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            self._must("-n", self.bridge, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                port = f"port{i}"
                self._must("-n", self.bridge, "link", "add", port, "type", "veth", "peer",
                           "name", "eth1", "netns", name)
                self._must("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        for name, addr in zip(self.names, self.addrs):
            self._must("-n", name, "addr", "add", f"{addr}/24", "dev", "eth1")
            self._must("-n", name, "link", "set", "eth1", "up")

    def _must(self, *args: str) -> None:
        done = _ip(*args)
        assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"

    def run(self, host: int, argv: list[str], log: Path) -> subprocess.Popen:
        """Start ``argv`` in namespace ``host`` (own session), output to ``log``."""
        with open(log, "w") as f:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.names[host], *argv], cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"},
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def check_reachable(self, src: int, dst: int) -> None:
        """A TCP connection from host ``src`` to host ``dst``'s address (there is no ping)."""
        server = ("import socket,sys\n"
                  f"s=socket.create_server(('{self.addrs[dst]}',0))\n"
                  "print(s.getsockname()[1],flush=True)\n"
                  "s.settimeout(10); s.accept()\n")
        srv = subprocess.Popen(["ip", "netns", "exec", self.names[dst], sys.executable, "-c",
                                server], stdout=subprocess.PIPE, text=True)
        try:
            port = int(srv.stdout.readline())
            client = (f"import socket; socket.create_connection(('{self.addrs[dst]}',{port}),"
                      "timeout=10).close()")
            done = subprocess.run(["ip", "netns", "exec", self.names[src], sys.executable,
                                   "-c", client], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"host {src} cannot reach host {dst}: {done.stderr}"
            srv.wait(timeout=10)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait(timeout=5)

    def cleanup(self) -> None:
        """Kill what runs in the namespaces, then delete them."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in self.made:
            pids = _ip("netns", "pids", name).stdout.split()
            for pid in map(int, pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.made):
            deadline = time.monotonic() + 10
            while _ip("netns", "pids", name).stdout.split() and time.monotonic() < deadline:
                time.sleep(0.1)
            _ip("netns", "del", name)


@pytest.fixture
def hosts() -> Iterator:
    """Factory: ``hosts(n)`` -> :class:`Hosts` with ``n`` namespaces, built and reachable."""
    reason = _cannot_make_namespaces()
    if reason is not None:
        pytest.skip(reason)
    made: list[Hosts] = []

    def make(n: int) -> Hosts:
        made.append(Hosts(str(len(made)), n))
        made[-1].build()
        for src in range(n):
            for dst in range(n):
                if src != dst:
                    made[-1].check_reachable(src, dst)
        return made[-1]

    try:
        yield make
    finally:
        for h in made:
            h.cleanup()


def odyssey_run(node0: str, run_dir: Path, *extra: str) -> list[str]:
    """The README's multi-node command (same on every node), for this test's model."""
    return [sys.executable, "-m", "launch.cli", "run", "--nnodes", "2", "--nproc-per-node",
            "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{node0}:{RDZV_PORT}",
            "--rdzv-id", "netns", "--run-dir", str(run_dir), "--finish-grace", "20", *extra]


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{log.name} still running after {timeout:.0f}s:\n"
                             f"{log.read_text()[-3000:]}") from None


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.timeout(300)
def test_two_nodes_over_veth_survive_a_killed_rank_on_node1(hosts, tmp_path):
    h = hosts(2)
    run_dir = tmp_path / "run"
    cmd = [*odyssey_run(h.addrs[0], run_dir), *TRAIN,
           "--inject", "kill:rank=3,step=5,phase=backward"]
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = [h.run(n, cmd, logs[n]) for n in range(2)]
    codes = [_wait(p, log, 200) for p, log in zip(nodes, logs)]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    report = json.loads((run_dir / contract.REPORT_FILE).read_text())
    check_same_numbers(report, run_dir, steps=STEPS)
    [event] = recoveries(report)
    assert event["ranks_lost"] == [3]
    # Each node's workers bound its own address (found by routing, no --local-addr);
    # node 0 saw the rendezvous endpoint was its own and hosted it and the store there.
    infos = [json.loads((run_dir / contract.launcher_file(n)).read_text()) for n in range(2)]
    assert [i["workers_host"] for i in infos] == h.addrs
    assert infos[0]["store_addr"] == h.addrs[0] == infos[1]["store_addr"]
    assert infos[1]["exits"]["3"]["signal"] == "SIGKILL"
    assert "is this node's own address: hosting it" in logs[0].read_text()


@pytest.mark.timeout(300)
def test_store_apart_in_a_third_namespace_survives_losing_node0(hosts, tmp_path):
    h = hosts(3)
    node0, store_host = h.addrs[0], h.addrs[2]
    endpoint = tmp_path / "store.json"
    store_log = tmp_path / "store.log"
    store = h.run(2, [sys.executable, "-m", "launch.cli", "store", "--host", store_host,
                      "--port", str(STORE_PORT), "--endpoint-file", str(endpoint),
                      "--exit-after-done", "5"], store_log)
    deadline = time.monotonic() + 30
    while not endpoint.exists():
        assert store.poll() is None and time.monotonic() < deadline, store_log.read_text()
        time.sleep(0.05)

    run_dir = tmp_path / "run"
    # Rank 0 (node 0) pauses at step 4: the window in which node 0's launcher is killed.
    cmd = [*odyssey_run(node0, run_dir, "--store-endpoint", f"{store_host}:{STORE_PORT}",
                        "--node-timeout", "3"),
           *TRAIN, "--heartbeat-timeout-s", "1.5", "--inject", "slow:rank=0,step=4,delay=3"]
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = [h.run(n, cmd, logs[n]) for n in range(2)]
    metrics = run_dir / contract.METRICS_FILE
    deadline = time.monotonic() + 120
    while _lines(metrics) < 4:
        assert time.monotonic() < deadline and nodes[1].poll() is None, \
            "\n".join(log.read_text()[-3000:] for log in logs)
        time.sleep(0.05)
    launcher0 = json.loads((run_dir / contract.launcher_file(0)).read_text())
    os.kill(launcher0["launcher_pid"], signal.SIGKILL)  # its workers die with it

    assert _wait(nodes[1], logs[1], 150) == 0, logs[1].read_text()[-4000:]
    assert _wait(store, store_log, 30) == 0, store_log.read_text()
    report = json.loads((run_dir / contract.REPORT_FILE).read_text())
    check_same_numbers(report, run_dir, steps=STEPS)
    [event] = recoveries(report)
    assert event["ranks_lost"] == [0, 1] and event["members"] == [2, 3]
    info1 = json.loads((run_dir / contract.launcher_file(1)).read_text())
    assert info1["workers_host"] == h.addrs[1] and info1["store_addr"] == store_host
    assert "declared lost" in store_log.read_text() + logs[1].read_text()


@pytest.mark.timeout(300)
def test_node_local_checkpoints_survive_losing_a_nodes_disk(hosts, tmp_path):
    """Each node checkpoints onto its own disk (--checkpoint.dir and --checkpoint.peer-dir
    node-local), with peer copies on; node 1's disk is then lost whole. The rerun on a
    fresh node 1 gathers node 1's layers from the copies on node 0's disk, through the
    store, and continues on the failure-free trajectory."""
    h = hosts(2)
    run_dir = tmp_path / "run"
    disks = [tmp_path / f"disk{n}" for n in range(2)]

    def run(steps: int, tag: str) -> list[str]:
        train = [*TRAIN[:TRAIN.index("--dp")], "--dp", "1", "--pp", "4",
                 *TRAIN[TRAIN.index("--steps"):]]
        train[train.index("--steps") + 1] = str(steps)
        logs = [tmp_path / f"{tag}-node{n}.log" for n in range(2)]
        procs = [h.run(n, [*odyssey_run(h.addrs[0], run_dir), *train,
                           "--checkpoint-every", "4", "--checkpoint.peer-copy",
                           "--checkpoint.dir", str(disks[n] / "ckpt"),
                           "--checkpoint.peer-dir", str(disks[n] / "copies")], logs[n])
                 for n in range(2)]
        codes = [_wait(p, log, 200) for p, log in zip(procs, logs)]
        out = [log.read_text() for log in logs]
        assert codes == [0, 0], "\n".join(o[-3000:] for o in out)
        return out

    run(8, "first")
    # ranks 2, 3 (node 1) wrote layers 2, 3; their copies went to node 0's ranks
    for layer in (2, 3):
        name = contract.checkpoint_layer_file(layer)
        assert (disks[1] / "ckpt" / contract.checkpoint_step_dir(7) / name).is_file()
        assert not (disks[0] / "ckpt" / contract.checkpoint_step_dir(7) / name).exists()
        copies = list((disks[0] / "copies").glob(f"rank*/{contract.checkpoint_step_dir(7)}/{name}"))
        assert len(copies) == 1, f"layer {layer}: {copies}"
    shutil.rmtree(disks[1])  # node 1's disk is lost with everything on it

    out = run(12, "second")
    assert "resumed from checkpoint of step 7" in out[0], out[0][-3000:]
    report = json.loads((run_dir / contract.REPORT_FILE).read_text())
    check_same_numbers(report, run_dir, steps=12)
    for layer in (2, 3):  # node 1 got them back from node 0's copies
        assert (disks[1] / "ckpt" / contract.checkpoint_step_dir(7)
                / contract.checkpoint_layer_file(layer)).is_file()
