"""``make demo-cluster``: the ``make run`` story on real nodes (root).

A 3-node kubelet + containerd cluster (left running; ``make cluster-down`` removes it), the chart
installed from the local images in a PSS-restricted namespace, files written to ``/data`` through
the master pod, ``kubectl apply -f examples/snapshot.yaml``, the files changed,
``examples/restore.yaml`` to ``/data-restored`` and every byte compared with what was snapshotted.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import tomllib

from rich.console import Console
from rich.table import Table

from kubegfs_dev.cluster import Cluster, ClusterError
from kubegfs_dev.realchart import REPO, Release, wait_for

NS = "kubegfs-demo"
STATE = REPO / ".run" / "cluster"


def main() -> int:
    con = Console(width=None if os.isatty(1) else 160)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = [f"localhost/kubegfs/{c}:{version}" for c in ("master", "chunkserver", "operator")]
    cluster = Cluster(STATE, log=lambda msg: con.print(f"[dim]# {msg}[/]"))
    try:
        t0 = time.monotonic()
        cluster.up()
        cluster.load_images(images)
    except ClusterError as e:
        con.print(f"[red]the real-node cluster could not start[/]: {e}")
        return 1
    con.print(f"[bold]3 real nodes[/] up with the images in {time.monotonic() - t0:.1f}s")
    con.print(cluster.kubectl("get", "nodes", "-L", "topology.kubernetes.io/zone,topology.kubernetes.io/region").stdout)

    work = STATE / "demo"
    work.mkdir(parents=True, exist_ok=True)
    rel = Release(cluster, NS, work)
    rel.remove()
    wait_for(f"namespace {NS} gone", lambda: cluster.kubectl("get", "namespace", NS, check=False).returncode != 0, 180)
    cluster.recycle_volumes()
    rel.create_namespace()
    t0 = time.monotonic()
    rel.install()
    wait_for("every pod Ready", rel.all_ready, 300)
    con.print(f"[bold]helm install[/] → every pod Ready in {time.monotonic() - t0:.1f}s "
              f"(namespace {NS} enforces Pod Security restricted)")
    con.print(rel.kubectl("get", "pods", "-n", NS, "-o", "wide"))

    cl = rel.client()
    cl.mkdir("/data", parents=True)
    original = {f"/data/f{i}": os.urandom(200_000 * (i + 1)) for i in range(3)}
    for path, data in original.items():
        cl.put(path, data)
    rel.kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / "snapshot.yaml"))
    wait_for("Snapshot data-nightly Ready", lambda: rel.condition("snapshot", "data-nightly"), 180)
    con.print(rel.kubectl("get", "gsnap", "-n", NS, "-o", "wide"))

    cl.put("/data/f0", b"overwritten after the snapshot")
    cl.rm("/data/f1")
    cl.put("/data/new", b"created after the snapshot")
    rel.kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / "restore.yaml"))
    wait_for("Restore Ready", lambda: rel.condition("restore", "data-nightly-restore"), 180)
    con.print(rel.kubectl("get", "grestore", "-n", NS, "-o", "wide"))

    table = Table("file", "snapshotted sha256", "restored sha256", "")
    ok = True
    for path, data in original.items():
        back = cl.get(path.replace("/data/", "/data-restored/"))
        same = back == data
        ok &= same
        table.add_row(path, hashlib.sha256(data).hexdigest()[:16], hashlib.sha256(back).hexdigest()[:16],
                      "[green]identical[/]" if same else "[red]DIFFERENT[/]")
    con.print(table)
    con.print(f"export KUBECONFIG={cluster.kubeconfig}    # the cluster keeps running; `make cluster-down` removes it")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
