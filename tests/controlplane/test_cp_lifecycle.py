"""Start/stop behaviour: missing binaries fail loudly; the CLI starts and stops detached processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubegfs_dev import controlplane as cpmod
from kubegfs_dev import pids
from kubegfs_dev.controlplane import BinaryNotFound, ControlPlane, run_kubectl


def test_missing_binary_names_the_build_script(tmp_path: Path) -> None:
    cp = ControlPlane(bin_dir=tmp_path / "empty", state_dir=tmp_path / "state")
    with pytest.raises(BinaryNotFound) as exc:
        cp.start()
    msg = str(exc.value)
    assert "etcd" in msg and "hack/controlplane/build.sh" in msg


def test_env_var_selects_bin_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBEGFS_K8S_BIN", str(tmp_path))
    assert cpmod.bin_dir() == tmp_path
    with pytest.raises(BinaryNotFound, match=str(tmp_path)):
        cpmod.find_binary("kube-apiserver")


def _alive(pid: int) -> bool:
    return pids.alive(pid)


def test_cli_up_and_down(tmp_path: Path) -> None:
    """The `make controlplane-up/-down` path: detached processes, kubeconfig, clean stop."""
    state = tmp_path / "cp"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "kubegfs_dev.controlplane"]
    up = subprocess.run([*cmd, "up", "--state", str(state)], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == f"export KUBECONFIG={state.resolve() / 'kubeconfig'}"
        data = json.loads((state / "pids.json").read_text())
        pids = [p["pid"] for p in data["processes"]]
        assert {p["name"] for p in data["processes"]} == {"etcd", "kube-apiserver",
                                                          "kube-controller-manager"}
        # The processes outlived the `up` command.
        assert all(_alive(p) for p in pids)
        out = run_kubectl(state / "kubeconfig", "get", "namespace", "default", "-o", "name").stdout
        assert out.strip() == "namespace/default"
        # A second `up` reuses the running one.
        again = subprocess.run([*cmd, "up", "--state", str(state)], env=env, capture_output=True,
                               text=True, timeout=300, check=False)
        assert again.returncode == 0 and "already running" in again.stderr
        assert json.loads((state / "pids.json").read_text())["processes"] == data["processes"]
        status = subprocess.run([*cmd, "status", "--state", str(state)], capture_output=True,
                                text=True, check=False)
        assert status.returncode == 0
    finally:
        down = subprocess.run([*cmd, "down", "--state", str(state)], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids)
    assert not (state / "pids.json").exists()
    status = subprocess.run([*cmd, "status", "--state", str(state)], capture_output=True,
                            text=True, check=False)
    assert status.returncode == 1
