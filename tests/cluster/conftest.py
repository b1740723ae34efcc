"""Fixtures for the real-node tests: one 3-node kubelet + containerd cluster per test session.

The cluster (:mod:`kubegfs_dev.cluster`) needs root; its binaries come from
hack/controlplane/build.sh, containerd/runc/CNI/buildah from Debian (installed by the harness when
missing) and the kubegfs images from hack/images/build.sh on the debootstrap base. Whatever is
missing or fails to start FAILS the tests with the reason; nothing is skipped. The cluster is torn
down (host changes undone) at the end of the session, also when a test failed.
``KUBEGFS_REAL_CLUSTER=<state dir of make cluster-up>`` runs the tests on that cluster instead.
"""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubegfs_dev.cluster import Cluster, ClusterError, running, wait_free
from kubegfs_dev.controlplane import ControlPlaneError
from kubegfs_dev.realchart import checkout_tag

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
TAG = checkout_tag(VERSION)  # not VERSION: another checkout may rebuild those tags meanwhile
IMAGES = tuple(f"localhost/kubegfs/{c}:{TAG}" for c in ("master", "chunkserver", "operator"))
STATE = REPO / ".run" / "cluster-test"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


def _sh(*argv: str, timeout: float = 1800, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}\n{r.stdout[-2000:]}",
                    pytrace=False)
    return r.stdout


def build_images() -> tuple[str, ...]:
    """The kubegfs images, built now (layer-cached, so a warm build takes seconds)."""
    base = _sh("bash", "hack/images/base.sh").strip().splitlines()[-1]
    _sh("bash", "hack/images/build.sh", "--tool", "buildah", "--base", base, env={"VERSION": TAG})
    return IMAGES


@pytest.fixture(scope="session")
def image_tag() -> str:
    """The tag of the images the cluster has: this checkout's, or a `make cluster-up` cluster's."""
    return VERSION if os.environ.get("KUBEGFS_REAL_CLUSTER") else TAG


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[Cluster]:
    reuse = os.environ.get("KUBEGFS_REAL_CLUSTER")
    if reuse:  # a developer's `make cluster-up` cluster (state dir): used as is, left running
        if not running(Path(reuse)):
            pytest.fail(f"KUBEGFS_REAL_CLUSTER={reuse}: no cluster running there", pytrace=False)
        yield Cluster(Path(reuse))
        return
    if os.geteuid() != 0:
        pytest.fail("the real-node cluster tests need root (kubelet, containerd, bridges, iptables)",
                    pytrace=False)
    images = build_images()
    # guard: if this session dies without its teardown, the next `up` anywhere removes the cluster
    c = Cluster(STATE, guard_pid=os.getpid())
    t0 = time.monotonic()
    try:
        wait_free(timeout=1800)
        c.up()
        c.load_images(images)
    except (ClusterError, ControlPlaneError, OSError, subprocess.SubprocessError) as e:
        c.down()
        pytest.fail(f"the real-node cluster did not come up: {e}", pytrace=False)
    print(f"\n# real-node cluster up with images in {time.monotonic() - t0:.1f}s")
    try:
        yield c
    finally:
        c.down()
