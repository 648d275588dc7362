"""Optimal assignment: the Hungarian method, and its grouped form (transportation).

`hungarian(cost)` assigns each row to a distinct column at least total cost (O(n^2 m),
Kuhn-Munkres with potentials). A fresh recovery plan assigns ranks to stages, but at a
thousand ranks an n x n matrix is too slow in Python; ranks that held the same layers
are interchangeable, and so are stages with the same layers, so `transport` solves the
same problem on groups: `supply[g]` ranks of group g, `demand[s]` stages of kind s,
`cost[g][s]` per rank placed. It is a min-cost flow (successive shortest paths), exact,
and its size is the number of distinct old and new layer spans, not of ranks.
"""

from __future__ import annotations

import math


def hungarian(cost: list[list[float]]) -> list[int]:
    """Column of each row (rows <= columns) minimising the summed cost."""
    n = len(cost)
    if n == 0:
        return []
    m = len(cost[0])
    if m < n:
        raise ValueError(f"hungarian needs rows <= columns, got {n} x {m}")
    inf = math.inf
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)  # row and column potentials
    match = [0] * (m + 1)  # row (1-based) matched to each column; 0: free
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        least, used = [inf] * (m + 1), [False] * (m + 1)
        while match[j0]:  # grow an alternating tree from row i until a free column
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            row = cost[i0 - 1]
            for j in range(1, m + 1):
                if not used[j]:
                    cur = row[j - 1] - u[i0] - v[j]
                    if cur < least[j]:
                        least[j], way[j] = cur, j0
                    if least[j] < delta:
                        delta, j1 = least[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    least[j] -= delta
            j0 = j1
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    out = [0] * n
    for j in range(1, m + 1):
        if match[j]:
            out[match[j] - 1] = j - 1
    return out


def transport(supply: list[int], demand: list[int], cost: list[list[float]]
              ) -> list[list[int]]:
    """flow[g][s]: how many of group g's units go to kind s, every demand met exactly
    (sum(supply) >= sum(demand)), at least total cost. Successive shortest paths in the
    residual graph (Bellman-Ford: reverse edges have negative cost), each augmenting by
    its bottleneck, so the number of rounds grows with the groups, not the units."""
    if sum(supply) < sum(demand):
        raise ValueError(f"transport: supply {sum(supply)} < demand {sum(demand)}")
    ng, ns = len(supply), len(demand)
    flow = [[0] * ns for _ in range(ng)]
    left, need = list(supply), list(demand)
    scale = max((abs(c) for row in cost for c in row), default=0.0)
    eps = 1e-12 * scale  # float sums: never relax on rounding noise (no false cycles)
    while any(need):
        # nodes: groups 0..ng-1, kinds ng..ng+ns-1; sources: groups with units left
        dist = [0.0 if left[g] else math.inf for g in range(ng)] + [math.inf] * ns
        prev = [-1] * (ng + ns)
        for _ in range(ng + ns):
            changed = False
            for g in range(ng):
                dg = dist[g]
                if dg < math.inf:
                    row = cost[g]
                    for s in range(ns):
                        d = dg + row[s]
                        if d < dist[ng + s] - eps:
                            dist[ng + s], prev[ng + s], changed = d, g, True
            for s in range(ns):
                ds = dist[ng + s]
                if ds < math.inf:
                    for g in range(ng):
                        if flow[g][s] and ds - cost[g][s] < dist[g] - eps:
                            dist[g], prev[g], changed = ds - cost[g][s], ng + s, True
            if not changed:
                break
        end = min((s for s in range(ns) if need[s] and dist[ng + s] < math.inf),
                  key=lambda s: (dist[ng + s], s), default=None)
        if end is None:
            raise ValueError("transport: no augmenting path (cost matrix has inf?)")
        path, node = [], ng + end  # walk back: kind <- group <- kind <- ... <- source
        while True:
            g = prev[node]
            path.append((g, node - ng, +1))
            if prev[g] == -1:
                break
            path.append((g, prev[g] - ng, -1))
            node = prev[g]
        amount = min(need[end], left[path[-1][0]],
                     *(flow[g][s] for g, s, sign in path if sign < 0))
        for g, s, sign in path:
            flow[g][s] += sign * amount
        need[end] -= amount
        left[path[-1][0]] -= amount
    return flow
