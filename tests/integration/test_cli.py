"""The kubegfs CLI as a user runs it."""

import json
import os
import subprocess
import sys


def run(cluster, *args, input=None, ok=True):
    env = dict(os.environ, KUBEGFS_MASTER=cluster.master_url, KUBEGFS_TOKEN=cluster.token)
    p = subprocess.run([sys.executable, "-m", "kubegfs", *args], env=env, capture_output=True,
                       input=input, timeout=60)
    if ok:
        assert p.returncode == 0, p.stderr.decode()
    return p


def test_cli_files_and_snapshots(shared_cluster, tmp_path):
    cl = shared_cluster
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    run(cl, "fs", "mkdir", "-p", "/cli/dir")
    run(cl, "fs", "put", str(src), "/cli/dir/file")
    run(cl, "fs", "put", "-", "/cli/dir/file", "--append", input=b"tail")
    out = tmp_path / "out.bin"
    run(cl, "fs", "get", "/cli/dir/file", str(out))
    assert out.read_bytes() == src.read_bytes() + b"tail"
    assert run(cl, "fs", "cat", "/cli/dir/file").stdout == src.read_bytes() + b"tail"
    ls = json.loads(run(cl, "fs", "ls", "/cli/dir", "--json").stdout)
    assert [e["path"] for e in ls] == ["/cli/dir/file"] and ls[0]["size"] == 300_004
    st = json.loads(run(cl, "fs", "stat", "/cli/dir/file", "--json").stdout)
    assert st["type"] == "file"
    s = json.loads(run(cl, "snapshot", "create", "/cli", "--name", "cli-snap", "--json").stdout)
    assert s["state"] == "ready" and s["files"] == 1
    assert "cli-snap" in run(cl, "snapshot", "list").stdout.decode()
    run(cl, "fs", "rm", "-r", "/cli/dir")
    r = json.loads(run(cl, "snapshot", "restore", "cli-snap", "--json").stdout)
    assert r["mode"] == "inplace"
    run(cl, "snapshot", "restore", "cli-snap", "--to", "/cli-copy")
    run(cl, "fs", "mv", "/cli-copy", "/cli-moved")
    run(cl, "fs", "get", "/cli-moved/dir/file", str(out))
    assert out.read_bytes() == src.read_bytes() + b"tail"
    assert json.loads(run(cl, "snapshot", "show", "cli-snap").stdout)["name"] == "cli-snap"
    run(cl, "snapshot", "delete", "cli-snap")


def test_cli_errors_are_one_line_and_non_zero(shared_cluster, tmp_path):
    cl = shared_cluster
    for args in (["fs", "stat", "/does/not/exist"], ["fs", "mkdir", "relative"],
                 ["snapshot", "show", "nope"], ["fs", "get", "/nope", str(tmp_path / "x")],
                 ["fs", "put", str(tmp_path / "missing"), "/x"]):
        p = run(cl, *args, ok=False)
        assert p.returncode != 0
        err = p.stderr.decode().strip()
        assert err.startswith("kubegfs: error:") and len(err.splitlines()) == 1, err
    p = subprocess.run([sys.executable, "-m", "kubegfs", "fs", "ls", "/", "--master", cl.master_url],
                       env={k: v for k, v in os.environ.items() if k != "KUBEGFS_TOKEN"},
                       capture_output=True, timeout=30)
    assert p.returncode != 0 and b"token" in p.stderr
    p = run(cl, "fs", "ls", "/", "--token", "wrong", ok=False)
    assert p.returncode == 2 and b"wrong token" in p.stderr
    p = run(cl, "fs", "ls", "/", "--master", "http://127.0.0.1:1", ok=False)
    assert p.returncode == 1 and b"cannot reach" in p.stderr


def test_get_into_a_missing_local_directory_is_one_error_line(shared_cluster, tmp_path):
    run(shared_cluster, "fs", "put", "-", "/cli-get-err", input=b"x")
    p = run(shared_cluster, "fs", "get", "/cli-get-err", str(tmp_path / "no-such-dir" / "out"), ok=False)
    err = p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("kubegfs: error: ") and "No such file or directory" in err


def test_token_file_as_in_the_pods(shared_cluster, tmp_path):
    """`--token-file /etc/kubegfs/token` (docs/recovery.md runs `master recover` that way)."""
    cl = shared_cluster
    (tmp_path / "token").write_text(cl.token + "\n")
    p = run(cl, "fs", "ls", "/", "--json", "--token", "wrong", "--token-file", str(tmp_path / "token"))
    assert isinstance(json.loads(p.stdout), list | dict)
    p = run(cl, "fs", "ls", "/", "--token-file", str(tmp_path / "nope"), ok=False)
    assert p.returncode == 1 and p.stderr.decode().strip().startswith("kubegfs: error: cannot read token file")
    p = run(cl, "master", "recover", "--token-file", str(tmp_path / "token"), ok=False)
    # the token was read: the master answers (a master with a namespace refuses to be recovered)
    assert p.returncode == 2 and b"holds the namespace" in p.stderr, p.stderr
