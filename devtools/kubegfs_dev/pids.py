"""Processes a harness started, recorded so that another process (``make down``) can stop them.

A record file (``pids.json`` in the harness's state dir) lists ``{"name", "pid", "start"}`` per
process, ``start`` being the process's start time in clock ticks since boot (``/proc/PID/stat``
field 22). A recorded process is only signalled while ``/proc`` still shows that same start
time, so a pid the kernel has since given to someone else's process is never touched. Every
harness process leads its own session (``start_new_session=True``), so stopping signals its
process group: SIGTERM, then SIGKILL after a timeout.

``python -m kubegfs_dev.pids stop FILE...`` stops what the files record (``make down``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (index 0 is the state)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when there is no such process."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None  # field 22 of stat = index 19 after the name
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Does ``pid`` run (a zombie counts as dead)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] != "Z"


def entry(name: str, pid: int) -> dict[str, Any]:
    """The record of a process this harness just started."""
    return {"name": name, "pid": pid, "start": start_time(pid)}


def ours(rec: dict[str, Any]) -> bool:
    """Is the recorded process still running, and still the one that was recorded?"""
    pid = int(rec.get("pid", 0))
    return pid > 0 and rec.get("start") is not None and start_time(pid) == rec["start"] and alive(pid)


def write(path: Path, processes: Iterable[dict[str, Any]], **extra: Any) -> None:
    """Atomically (re)write the record file ``path``."""
    data = {**extra, "processes": list(processes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def stop_group(pid: int, timeout: float, popen: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL it after ``timeout`` seconds."""
    if pid <= 0:
        return

    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not alive(pid)

    if gone():
        signal_group(signal.SIGKILL)  # stray children of a dead leader
        return
    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            break
        time.sleep(0.05)
    else:
        signal_group(signal.SIGKILL)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)
    signal_group(signal.SIGKILL)  # anything left in the group


def stop_recorded(path: Path, timeout: float = 15.0) -> int:
    """Stop the processes ``path`` records (last started first), delete it; return how many."""
    data = read(path)
    if not data:
        return 0
    n = 0
    for rec in reversed(data.get("processes", [])):
        if ours(rec):
            stop_group(int(rec["pid"]), timeout)
            n += 1
    with contextlib.suppress(OSError):
        path.unlink()
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "stop":
        print("usage: python -m kubegfs_dev.pids stop FILE...", file=sys.stderr)
        return 2
    for f in args[1:]:
        n = stop_recorded(Path(f))
        if n:
            print(f"# stopped {n} process(es) recorded in {f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
