"""The Helm chart on real pods (``pods``, only when asked: ``--only pods``; needs root): the
3-node kubelet + containerd cluster of :mod:`kubegfs_dev.cluster` with the images of this
checkout, the release of :mod:`kubegfs_dev.realchart`, and three timings:

* ``helm install`` -> every pod (master, chunkservers, operator) Running and Ready;
* a burst of Snapshot CRs applied in one ``kubectl apply`` right after install, then ten created
  one at a time, then the burst again (the target's case: an installation that has served
  Snapshots before) -> each one Ready, counted from its
  creation (p50, p95: what the operator and the master take) and from before the apply (what the
  user waits for, the ``kubectl`` process included);
* the master pod deleted -> a new master pod answering the client's ``status``.

The cluster is torn down (host changes undone) before this returns, also when a step fails.
"""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .operator_e2e import Burst, watch_burst
from .report import Row, at_most, pct

NS = "kgfs-bench"
BURST = 50
SEQ = 10  # Snapshot CRs created one at a time, between the two bursts
POLL = 0.05  # seconds between looks at the new master


def _sh(*argv: str, env: dict[str, str] | None = None, timeout: float = 1800) -> str:
    from kubegfs_dev.realchart import REPO

    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}\n{r.stdout[-2000:]}")
    return r.stdout


def _images(tag: str) -> tuple[str, ...]:
    """This checkout's images, built now (layer-cached: a warm build takes seconds), as the
    real-node tests build them (tests/cluster/conftest.py)."""
    from kubegfs_dev.realchart import COMPONENTS

    base = _sh("bash", "hack/images/base.sh").strip().splitlines()[-1]
    _sh("bash", "hack/images/build.sh", "--tool", "buildah", "--base", base, env={"VERSION": tag})
    return tuple(f"localhost/kubegfs/{c}:{tag}" for c in COMPONENTS)


def _snapshot(ns: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "kubegfs.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": name, "namespace": ns},
            "spec": {"path": "/data", "copies": 2, "cluster": {"name": "kubegfs"}}}


def _burst(rel: Any, api: Any, n: int, prefix: str = "burst", timeout: float = 300) -> Burst:
    """Apply ``n`` Snapshot CRs in one ``kubectl apply`` (see :func:`watch_burst`; ``api``: a
    CustomObjectsApi of the cluster)."""
    names = [f"{prefix}-{i}" for i in range(n)]
    return watch_burst(api, rel.ns, names, lambda: rel.c.apply([_snapshot(rel.ns, nm) for nm in names]), timeout)


def _master_back(rel: Any, timeout: float = 300) -> float:
    """Delete the master pod; seconds until a new master pod (another UID) answers ``status``."""
    from kubegfs.client import Client
    from kubegfs.tls import ClientTLS

    old = rel.pods("master")[0]
    tls = ClientTLS(str(rel.cacert()), rel.tls_server_name())
    token = rel.token()
    t0 = time.perf_counter()
    rel.kubectl("delete", "pod", "-n", rel.ns, old["metadata"]["name"], "--wait=false")
    while time.perf_counter() - t0 < timeout:
        for p in rel.pods("master"):
            ip = p.get("status", {}).get("podIP")
            if p["metadata"]["uid"] != old["metadata"]["uid"] and ip:
                try:
                    Client(f"https://{ip}:9400", token=token, timeout=2, tls=tls).status()
                    return time.perf_counter() - t0
                except Exception:  # noqa: BLE001 - not serving yet
                    pass
        time.sleep(POLL)
    raise RuntimeError(f"no new master pod answered status within {timeout:.0f}s")


def _save_logs(rel: Any, to: Path) -> None:
    """The master's and the operator's logs of the burst, next to the results (``pods-logs/``):
    the operator's handler lines and the master's per-snapshot build/ship/commit times."""
    to.mkdir(parents=True, exist_ok=True)
    for component in ("master", "operator"):
        for pod in rel.pods(component):
            name = pod["metadata"]["name"]
            (to / f"{name}.log").write_text(rel.kubectl("logs", "-n", rel.ns, name, check=False))


