"""`kubegfs local up` as a service manager, `timeout` or a closed terminal stops it: whatever
signal stops it stops everything it started, and a child that dies ends it with one line."""

import signal
import subprocess
import sys

import psutil
import pytest


def start_local_up(tmp_path):
    """`kubegfs local up` with two chunkservers; returns it once it says it is up, and its children."""
    p = subprocess.Popen([sys.executable, "-m", "kubegfs", "local", "up", "--chunkservers", "2",
                          "--data", str(tmp_path / "data"), "--port", "0", "--chunk-size", "1Mi"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "stops everything" in line:
            break
    else:
        pytest.fail(f"local up ended before it was up: {lines} {p.stderr.read()}")
    children = psutil.Process(p.pid).children(recursive=True)
    assert len(children) >= 3, children  # master + 2 chunkservers
    return p, children


def kill_all(p, children):
    for c in children:
        if c.is_running():
            c.kill()
    if p.poll() is None:
        p.kill()


def gone(procs, timeout=15.0):
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_everything_it_started(tmp_path, sig):
    p, children = start_local_up(tmp_path)
    try:
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "stopped." in out
        assert gone(children) == [], "orphans left running"
    finally:
        kill_all(p, children)


def test_dying_child_is_one_line_naming_it_and_its_log(tmp_path):
    p, children = start_local_up(tmp_path)
    try:
        master = next(c for c in children if "master" in c.cmdline())
        master.kill()
        out, err = p.communicate(timeout=30)
        assert p.returncode == 1
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        log = tmp_path / "data" / "master.log"
        assert lines[0].startswith("kubegfs: error: master was killed by SIGKILL") and str(log.resolve()) in lines[0]
        assert gone(children) == [], "chunkservers left running after the master died"
    finally:
        kill_all(p, children)
