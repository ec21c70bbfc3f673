"""Latency tables and the rest of the machine: timed beside other work they are said to be provisional and timed
again once the machine is idle; runs started together time them one at a time. Real processes, real timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout

from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.machine_load import BUSY, OtherLoad
from lightning_selfcompress.core.widths import latency_tables
from lightning_selfcompress.models import BaselineCNN

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the load is read from Linux's /proc/stat")


@contextmanager
def other_work():
    """Every core kept busy by other processes."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def tiny() -> tuple[ChannelGraph, torch.Tensor]:
    x = torch.randn(2, 1, 28, 28)
    return ChannelGraph(BaselineCNN(1, 10, width=4), x[:1]), x


def test_the_share_of_the_machine_other_processes_use_is_measured():
    with OtherLoad() as idle:
        time.sleep(0.5)
    with other_work(), OtherLoad() as busy:
        time.sleep(0.5)
    assert idle.share is not None and idle.share < BUSY, f"nothing else runs here: {idle.share}"
    assert busy.share is not None and busy.share > 0.8, f"every core spun by others: {busy.share}"


def test_a_block_too_short_to_tell_has_no_share():
    with OtherLoad() as load:
        time.sleep(0.05)
    assert load.share is None, "/proc/stat counts in hundredths of a second: 5 of them tell nothing"


def test_tables_timed_beside_other_work_are_said_and_timed_again_once_the_machine_is_idle(tmp_path):
    graph, x = tiny()
    timing = {"batch": 64, "runs": 800, "rounds": 1, "cache_dir": tmp_path}  # each table long enough to tell (SHORTEST)
    with other_work(), pytest.warns(UserWarning, match=r"timed while other processes used up to \d+% of this machine"):
        busy = latency_tables(graph, x, **timing)
    stored = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("*.json"))]
    assert len(stored) == 4 and all(s["others_load"] > BUSY for s in stored), "cached as provisional"

    with other_work(), pytest.warns(UserWarning, match="timed while other processes used"):
        again = latency_tables(graph, x, **timing)
    assert again == busy, "the machine still busy: the provisional tables are used as they are, not timed again"

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*timed while other processes")
        idle = latency_tables(graph, x, **timing)
    stored = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("*.json"))]
    assert all(s["others_load"] is not None and s["others_load"] < BUSY for s in stored), "timed again, idle"
    assert {name: t.ms for name, t in idle.items()} == {s["layer"]: s["ms"] for s in stored}


CHILD = """
import json, sys, torch
from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.widths import latency_tables
from lightning_selfcompress.models import BaselineCNN
x = torch.randn(2, 1, 28, 28)
tables = latency_tables(ChannelGraph(BaselineCNN(1, 10, width=4), x[:1]), x, batch=64, runs=400, rounds=2,
                        cache_dir=sys.argv[1])
print(json.dumps({name: t.ms for name, t in tables.items()}))
"""


def test_runs_started_together_time_their_tables_one_at_a_time(tmp_path):
    """A run that finds another timing waits, says so, and then reads the other's tables from the cache."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    lock, deadline = FileLock(tmp_path / ".timing.lock"), time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:  # until the other run holds the lock
        try:
            lock.acquire(timeout=0)
            lock.release()
            time.sleep(0.02)
        except Timeout:
            break
    assert child.poll() is None, "the other run finished before it was seen timing: time it longer"
    graph, x = tiny()
    with pytest.warns(UserWarning, match="Waiting for another process to finish timing latency tables"):
        tables = latency_tables(graph, x, batch=64, runs=2, rounds=1, cache_dir=tmp_path)
    theirs = json.loads(child.communicate(timeout=120)[0])
    assert {name: t.ms for name, t in tables.items()} == theirs, "read from the other run's cache, not timed again"
