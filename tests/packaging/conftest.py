"""Fixtures for the Helm chart and monitoring tests: the helm binary, rendering, and Prometheus.

Missing tools FAIL the tests (never skip): helm comes from hack/controlplane/build.sh
(``$KUBEGFS_K8S_BIN``), prometheus/promtool from hack/prometheus/build.sh (into the same directory),
built here when missing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubegfs"
HERE = Path(__file__).resolve().parent
KUBE_VERSION = "1.36.3"  # the control plane hack/controlplane/build.sh builds


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
        if args and args[0] == "template":  # the chart's kubeVersion; a helm built without release
            args = (*args, "--kube-version", KUBE_VERSION)  # ldflags would assume Kubernetes 1.20
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
    """prometheus and promtool built from their Go module with Kubernetes service discovery
    (hack/prometheus/build.sh, into the same cache as the control plane; the Debian package has
    no Kubernetes SD). Built now if missing; a failed build fails the tests loudly."""
    bin_dir = Path(os.environ.get("KUBEGFS_K8S_BIN") or Path.home() / ".cache" / "kubegfs" / "k8s" / "bin")
    prom, tool = bin_dir / "prometheus", bin_dir / "promtool"
    if not (prom.exists() and tool.exists()):
        r = subprocess.run(["bash", str(REPO / "hack" / "prometheus" / "build.sh"), str(bin_dir.parent)],
                           capture_output=True, text=True, timeout=3600, check=False)
        if r.returncode != 0 or not (prom.exists() and tool.exists()):
            pytest.fail(f"could not build prometheus (hack/prometheus/build.sh):\n{r.stderr[-3000:]}", pytrace=False)
    return prom, tool


@pytest.fixture(scope="session")
def prometheus_bins() -> tuple[Path, Path]:
    """(prometheus, promtool); tests start their own Prometheus."""
    return _ensure_prometheus()
