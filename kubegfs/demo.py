"""`make run`: the embedded default end to end, printing what it proves.

Starts a master and three chunkservers on loopback (three zones), writes files, snapshots the
directory, overwrites / appends / deletes / adds files, then restores the snapshot to a new path
and in place, and checks every byte against what was there at snapshot time.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .local import LocalCluster


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def run_demo(data_dir: Path | None = None) -> int:
    con = Console(width=None if os.isatty(1) else 140)
    tmp = None
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="kubegfs-demo-"))
        data_dir = tmp
    rng = random.Random(42)
    chunk = 1 << 20
    cl = LocalCluster(data_dir, 3, chunk_size=chunk)
    ok = True
    try:
        t0 = time.perf_counter()
        cl.start()
        con.print(f"[bold]kubegfs local stack[/] master {cl.master_url}, "
                  f"{len(cl.chunkservers)} chunkservers: " +
                  ", ".join(f"{p.url} ({p.zone})" for p in cl.chunkservers))
        c = cl.client()
        files = {
            "/data/readme.txt": b"kubegfs demo: point-in-time directory snapshots\n",
            "/data/logs/app.log": b"".join(f"line {i}\n".encode() for i in range(20000)),
            "/data/blobs/big.bin": rng.randbytes(3 * chunk + 12345),
            "/data/blobs/small.bin": rng.randbytes(777),
            "/data/config/settings.json": b'{"replicas": 3, "zones": ["a", "b", "c"]}\n',
        }
        c.mkdir("/data/logs", parents=True)
        c.mkdir("/data/blobs")
        c.mkdir("/data/config")
        for p, b in files.items():
            c.put(p, b)
        con.print(f"wrote {len(files)} files ({sum(map(len, files.values()))} bytes) under /data")

        snap = c.snapshot_create("/data", "demo-1", copies=2)
        holders = ", ".join(f"{h['id']} ({h['zone']}, {h['reason']})" for h in snap["holders"])
        con.print(f"snapshot [bold]demo-1[/]: {snap['files']} files, record {snap['record_bytes']} bytes, "
                  f"sha256 {snap['sha256'][:16]}…, held by {holders}")

        c.put("/data/readme.txt", b"overwritten after the snapshot\n")
        c.put("/data/logs/app.log", b"appended after the snapshot\n", append=True)
        c.rm("/data/blobs/small.bin")
        c.put("/data/new-file.txt", b"created after the snapshot\n")
        c.put("/data/blobs/big.bin", rng.randbytes(100), append=True)
        con.print("after the snapshot: overwrote readme.txt, appended to app.log and big.bin, "
                  "deleted small.bin, created new-file.txt")

        r1 = c.snapshot_restore("demo-1", to="/restored")
        r2 = c.snapshot_restore("demo-1")
        con.print(f"restored to /restored from {r1['source']['id']} in {r1['duration_seconds'] * 1000:.1f} ms; "
                  f"in place at /data in {r2['duration_seconds'] * 1000:.1f} ms")

        t = Table("file", "at snapshot", "/restored", "/data (in place)", "result")
        for p, b in files.items():
            want = _sha(b)
            got_new = _sha(c.get(p.replace("/data", "/restored", 1)))
            got_in = _sha(c.get(p))
            good = want == got_new == got_in
            ok &= good
            t.add_row(p, want, got_new, got_in, "[green]identical[/]" if good else "[red]DIFFERENT[/]")
        extra = c.exists("/data/new-file.txt") or c.exists("/restored/new-file.txt")
        ok &= not extra
        t.add_row("/data/new-file.txt", "(absent)", "absent" if not c.exists("/restored/new-file.txt") else "PRESENT",
                  "absent" if not c.exists("/data/new-file.txt") else "PRESENT",
                  "[green]absent[/]" if not extra else "[red]PRESENT[/]")
        con.print(t)
        st = c.status()
        con.print(f"copy-on-write clones: {st['cow_clones']}, chunks: {st['chunks']}, "
                  f"op-log seq: {st['seq']}, total time {time.perf_counter() - t0:.2f}s")
        c.close()
    finally:
        cl.stop()
        if tmp is not None and ok:
            shutil.rmtree(tmp, ignore_errors=True)
    if ok:
        con.print("[bold green]demo passed[/]: every restored file is byte-identical to the snapshot")
        return 0
    con.print(f"[bold red]demo FAILED[/]; logs kept in {data_dir}")
    return 1


if __name__ == "__main__":
    raise SystemExit(run_demo(Path(os.environ["KUBEGFS_DEMO_DATA"]) if "KUBEGFS_DEMO_DATA" in os.environ else None))
