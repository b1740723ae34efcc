"""pytest plugin: a real local Kubernetes control plane for tests (loaded by tests/conftest.py).

Fixtures:

* ``controlplane`` (session): a started :class:`kubegfs_dev.controlplane.ControlPlane`
  (etcd + kube-apiserver + kube-controller-manager). If the binaries are missing or the control
  plane does not come up, every test that uses it FAILS with the reason. It never skips.
* ``k8s_api`` (session): an admin ``kubernetes.client.ApiClient``.
* ``k8s_namespace``: a fresh namespace per test, deleted afterwards.
* ``kubectl``: ``kubectl(*args, input=None, check=True, kubeconfig=None)`` → CompletedProcess.

Tests under ``tests/controlplane/`` and tests that use one of these fixtures get the
``controlplane`` marker automatically, so ``-m 'not controlplane'`` deselects them.

Only the standard library, pytest and the harness (:mod:`kubegfs_dev.controlplane`) are imported
at module level: importing this plugin must never fail, whether or not the control plane or the
``kubernetes`` package is available. Polling helpers are in :mod:`kubegfs_dev.util`.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from kubegfs_dev.controlplane import ControlPlane, ControlPlaneError, run_kubectl

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

_FIXTURES = {"controlplane", "k8s_api", "k8s_namespace", "kubectl"}


class Kubectl(Protocol):
    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]: ...


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(getattr(item, "path", "")))
        in_dir = "controlplane" in path.parts and "tests" in path.parts
        uses = _FIXTURES & set(getattr(item, "fixturenames", ()))
        if (in_dir or uses) and item.get_closest_marker("controlplane") is None:
            item.add_marker(pytest.mark.controlplane)


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane. Fails (never skips) when it cannot be started."""
    state = tmp_path_factory.mktemp("controlplane")
    cp = ControlPlane(state_dir=state)
    t0 = time.monotonic()
    try:
        cp.start()
    except ControlPlaneError as e:
        pytest.fail(f"the local Kubernetes control plane could not be started: {e}", pytrace=False)
    except Exception as e:  # noqa: BLE001 - anything else is just as fatal, and must say why
        cp.stop()
        pytest.fail(f"the local Kubernetes control plane could not be started: "
                    f"{type(e).__name__}: {e}", pytrace=False)
    print(f"\n[controlplane] up at {cp.url} in {time.monotonic() - t0:.1f}s, state {state}")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def k8s_api(controlplane: ControlPlane) -> Iterator[ApiClient]:
    api = controlplane.api_client()
    try:
        yield api
    finally:
        api.close()


def _ns_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", nodeid.rsplit("::", 1)[-1].lower()).strip("-")
    return f"t-{base[:40].strip('-')}-{secrets.token_hex(3)}"


@pytest.fixture
def k8s_namespace(request: pytest.FixtureRequest, k8s_api: ApiClient) -> Iterator[str]:
    """A fresh namespace for one test; deleted (in the background) afterwards."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(k8s_api)
    name = _ns_name(request.node.nodeid)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"kubegfs.io/test": "true"})))
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def kubectl(controlplane: ControlPlane) -> Kubectl:
    """Run kubectl against the control plane (admin kubeconfig unless one is given)."""

    def run(*args: str, input: str | None = None, check: bool = True,
            kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_kubectl(kubeconfig or controlplane.kubeconfig, *args, input=input, check=check)

    return run


def kubeconfig_env(cp: ControlPlane) -> dict[str, str]:
    """An environment for subprocesses (kopf, kubectl, helm) pointed at ``cp``."""
    env = dict(os.environ)
    env["KUBECONFIG"] = str(cp.kubeconfig)
    return env
