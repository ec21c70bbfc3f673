"""How much of this machine's CPU other processes used while we timed something.

A latency table timed beside other work reads that work's noise as steps. On a 2-core host, the main job's tables
timed while three trainings ran were up to 3x slower than idle, with 48 channels slower than 64 in one layer: that
run went to 1.11 bits per weight (budget 1.9) and 90.14%, against 1.54 and 90.56% with tables timed idle (2026-12-04).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

BUSY = 0.25  # other processes used more than this share of the machine's CPU time: a timing is not to be trusted
SHORTEST = 0.5  # seconds: /proc/stat counts in hundredths, so a shorter block's share is mostly rounding

__all__ = ["BUSY", "SHORTEST", "OtherLoad", "busy_share"]


def busy_share(share: float | None) -> bool:
    """Whether other processes used so much of the machine (`OtherLoad.share`) that a timing is not to be trusted."""
    return share is not None and share > BUSY


def _machine_busy() -> tuple[float, int] | None:
    """Seconds of CPU time the whole machine has spent busy since boot, and its CPU count (Linux's /proc/stat;
    None elsewhere)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        user, nice, system, _idle, _iowait, irq, softirq = map(int, lines[0].split()[1:8])
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), cpus
    except (OSError, ValueError, AttributeError):
        return None


def _own_busy() -> float:
    times = os.times()
    return times.user + times.system  # every thread of this process (ONNX Runtime's and PyTorch's pools included)


class OtherLoad:
    """`with OtherLoad() as load: ...` measures, over the block, the share of the machine's CPU time that other
    processes used: `load.share`, from 0 (idle but for us) to 1 (every core busy), or None where the platform does
    not say (only Linux does) or the block was too short to tell (`SHORTEST`)."""

    share: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = _machine_busy(), _own_busy(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        (before, own, start), after = self._start, _machine_busy()
        wall = time.perf_counter() - start
        if before is None or after is None or wall < SHORTEST:
            return
        others = (after[0] - before[0]) - (_own_busy() - own)
        self.share = min(max(others / (wall * after[1]), 0.0), 1.0)
