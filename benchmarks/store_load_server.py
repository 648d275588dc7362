"""The store server of a store_load.py point, and what the machine's CPUs did meanwhile.

The server is `odyssey store` (launch/serve_store.py: the runtime's own TCPStore server,
libuv backend, hosted apart from the workers) in a process of its own, so the load
generator's threads never share its interpreter. `CpuSampler` reads /proc every 0.1 s:
the server's and the generator's CPU time and the whole machine's busy time, so a point
says whether the server, the generator or other work took the cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


@contextmanager
def store_server(env: dict | None = None, timeout_s: float = 60.0):
    """Start `odyssey store --port 0` (with `env`) and yield (port, pid); stop it afterwards."""
    with tempfile.TemporaryDirectory(prefix="store_load_") as d:
        endpoint = Path(d) / "endpoint.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.serve_store", "--host", "127.0.0.1", "--port", "0",
             "--endpoint-file", str(endpoint)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not endpoint.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"odyssey store exited: {proc.stderr.read()[-500:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("odyssey store did not start")
                time.sleep(0.05)
            yield json.loads(endpoint.read_text())["port"], proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _proc_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _machine_busy_s() -> float:
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in cpu[:8]]
    return (sum(vals) - vals[3] - vals[4]) / TICK  # everything but idle and iowait


class CpuSampler:
    """Samples (time, server CPU s, generator CPU s, machine busy s) every `period_s`."""

    def __init__(self, server_pid: int, generator_pid: int | None = None,
                 period_s: float = 0.1):
        self.server_pid, self.period_s = server_pid, period_s
        self.generator_pid = generator_pid
        """Set once the generator's worker runs (the compiled generator: one process)."""
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), _proc_cpu_s(self.server_pid),
                                 _proc_cpu_s(self.generator_pid or -1), _machine_busy_s()))
            self._stop.wait(self.period_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def cores(self, t0: float, t1: float) -> dict:
        """Mean cores used in [t0, t1] (nearest samples inside it): server, generator (the
        compiled generator's worker; None for the Python one), machine."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {"server_cores": None, "generator_cores": None, "machine_busy_cores": None}
        a, b = inside[0], inside[-1]
        dt = b[0] - a[0]
        gen = (b[2] - a[2]) / dt
        return {"server_cores": round((b[1] - a[1]) / dt, 3),
                "generator_cores": round(gen, 3) if gen == gen else None,  # nan: none
                "machine_busy_cores": round((b[3] - a[3]) / dt, 3)}
