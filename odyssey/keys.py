"""Store keys shared by workers and the launcher (launch/contract.py spells the same).

Everything lives under `odyssey/`. Generation-scoped keys carry `gen{g}` so a new
generation never reads a stale value of an old one.
"""

from __future__ import annotations

# written by the launcher
EXITS_COUNT = "odyssey/exits/count"
JOB_STATUS = "odyssey/job/status"
JOB_DONE = "done"


def exit_key(rank: int) -> str:
    """JSON exit record {"rank","pid","exitcode","signal","time"} written by the launcher."""
    return f"odyssey/exits/{rank}"


def fence_key(rank: int) -> str:
    """Set (value: reason) by anyone to ask the owning launcher to kill `rank`."""
    return f"odyssey/fence/{rank}"


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


def injected_key(rank: int) -> str:
    """When an injected fault fired in `rank` (wall time), for MTTR accounting."""
    return f"odyssey/injected/{rank}"


NEWCOMERS_COUNT = "odyssey/newcomers/count"


def newcomer_key(index: int) -> str:
    return f"odyssey/newcomers/{index}"


INJECT_COUNT = "odyssey/inject/count"


def inject_key(index: int) -> str:
    """A fault spec string from `odyssey inject` (step=-1: the next step)."""
    return f"odyssey/inject/{index}"
