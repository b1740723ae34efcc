"""The Kubernetes half of ``make run`` (and ``make up``): a real kube-apiserver, three simulated
nodes in three zones, the master and chunkserver pods backed by real processes, the operator
with its own least-privilege ServiceAccount; then ``kubectl apply`` of examples/snapshot.yaml and
examples/restore.yaml and a fast SnapshotSchedule, and the result as ``kubectl get
gsnap,grestore,gsched`` shows it."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from .controlplane import ControlPlane, ControlPlaneError
from .stack import REPO, K8sStack, NodeSpec, PodSpec

NODES = [NodeSpec("node-a", "zone-a", "region-1"), NodeSpec("node-b", "zone-b", "region-1"),
         NodeSpec("node-c", "zone-c", "region-1")]


def _wait(stack: K8sStack, plural: str, name: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.condition(plural, name) == "True":
            return "True"
        if stack.condition(plural, name, "Failed") == "True":
            return "Failed"
        time.sleep(0.2)
    return "Timeout"


SCHEDULE = """
apiVersion: kubegfs.io/v1alpha1
kind: SnapshotSchedule
metadata: {name: data-every-2s}
spec: {path: /data, schedule: "*/2 * * * * *", retention: {keepLast: 2}, snapshotTemplate: {copies: 1}}
"""


def _wait_kept(stack: K8sStack, name: str, kept: int, timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = stack.get("snapshotschedules", name).get("status") or {}
        if st.get("kept", 0) >= kept and st.get("lastSuccessfulSnapshot"):
            return True
        time.sleep(0.5)
    return False


def run(keep_running: bool = False, state: Path | None = None) -> int:
    con = Console(width=None if os.isatty(1) else 160)
    tmp = Path(tempfile.mkdtemp(prefix="kubegfs-k8s-demo-")) if state is None else state
    tmp.mkdir(parents=True, exist_ok=True)
    cp = ControlPlane(state_dir=tmp / "controlplane")
    try:
        t0 = time.monotonic()
        cp.start()
    except ControlPlaneError as exc:
        con.print(f"[red]the local control plane could not start[/]: {exc}\n"
                  "build it with `make controlplane-build` (needs Go and the module proxy)")
        return 1
    con.print(f"[bold]kube-apiserver[/] {cp.url} up in {time.monotonic() - t0:.1f}s "
              f"(export KUBECONFIG={cp.kubeconfig})")
    stack = K8sStack(
        cp, "kubegfs", tmp / "stack", NODES,
        master=PodSpec("kubegfs-master-0", "node-a", "127.0.30.1"),
        chunkservers=[PodSpec("kubegfs-chunkserver-0", "node-a", "127.0.30.2"),
                      PodSpec("kubegfs-chunkserver-1", "node-b", "127.0.31.1"),
                      PodSpec("kubegfs-chunkserver-2", "node-c", "127.0.32.1")],
        watch_all_namespaces=True,
    )
    ok = False
    try:
        stack.start()
        con.print(stack.kubectl("get", "nodes,pods", "-o", "wide", "-L", "topology.kubernetes.io/zone").stdout)
        c = stack.cluster.client()
        c.mkdir("/data/logs", parents=True)
        files = {"/data/readme.txt": b"hello from kubegfs\n", "/data/logs/app.log": b"log line\n" * 5000,
                 "/data/blob.bin": os.urandom(3 * (1 << 20) + 7)}
        for p, b in files.items():
            c.put(p, b)
        con.print(f"wrote {len(files)} files under /data; kubectl apply -f examples/snapshot.yaml")
        stack.kubectl("apply", "-f", str(REPO / "examples" / "snapshot.yaml"))
        if _wait(stack, "snapshots", "data-nightly") != "True":
            con.print(stack.get("snapshots", "data-nightly").get("status"))
            return 1
        c.put("/data/readme.txt", b"changed after the snapshot\n")
        c.rm("/data/logs", recursive=True)
        con.print("changed readme.txt and deleted /data/logs; kubectl apply -f examples/restore.yaml")
        stack.kubectl("apply", "-f", str(REPO / "examples" / "restore.yaml"))
        if _wait(stack, "restores", "data-nightly-restore") != "True":
            con.print(stack.get("restores", "data-nightly-restore").get("status"))
            return 1
        con.print("a SnapshotSchedule every 2 seconds keeping the newest 2 (examples/snapshotschedule.yaml "
                  "is the nightly, grandfather-father-son version)")
        stack.kubectl("apply", "-f", "-", input=SCHEDULE)
        if not _wait_kept(stack, "data-every-2s", 2):
            con.print(stack.get("snapshotschedules", "data-every-2s").get("status"))
            return 1
        stack.kubectl("patch", "gsched", "data-every-2s", "--type", "merge", "-p", '{"spec":{"suspend":true}}')
        deadline = time.monotonic() + 30
        while (stack.get("snapshotschedules", "data-every-2s").get("status") or {}).get("phase") != "Suspended":
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.3)
        con.print("[bold]$ kubectl get gsnap,grestore,gsched -o wide[/]")
        con.print(stack.kubectl("get", "gsnap,grestore,gsched", "-o", "wide").stdout)
        loc = stack.get("snapshots", "data-nightly")["status"]["location"]
        con.print(f"nearest copy: pod {loc['pod']} on {loc['node']} ({loc['zone']}): {loc['reason']}, "
                  "judged by node labels against the master pod's node")
        ok = all(hashlib.sha256(c.get(p.replace("/data", "/data-restored", 1))).digest() ==
                 hashlib.sha256(b).digest() for p, b in files.items())
        metrics = [ln for ln in stack.operator_metrics().splitlines()
                   if ln.startswith(("kubegfs_snapshots_total", "kubegfs_restores_total",
                                     "kubegfs_snapshot_size_bytes_sum"))]
        con.print("operator metrics:\n  " + "\n  ".join(metrics))
        con.print("[bold green]kubernetes demo passed[/]: /data-restored is byte-identical to the snapshot"
                  if ok else "[bold red]kubernetes demo FAILED[/]: restored bytes differ")
        if keep_running and ok:
            con.print(f"\nexport KUBECONFIG={cp.kubeconfig}\n"
                      f"export KUBEGFS_MASTER={stack.cluster.master_url} KUBEGFS_TOKEN={stack.cluster.token}\n"
                      "kubectl apply your own Snapshot/Restore (namespace kubegfs); Ctrl-C stops everything.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        stack.stop()
        cp.stop()
        if state is None and ok:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    keep = "--keep-running" in sys.argv
    state = Path(".run/k8s") if keep else None
    if keep and state is not None and state.exists():
        shutil.rmtree(state)
    code = run(keep_running=keep, state=state)
    sys.exit(code)


if __name__ == "__main__":
    main()
