"""Fixtures for the Helm chart and monitoring tests: the helm binary, rendering, and Prometheus.

Missing tools FAIL the tests (never skip): helm comes from hack/controlplane/build.sh
(``$KUBEGFS_K8S_BIN``), prometheus/promtool from the Debian package ``prometheus``, installed here
with apt-get when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubegfs"
HERE = Path(__file__).resolve().parent


def helm_binary() -> Path:
    from kubegfs_dev.controlplane import BinaryNotFound, find_binary

    try:
        return find_binary("helm")
    except BinaryNotFound as e:
        pytest.fail(f"helm is missing: {e}", pytrace=False)


@pytest.fixture(scope="session")
def helm_cmd(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    """helm without a cluster (lint, template, show): ``helm_cmd(*args, check=True)``."""
    binary = helm_binary()
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.split("_")[1].lower())
    env["KUBECONFIG"] = str(home / "no-kubeconfig")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env,
                           timeout=120, check=False)
        if check and r.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}\n{r.stdout}",
                        pytrace=False)
        return r

    return run


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def render(helm_cmd: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., list[dict[str, Any]]]:
    """``render(*extra_args, namespace="kubegfs", release="kubegfs")`` → rendered documents."""

    def run(*extra: str, namespace: str = "kubegfs", release: str = "kubegfs") -> list[dict[str, Any]]:
        return docs(helm_cmd("template", release, str(CHART), "--namespace", namespace, *extra).stdout)

    return run


def _ensure_prometheus() -> tuple[Path, Path]:
    """prometheus and promtool from the Debian package, installed now if missing (fails loudly)."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and tool:
        return Path(prom), Path(tool)
    if not shutil.which("apt-get"):
        pytest.fail("prometheus/promtool are missing and there is no apt-get to install the "
                    "Debian package 'prometheus'", pytrace=False)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for cmd in (["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
        log.append(f"$ {' '.join(cmd)} -> {r.returncode}\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
        prom, tool = shutil.which("prometheus"), shutil.which("promtool")
        if r.returncode == 0 and prom and tool:
            return Path(prom), Path(tool)
    pytest.fail("could not install the Debian package 'prometheus' (prometheus + promtool):\n"
                + "\n".join(log), pytrace=False)


@pytest.fixture(scope="session")
def prometheus_bins() -> tuple[Path, Path]:
    """(prometheus, promtool). The package's own service is never used: tests start their own."""
    return _ensure_prometheus()
