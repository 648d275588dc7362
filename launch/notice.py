"""The launcher's half of failure notices: announce recorded exits to the running
generation (`odyssey/gen{g}/notice`, first writer wins), so the survivors' watcher
threads wake at once instead of every rank polling the exit records."""

from __future__ import annotations

import json

from launch.store import SafeStore
from odyssey import contract


def announce_exits(store: SafeStore, ranks: list[int], reason: str, by: str,
                   when: float) -> None:
    """Publish a failure notice for `ranks` unless none of them is in the generation
    the job is running (e.g. a rank fenced during agreement, already left out)."""
    if not ranks or not store.check(contract.GENERATION):
        return  # not an Odyssey job, or not started: nobody watches notices
    gen = int(store.get_text(contract.GENERATION) or 0)
    # the running generation, and the next one if its members are already agreed (a
    # failure during recovery: the survivors are building it and watch its notice)
    for g in (gen, gen + 1):
        key = contract.members_key(g)  # absent for generation 0 (everyone)
        members = store.get_text(key) if store.check(key) else None
        if members is None and g > gen:
            break
        mine = [r for r in ranks if members is None or r in json.loads(members)["members"]]
        if mine:
            notice = {"kind": "failure", "reason": f"rank(s) {sorted(mine)} {reason}",
                      "suspects": sorted(mine), "by": by, "gen": g, "time": when}
            store.compare_set(contract.notice_key(g), "", json.dumps(notice))