def bench_pods(tmp: Path, say: Callable[[str], None]) -> list[Row]:
    """Build the images, bring the real-node cluster up, time install / Snapshot burst / master
    restart, and tear the cluster down. The pods' logs of the burst are kept in ``pods-logs/``
    beside ``tmp``."""
    from kubernetes import client

    from kubegfs_dev.cluster import Cluster, wait_free
    from kubegfs_dev.realchart import REPO, Release, checkout_tag, wait_for

    if os.geteuid() != 0:
        raise RuntimeError("the pods benchmark needs root (kubelet, containerd, bridges, iptables)")
    tag = checkout_tag(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])
    say("pods: building this checkout's images")
    t0 = time.perf_counter()
    images = _images(tag)
    build = time.perf_counter() - t0
    say("pods: waiting for the machine's real-node cluster slot")
    wait_free(timeout=1800)
    # guard: if this process dies without its finally, the next `up` anywhere removes the cluster
    c = Cluster(REPO / ".run" / "cluster-bench", guard_pid=os.getpid(), log=lambda _m: None)
    try:
        say("pods: 3-node cluster up, images imported into every node")
        t0 = time.perf_counter()
        c.up()
        c.load_images(images)
        up = time.perf_counter() - t0
        rel = Release(c, NS, tmp, tag)
        rel.create_namespace()
        say("pods: helm install -> every pod Ready")
        t0 = time.perf_counter()
        rel.install()
        wait_for("every kubegfs pod Running and Ready", rel.all_ready, timeout=300, interval=POLL)
        install = time.perf_counter() - t0
        cl = rel.client()
        wait_for("3 live chunkservers",
                 lambda: sum(1 for s in cl.chunkservers() if s.get("alive")) == 3, timeout=180)
        cl.mkdir("/data")
        cl.put("/data/f", b"x" * 10_000)
        say(f"pods: {BURST} Snapshot CRs at once, the first after install -> each Ready")
        api = client.CustomObjectsApi(rel.cp.api_client(rel.c.kubeconfig))
        first = _burst(rel, api, BURST, "first")
        say(f"pods: {SEQ} Snapshot CRs one at a time -> each Ready")
        seq = [_burst(rel, api, 1, f"seq-{i}").own[0] for i in range(SEQ)]
        say(f"pods: {BURST} Snapshot CRs at once -> each Ready")
        b = _burst(rel, api, BURST)
        applied, lat, own = b.applied, b.from_apply, b.own
        _save_logs(rel, tmp.parent / "pods-logs")
        say("pods: master pod deleted -> serving again")
        back = _master_back(rel)
    finally:
        say("pods: tearing the cluster down")
        c.down()
    return [
        Row("pods", "images built (layer-cached) + cluster up + images imported", "s", [build + up],
            extra={"build": build, "cluster_up_and_import": up}),
        Row("pods", "helm install -> every pod Ready (1 master, 3 chunkservers, operator)", "s", [install]),
        Row("pods", f"{BURST} Snapshot CRs at once, the first after install -> each Ready from its creation, p50",
            "s", [pct(first.own, 0.5)], extra={"samples": first.own, "applied": first.applied}),
        Row("pods", f"{BURST} Snapshot CRs at once, the first after install -> each Ready from its creation, p95",
            "s", [pct(first.own, 0.95)]),
        Row("pods", f"one Snapshot CR at a time ({SEQ}) -> Ready from its creation", "s", seq),
        Row("pods", f"{BURST} Snapshot CRs at once -> each Ready from its creation, p50", "s", [pct(own, 0.5)],
            extra={"samples": own}),
        at_most(Row("pods", f"{BURST} Snapshot CRs at once -> each Ready from its creation, p95", "s",
                    [pct(own, 0.95)]), 1.0, "≤ 1 s"),
        Row("pods", "  of which creation -> kopf's finalizer on it, p95", "s", [pct(b.finalized, 0.95)],
            extra={"samples": b.finalized}),
        Row("pods", f"{BURST} Snapshot CRs at once -> each Ready from before the apply, p50", "s",
            [pct(lat, 0.5)], extra={"samples": lat}),
        Row("pods", f"{BURST} Snapshot CRs at once -> each Ready from before the apply, p95", "s",
            [pct(lat, 0.95)]),
        Row("pods", f"{BURST} Snapshot CRs at once -> the last Ready", "s", [max(lat)]),
        Row("pods", f"  of which the kubectl apply of the {BURST} CRs", "s", [applied]),
        Row("pods", "master pod deleted -> new master answers status", "s", [back]),
    ]
