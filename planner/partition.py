"""Stage partitioning and microbatch splitting.

`Partitioner.solve` splits layers into p contiguous non-empty stages minimising the
slowest stage's time, subject to each stage's memory (which depends on its index through
the microbatches it keeps in flight). It binary-searches the bottleneck over the
O(L^2) possible range sums and checks each with a greedy pass that makes every stage
as long as both limits allow: greedy boundaries never fall behind those of any feasible
partition (time and memory grow with the range), so the search is exact.

`split_microbatches` shares M microbatches among pipelines of different speeds
(used by the search and by recovery).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np


class Partitioner:
    """Layer tables for one microbatch size, with range sums and candidate bottlenecks."""

    def __init__(self, times: Sequence[float], static: Sequence[float],
                 act: Sequence[float], out: Sequence[float], reserve: float = 0.0):
        self.n = len(times)
        self.t = np.concatenate([[0.0], np.cumsum(times)]).tolist()
        self.s = np.concatenate([[0.0], np.cumsum(static)]).tolist()
        self.a = np.concatenate([[0.0], np.cumsum(act)]).tolist()
        self.out = list(out)
        self.reserve = reserve
        self._cands: list[float] | None = None
        self._ck: dict[int, list[float]] = {}
        self._s_np = np.asarray(self.s)
        self._a_np = np.asarray(self.a)

    def _combined(self, k: int) -> list[float]:
        """Prefix of static + k * saved bytes (a lower bound of stage memory)."""
        if k not in self._ck:
            self._ck[k] = (self._s_np + k * self._a_np).tolist()
        return self._ck[k]

    def candidates(self) -> list[float]:
        """Every distinct range time, ascending (the possible bottlenecks)."""
        if self._cands is None:
            p = np.asarray(self.t)
            diffs = p[None, :] - p[:, None]
            # sorted, then deduplicated: np.unique's first call imports numpy.ma (14 ms
            # measured inside a recovery decision's plan phase)
            v = np.sort(diffs[np.triu_indices(len(p), 1)])
            self._cands = v[np.concatenate(([True], v[1:] != v[:-1]))].tolist()
        return self._cands

    def memory(self, a: int, b: int, inflight: int) -> float:
        """Peak memory of a stage holding layers [a, b) with `inflight` microbatches."""
        return (self.s[b] - self.s[a] + inflight * (self.a[b] - self.a[a] + self.out[b - 1])
                + self.reserve)

    def time(self, a: int, b: int) -> float:
        return self.t[b] - self.t[a]

    def _greedy(self, p: int, inflight: Sequence[int], t_max: float,
                m_max: float) -> list[int] | None:
        bounds = [0]
        a, t, n = 0, self.t, self.n
        for s in range(p):
            hi = n - (p - s - 1)
            e = min(bisect_right(t, t[a] + t_max * (1 + 1e-12) + 1e-18, a + 1, hi + 1) - 1, hi)
            k = inflight[s]
            ck = self._combined(k)
            room = (m_max - self.reserve) * (1 + 1e-12)
            e = min(e, bisect_right(ck, ck[a] + room, a + 1, hi + 1) - 1)
            while e > a and self.memory(a, e, k) > m_max:
                e -= 1
            if e <= a:
                return None
            bounds.append(e)
            a = e
        return bounds if a == n else None

    def solve(self, p: int, inflight: Sequence[int], mem_limit: float,
              speed: Sequence[float] | None = None) -> list[int] | None:
        """Stage boundaries [0, b1, ..., n] minimising the bottleneck, or None if no
        partition into p stages fits `mem_limit`. With `speed`, stage s computes speed[s]
        x slower (a straggler): see `solve_weighted`."""
        if not 1 <= p <= self.n:
            return None
        if speed is not None and any(f != 1.0 for f in speed):
            return self.solve_weighted(p, inflight, mem_limit, speed)
        total = self.t[-1]
        if self._greedy(p, inflight, total, mem_limit) is None:
            return None
        cands = self.candidates()
        lo = bisect_right(cands, total / p * (1 - 1e-12)) - 1
        lo, hi = max(lo, 0), len(cands) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._greedy(p, inflight, cands[mid], mem_limit) is None:
                lo = mid + 1
            else:
                hi = mid
        return self._greedy(p, inflight, cands[lo], mem_limit)

    def solve_weighted(self, p: int, inflight: Sequence[int], mem_limit: float,
                       speed: Sequence[float], near: Sequence[int] | None = None
                       ) -> list[int] | None:
        """`solve` when stage s's time is speed[s] x its layers': dynamic programs over
        (stage, boundary), O(p n^2). The greedy check is not exact here: a long early
        stage can leave a slow later one a first layer it cannot take. Among the
        partitions with the least bottleneck, the one whose boundaries are closest to
        `near` (the current ones: fewest layers move)."""
        if len(speed) != p or min(speed) <= 0:
            raise ValueError(f"speed needs {p} positive factors, got {list(speed)}")
        if near is not None and len(near) != p + 1:
            raise ValueError(f"near needs {p + 1} boundaries, got {list(near)}")
        t = self.t

        def stage_s(s: int, a: int, e: int) -> float:  # inf: over the memory limit
            return (speed[s] * (t[e] - t[a]) if self.memory(a, e, inflight[s]) <= mem_limit
                    else math.inf)

        best = self._layout_dp(p, lambda s, a, e, v: max(v, stage_s(s, a, e)))
        if best is None:
            return None
        if near is None:
            return best[1]
        cap = best[0] * (1 + 1e-9)
        closest = self._layout_dp(p, lambda s, a, e, v: v + abs(e - near[s + 1])
                                  if stage_s(s, a, e) <= cap else math.inf)
        return closest[1] if closest is not None else best[1]

    def _layout_dp(self, p: int, step) -> tuple[float, list[int]] | None:
        """Least value of p contiguous non-empty stages, where step(s, a, e, v) is the
        value after stage s holds [a, e) on top of value v (inf: not allowed)."""
        n = self.n
        best = [0.0] + [math.inf] * n  # best[e]: the stages so far ending at e
        cut: list[list[int]] = []
        for s in range(p):
            nxt, arg = [math.inf] * (n + 1), [-1] * (n + 1)
            for e in range(s + 1, n - (p - s - 1) + 1):
                for a in range(s, e):
                    if best[a] < math.inf:
                        v = step(s, a, e, best[a])
                        if v < nxt[e]:
                            nxt[e], arg[e] = v, a
            best = nxt
            cut.append(arg)
        if best[n] == math.inf:
            return None
        bounds = [n]
        for s in range(p - 1, -1, -1):
            bounds.append(cut[s][bounds[-1]])
        return best[n], bounds[::-1]

    def min_memory(self, p: int, inflight: Sequence[int]) -> float:
        """Smallest per-rank memory limit for which some p-stage partition fits."""
        if not 1 <= p <= self.n:
            return float("inf")
        hi = max(self.memory(0, self.n, max(inflight)), 1.0)
        lo = 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if self._greedy(p, inflight, float("inf"), mid) is None:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-6 * hi:
                break
        return hi


def split_microbatches(total: int, per_microbatch_s: Sequence[float],
                       fixed_s: Sequence[float] | None = None, min_each: int = 1) -> list[int]:
    """Counts n_i (sum = total, n_i >= min_each) minimising max_i(fixed_i + n_i * per_i).

    Pipelines that take per_microbatch_s[i] per extra microbatch (its bottleneck stage)
    after a fixed fill/drain time fixed_s[i]: the faster pipeline gets more. Greedy
    assignment of one microbatch at a time to the pipeline that would finish first is
    optimal for this objective.
    """
    k = len(per_microbatch_s)
    if k == 0:
        raise ValueError("no pipelines to split microbatches across")
    if total < k * min_each:
        raise ValueError(f"{total} microbatches cannot give {k} pipelines {min_each} each")
    fixed = list(fixed_s) if fixed_s is not None else [0.0] * k
    counts = [min_each] * k
    heap = [(fixed[i] + (min_each + 1) * per_microbatch_s[i], i) for i in range(k)]
    heapq.heapify(heap)
    for _ in range(total - k * min_each):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (fixed[i] + (counts[i] + 1) * per_microbatch_s[i], i))
    return counts


def makespan(total: int, classes: Sequence[tuple[float, float, int]]) -> float:
    """Best max time when `total` microbatches go to pipeline classes
    (fixed_s, per_microbatch_s, how many pipelines), each pipeline >= 1 microbatch."""
    def capacity(t: float) -> int:
        cap = 0
        for fixed, per, mult in classes:
            n = int((t - fixed) / per + 1e-9) if per > 0 else total
            if n < 1:
                return -1
            cap += n * mult
        return cap

    best = float("inf")
    for fixed, per, _ in classes:
        lo, hi = 1, max(1, total)
        if capacity(fixed + hi * per) < total:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if capacity(fixed + mid * per) >= total:
                hi = mid
            else:
                lo = mid + 1
        best = min(best, fixed + lo * per)
    return best


def assign_microbatches(counts: Sequence[int]) -> list[list[int]]:
    """Deal microbatch ids 0..sum-1 so pipeline i gets counts[i], spread evenly
    (equal counts give the round-robin of `Plan.uniform`)."""
    out: list[list[int]] = [[] for _ in counts]
    heap = [(1.0 / c, i) for i, c in enumerate(counts) if c > 0]
    heapq.heapify(heap)
    for mid in range(sum(counts)):
        _, i = heapq.heappop(heap)
        out[i].append(mid)
        if len(out[i]) < counts[i]:
            heapq.heappush(heap, ((len(out[i]) + 1) / counts[i], i))
    return out
