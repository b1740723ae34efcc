"""The kubegfs CLI as a user runs it."""

import json
import os
import subprocess
import sys

import yaml


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
    assert run(cl, "snapshot", "diff", "cli-snap").stdout.decode().splitlines()[1:] == [
        "M\t.", "-\t./dir", "0 created, 1 deleted, 1 modified, 0 renamed"]
    d = json.loads(run(cl, "snapshot", "diff", "cli-snap", "--json").stdout)
    assert d["changes"] == [{"kind": "M", "path": ".", "type": "dir"}, {"kind": "-", "path": "./dir", "type": "dir"}]
    r = json.loads(run(cl, "snapshot", "restore", "cli-snap", "--json").stdout)
    assert r["mode"] == "inplace"
    run(cl, "snapshot", "restore", "cli-snap", "--to", "/cli-copy")
    run(cl, "fs", "mv", "/cli-copy", "/cli-moved")
    run(cl, "fs", "get", "/cli-moved/dir/file", str(out))
    assert out.read_bytes() == src.read_bytes() + b"tail"
    assert json.loads(run(cl, "snapshot", "show", "cli-snap", "-o", "json").stdout)["name"] == "cli-snap"
    run(cl, "snapshot", "delete", "cli-snap")


def test_cli_errors_are_one_line_and_non_zero(shared_cluster, tmp_path):
    cl = shared_cluster
    for args in (["fs", "stat", "/does/not/exist"], ["fs", "mkdir", "relative"],
                 ["snapshot", "show", "nope"], ["snapshot", "diff", "nope"], ["fs", "get", "/nope", str(tmp_path / "x")],
                 ["fs", "put", str(tmp_path / "missing"), "/x"]):
        p = run(cl, *args, ok=False)
        assert p.returncode != 0
        err = p.stderr.decode().strip()
        assert err.startswith("kubegfs: error:") and len(err.splitlines()) == 1, err
    p = subprocess.run([sys.executable, "-m", "kubegfs", "fs", "ls", "/", "--master", cl.master_url],
                       env={k: v for k, v in os.environ.items() if k != "KUBEGFS_TOKEN"},
                       capture_output=True, timeout=30)
    assert p.returncode != 0 and b"token" in p.stderr
    # an API error exits 1 (as kubectl and velero); 2 is for usage errors only
    p = run(cl, "fs", "ls", "/", "--token", "wrong", ok=False)
    assert p.returncode == 1 and b"wrong token" in p.stderr
    p = run(cl, "fs", "stat", "/does/not/exist", ok=False)
    assert p.returncode == 1
    for usage in (["fs", "ls", "-o", "table"], ["status", "-o", "name"], ["fs", "nope"],
                  ["local", "up", "--chunk-size", "64MiB"], ["fs", "ls", "/", "--bogus"]):
        p = run(cl, *usage, ok=False)
        assert p.returncode == 2, (usage, p.stderr)
    p = run(cl, "fs", "ls", "/", "--master", "http://127.0.0.1:1", ok=False)
    assert p.returncode == 1 and b"cannot reach" in p.stderr


BOX = set("─│┃━┏┓┗┛┡┩╇╭╮╰╯┌┐└┘├┤┬┴┼═║")


def test_cli_output_formats(shared_cluster):
    cl = shared_cluster
    deep = "/out/" + "a-long-directory-name-" * 8  # wider than any terminal: must never be cut
    run(cl, "fs", "mkdir", "-p", deep)
    run(cl, "fs", "put", "-", deep + "/f", input=b"x" * 10)
    run(cl, "snapshot", "create", "/out", "--name", "out-snap")

    # json: the API objects; --json is the same
    as_json = json.loads(run(cl, "fs", "ls", deep, "-o", "json").stdout)
    assert as_json == json.loads(run(cl, "fs", "ls", deep, "--json").stdout)
    assert as_json[0]["path"] == deep + "/f" and as_json[0]["size"] == 10
    # yaml: the same objects
    assert yaml.safe_load(run(cl, "snapshot", "show", "out-snap", "-o", "yaml").stdout)["name"] == "out-snap"
    # name: one per line, to feed back to the CLI
    assert run(cl, "fs", "ls", deep, "-o", "name").stdout.decode() == deep + "/f\n"
    names = run(cl, "snapshot", "list", "-o", "name").stdout.decode().split()
    assert "out-snap" in names
    assert run(cl, "snapshot", "show", names[names.index("out-snap")], "-o", "name").stdout == b"out-snap\n"

    # tables through a pipe: plain text, never cut, columns split by whitespace
    for args in (["fs", "ls", "/out"], ["snapshot", "list"], ["status"], ["fs", "ls", deep, "-o", "wide"]):
        text = run(cl, *args).stdout.decode()
        assert not BOX & set(text) and "…" not in text, text
    lines = run(cl, "fs", "ls", "/out").stdout.decode().splitlines()
    assert lines[0].split() == ["MODE", "SIZE", "PATH"] and lines[1].split()[-1] == deep.rstrip("/")
    snaps = run(cl, "snapshot", "list").stdout.decode().splitlines()
    assert snaps[0].split() == ["NAME", "PATH", "STATE", "FILES", "BYTES", "CREATED", "OWNER"]
    row = next(r.split() for r in snaps if r.startswith("out-snap "))
    assert row[:4] == ["out-snap", "/out", "ready", "1"]
    wide = run(cl, "snapshot", "list", "-o", "wide").stdout.decode().splitlines()
    assert wide[0].split()[-3:] == ["ID", "RECORD", "HOLDERS"]
    status = run(cl, "status").stdout.decode().splitlines()
    assert status[0].split()[:2] == ["FILES", "DIRECTORIES"] and status[1].split()[5] == "3/3"
    run(cl, "snapshot", "delete", "out-snap")


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
    assert p.returncode == 1 and b"holds the namespace" in p.stderr, p.stderr  # an API error: exit 1, as kubectl
