"""The CLI explains itself: help on every command, shell completion that really completes."""

import os
import subprocess
import sys

import click

from kubegfs.cli import main


def walk(cmd, path=("kubegfs",)):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from walk(sub, (*path, name))


def test_every_command_and_option_has_help():
    seen = 0
    for path, cmd in walk(main):
        seen += 1
        assert cmd.help and cmd.get_short_help_str(), f"{' '.join(path)} has no help text"
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in ("log_level", "log_format"):
                assert p.help, f"{' '.join(path)} {p.opts[0]} has no help text"
    assert seen > 20


def test_list_and_show_commands_take_output():
    for path in (["fs", "ls"], ["fs", "stat"], ["snapshot", "list"], ["snapshot", "show"], ["status"],
                 ["master", "recover"]):
        cmd = main
        for name in path:
            cmd = cmd.commands[name]
        out = next(p for p in cmd.params if "--output" in p.opts)
        assert "-o" in out.opts and set(out.type.choices) == {"json", "yaml", "wide", "name"}


def test_bash_completion_completes_commands():
    script = subprocess.run([sys.executable, "-m", "kubegfs", "completion", "bash"], capture_output=True,
                            text=True, check=True).stdout
    assert "_KUBEGFS_COMPLETE" in script and "complete " in script
    env = dict(os.environ, _KUBEGFS_COMPLETE="bash_complete", COMP_WORDS="kubegfs snapshot l", COMP_CWORD="2")
    # the script calls the `kubegfs` entry point with these variables; do the same
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubegfs")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert "plain,list" in p.stdout.splitlines(), p.stdout + p.stderr


def test_master_without_data_is_a_usage_error():
    p = subprocess.run([sys.executable, "-m", "kubegfs", "master", "--token", "t"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "--data is required" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_bad_data_listen_is_one_error_line():
    p = subprocess.run([sys.executable, "-m", "kubegfs", "chunkserver", "--token", "t", "--master", "http://127.0.0.1:1",
                        "--data", "/nonexistent-kubegfs-test", "--data-listen", "nonsense"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--data-listen must be HOST:PORT or off" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_short_circuit_reads_are_switched_off_by_flag_or_environment(monkeypatch):
    """``--no-short-circuit`` or ``KUBEGFS_SHORT_CIRCUIT=off`` reach the Client; the default
    leaves it to the Client (on unless the environment says off)."""
    from click.testing import CliRunner

    import kubegfs.client as client_mod

    seen = []

    class Stub:
        def __init__(self, master, token, tls=None, short_circuit=None):
            seen.append(short_circuit)

        def stat(self, path):
            return {"path": path, "type": "file", "size": 0, "mode": 0o644, "mtime": 0, "chunks": 0}

    monkeypatch.setattr(client_mod, "Client", Stub)
    monkeypatch.delenv("KUBEGFS_SHORT_CIRCUIT", raising=False)
    r = CliRunner()
    base = ["fs", "stat", "--token", "t", "/x", "-o", "json"]
    for extra, env, want in (([], {}, None), (["--no-short-circuit"], {}, False),
                             ([], {"KUBEGFS_SHORT_CIRCUIT": "off"}, False), (["--short-circuit"], {}, True)):
        res = r.invoke(main, [*base[:2], *extra, *base[2:]], env=env)
        assert seen[-1] is want, (extra, env, res.output)
