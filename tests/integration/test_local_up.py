"""`kubegfs local up` as a service manager, `timeout` or a closed terminal stops it: whatever
signal stops it stops everything it started, and a child that dies ends it with one line."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest


def start_local_up(tmp_path, *extra):
    """`kubegfs local up` with two chunkservers; returns it once it says it is up, and its children."""
    p = subprocess.Popen([sys.executable, "-m", "kubegfs", "local", "up", "--chunkservers", "2",
                          "--data", str(tmp_path / "data"), "--port", "0", "--chunk-size", "1Mi", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = p.lines = []
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


def test_tls_local_up_and_a_verifying_cli(tmp_path):
    p, children = start_local_up(tmp_path, "--tls")
    try:
        export = next(x for x in p.lines if x.startswith("export "))
        env = dict(os.environ, **dict(kv.split("=", 1) for kv in export.split()[1:]))
        assert env["KUBEGFS_MASTER"].startswith("https://") and Path(env["KUBEGFS_CACERT"]).exists()
        src = tmp_path / "in"
        src.write_bytes(b"over tls" * 1000)
        cli = [sys.executable, "-m", "kubegfs"]
        subprocess.run([*cli, "fs", "put", str(src), "/f"], env=env, check=True, timeout=60)
        out = subprocess.run([*cli, "fs", "cat", "/f"], env=env, capture_output=True, check=True, timeout=60)
        assert out.stdout == src.read_bytes()
        # without the CA the CLI refuses the server: one line, exit 1
        no_ca = {k: v for k, v in env.items() if k != "KUBEGFS_CACERT"}
        r = subprocess.run([*cli, "fs", "ls", "/"], env=no_ca, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.startswith("kubegfs: error: cannot reach") and "Cert" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        # --cacert does what the variable does
        r = subprocess.run([*cli, "fs", "ls", "/", "--cacert", env["KUBEGFS_CACERT"], "-o", "name"], env=no_ca,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == "/f\n", r.stderr
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
        assert gone(children) == []
    finally:
        kill_all(p, children)
