"""`make down` stops exactly the processes a harness recorded, and nothing else."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubegfs_dev import pids
from kubegfs_dev.util import wait_for

SLEEPER = [sys.executable, "-c", "import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        pids.stop_group(p.pid, 5, p)


def start(sleepers: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(SLEEPER, start_new_session=True)
    sleepers.append(p)
    return p


def group(pgid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def test_stop_recorded_stops_the_recorded_groups_only(tmp_path: Path,
                                                      sleepers: list[subprocess.Popen[bytes]]) -> None:
    a, b, other = start(sleepers), start(sleepers), start(sleepers)
    f = tmp_path / "pids.json"
    pids.write(f, [pids.entry("a", a.pid), pids.entry("b", b.pid)], url="x")
    data = pids.read(f)
    assert data is not None and data["url"] == "x"
    assert pids.ours(pids.entry("a", a.pid))
    assert pids.stop_recorded(f, timeout=5) == 2
    assert a.wait(5) is not None and b.wait(5) is not None
    # the children went with their leaders (a killed orphan is listed until init reaps it)
    wait_for(lambda: not group(a.pid) and not group(b.pid), timeout=30, what="the groups to go")
    assert other.poll() is None and pids.alive(other.pid)
    assert not f.exists()
    assert pids.stop_recorded(f) == 0  # nothing recorded any more


def test_a_reused_pid_is_never_signalled(tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]) -> None:
    p = start(sleepers)
    rec = pids.entry("p", p.pid)
    assert rec["start"] is not None
    rec["start"] -= 1  # as if the recorded process had died and its pid had been given to p
    f = tmp_path / "pids.json"
    pids.write(f, [rec])
    assert not pids.ours(rec)
    assert pids.stop_recorded(f, timeout=1) == 0
    assert p.poll() is None
