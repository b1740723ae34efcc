"""The operator through the real kube-apiserver: Snapshot CR -> Ready latency, a burst of CRs
applied at once, and the operator's RSS (``operator``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .cluster import rss_of
from .report import Row, at_most, pct


@dataclass(frozen=True)
class Burst:
    """What :func:`watch_burst` saw, per CR in the order of the names asked for."""

    applied: float
    """Seconds the ``apply`` call took."""
    from_apply: list[float]
    """Seconds from before ``apply`` until the CR was first seen Ready."""
    own: list[float]
    """Seconds from the CR's creation (its ADDED event: when the operator can first react) until
    it was first seen Ready."""
    finalized: list[float]
    """Seconds from its creation until the operator's finalizer was first seen on it (kopf's first
    cycle for the object: its queue and one API write); the rest of ``own`` is the handler's cycle."""
    created_at: list[float]
    """Wall-clock time (``time.time()``) of each CR's ADDED event, to line up with the pods' logs."""


def watch_burst(api: Any, ns: str, names: list[str], apply: Callable[[], object],
                timeout: float = 300) -> Burst:
    """Create the Snapshot CRs ``names`` with ``apply()`` while watching the namespace's Snapshots
    through the API (``api``: a CustomObjectsApi) from before it."""
    from kubernetes import watch

    added: dict[str, float] = {}
    final: dict[str, float] = {}
    wall: dict[str, float] = {}
    ready: dict[str, float] = {}
    listening, done = threading.Event(), threading.Event()
    failure: list[BaseException] = []
    wanted = set(names)

    def watcher() -> None:
        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            listed = cast(dict[str, Any], api.list_namespaced_custom_object("kubegfs.io", "v1alpha1", ns, "snapshots"))
            listening.set()
            for ev in w.stream(api.list_namespaced_custom_object, "kubegfs.io", "v1alpha1", ns, "snapshots",
                               resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=int(timeout)):
                now = time.perf_counter()
                obj = ev["object"]
                nm = obj["metadata"]["name"]
                if nm not in added:
                    added[nm], wall[nm] = now, time.time()
                if obj["metadata"].get("finalizers"):
                    final.setdefault(nm, now)
                conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
                if conds.get("Ready") == "True":
                    ready.setdefault(nm, now)
                if wanted <= ready.keys():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)
        finally:
            w.stop()
            listening.set()
            done.set()

    threading.Thread(target=watcher, daemon=True).start()
    listening.wait(30)
    t0 = time.perf_counter()
    apply()
    applied = time.perf_counter() - t0
    done.wait(timeout)
    if failure:
        raise RuntimeError(f"watching the Snapshot CRs failed: {failure[0]!r}")
    missing = [nm for nm in names if nm not in ready]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(names)} Snapshot CRs not Ready after {timeout:.0f}s")
    return Burst(applied, [ready[nm] - t0 for nm in names], [ready[nm] - added[nm] for nm in names],
                 [final.get(nm, ready[nm]) - added[nm] for nm in names], [wall[nm] for nm in names])


def bench_operator(tmp: Path, quick: bool, say: Callable[[str], None]) -> list[Row]:
    """Snapshot CR -> Ready latency through the real kube-apiserver and operator, a burst of CRs
    applied at once, and the operator's RSS."""

    from kubegfs_dev.controlplane import ControlPlane
    from kubegfs_dev.stack import K8sStack, NodeSpec, PodSpec

    seq_n, burst_n = (10, 20) if quick else (50, 100)
    say("operator: starting kube-apiserver, cluster and operator")
    cp = ControlPlane(state_dir=tmp / "cp")
    cp.start()
    nodes = [NodeSpec("bn-a", "zone-a", "r1"), NodeSpec("bn-b", "zone-b", "r1"), NodeSpec("bn-c", "zone-c", "r1")]
    stack = K8sStack(cp, "bench", tmp / "stack", nodes, master=PodSpec("master-0", "bn-a", "127.0.40.1"),
                     chunkservers=[PodSpec("cs-0", "bn-a", "127.0.40.2"), PodSpec("cs-1", "bn-b", "127.0.41.1"),
                                   PodSpec("cs-2", "bn-c", "127.0.42.1")])
    try:
        stack.start()
        c = stack.cluster.client()
        c.mkdir("/data")
        c.put("/data/f", b"x" * 10_000)

        def doc(name: str) -> str:
            return (f"apiVersion: kubegfs.io/v1alpha1\nkind: Snapshot\nmetadata: {{name: {name}}}\n"
                    f"spec: {{path: /data, copies: 2}}\n")

        def ready(name: str) -> bool:
            return stack.condition("snapshots", name) == "True"

        lat: list[float] = []
        for i in range(seq_n):
            say(f"operator: Snapshot CR -> Ready {i + 1}/{seq_n}")
            t0 = time.perf_counter()
            stack.kubectl("apply", "-f", "-", input=doc(f"seq-{i}"))
            while not ready(f"seq-{i}"):
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"seq-{i} not Ready after 120s")
                time.sleep(0.01)
            lat.append(time.perf_counter() - t0)
        say(f"operator: {burst_n} Snapshot CRs at once")
        docs = "---\n".join(doc(f"burst-{i}") for i in range(burst_n))
        b = watch_burst(
            stack.custom, stack.ns, [f"burst-{i}" for i in range(burst_n)],
            lambda: stack.kubectl("apply", "-f", "-", input=docs), timeout=600)
        burst, own = max(b.from_apply), b.own
        assert stack.operator is not None
        rss = rss_of(stack.operator.pid) / (1 << 20)
    finally:
        stack.stop()
        cp.stop()
    return [
        at_most(Row("operator", f"Snapshot CR -> Ready p50 ({seq_n} CRs, first one included)", "s", lat),
                1.0, "≤ 1 s"),
        at_most(Row("operator", f"Snapshot CR -> Ready p95 ({seq_n} CRs)", "s", [pct(lat, 0.95)],
                    extra={"samples": lat}), 1.0, "≤ 1 s"),
        at_most(Row("operator", f"{burst_n} CRs at once -> all Ready", "s", [burst]),
                20.0 * burst_n / 100, f"≤ {20 * burst_n // 100} s"),
        at_most(Row("operator", f"{burst_n} CRs at once -> each Ready from its creation, p95", "s",
                    [pct(own, 0.95)], extra={"samples": own, "finalized": b.finalized}), 1.0, "≤ 1 s"),
        Row("operator", "  of which creation -> kopf's finalizer on it, p95", "s", [pct(b.finalized, 0.95)]),
        at_most(Row("operator", "operator RSS", "MiB", [rss]), 150, "≤ 150 MiB"),
    ]
