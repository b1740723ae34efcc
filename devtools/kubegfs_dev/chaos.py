"""Seeded chaos against a real local cluster, checked against an in-memory witness model.

``python -m kubegfs_dev.chaos --trials N --ops M [--seed S]`` (``make chaos TRIALS=200``) runs N
trials; each starts a master and four chunkservers, applies M random operations (mkdir, put,
overwrite, append, mv, rm, snapshot, restore to a new path or in place, snapshot delete, and a
few invalid requests) interleaved with faults (master kill -9 mid-operation, the master's data
directory lost and recovered from the chunkservers, chunkserver kill -9 with or without its
disk, bytes flipped in chunk files and record copies, checkpoints), and
after each step compares the namespace and every file's bytes with the model. Every snapshot is
restored at the end and compared with the model's copy at its creation. The seed of a failing
trial is printed so it can be replayed with ``--seed``.

``--slow-fsync S`` makes every op-log sync of the master take S seconds longer (a busy disk), and
the master kills then land inside that window, also during rm, snapshot delete and restore in
place: an op that was applied but not yet durable must vanish whole, and nothing it freed may be
deleted (see master/outbox.py).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubegfs.client import Client
from kubegfs.errors import KubegfsError
from kubegfs.local import LocalCluster

from .util import damage_record, stored_records

DIR = None  # marker for directories in the model
CHUNK = 64 * 1024


class Lost(AssertionError):
    """The cluster disagrees with the model: something acknowledged was lost or changed."""


@dataclass
class Stats:
    trials: int = 0
    steps: int = 0
    acked: int = 0
    rejected: int = 0
    unacked: int = 0
    lost: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    corruptions_injected: int = 0
    corruptions_detected: int = 0
    snapshots_verified: int = 0
    diffs_checked: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def merge(self, o: Stats) -> None:
        for k in ("trials", "steps", "acked", "rejected", "unacked", "lost", "corruptions_injected",
                  "corruptions_detected", "snapshots_verified", "diffs_checked"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.faults.update(o.faults)
        self.recovery_seconds += o.recovery_seconds
        self.failures += o.failures


Tree = dict[str, Any]  # path -> bytes (file) or DIR


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


@dataclass
class _ChunkRot:
    """A chunk file a fault flipped a bit in: repaired once the file is gone or differs."""

    path: Path
    bad: bytes

    def still_there(self) -> bool:
        return self.path.exists() and self.path.read_bytes() == self.bad

    def __str__(self) -> str:
        return str(self.path)


@dataclass
class _RecordRot:
    """A chunkserver's copy of a record a fault flipped a byte of (in its block log, or its file
    of an earlier version): repaired once that chunkserver no longer answers it as corrupt (it
    serves a good copy again, or has none)."""

    url: str
    token: str
    rid: str

    def still_there(self) -> bool:
        import requests

        try:
            r = requests.get(f"{self.url}/internal/records/{self.rid}", timeout=10,
                             headers={"Authorization": f"Bearer {self.token}"})
        except requests.RequestException:
            return True  # (down: a restart is under way)
        return r.status_code not in (200, 404)

    def __str__(self) -> str:
        return f"record {self.rid} on {self.url}"


class Model:
    def __init__(self) -> None:
        self.tree: Tree = {"/": DIR}
        self.snaps: dict[str, tuple[str, Tree]] = {}

    def dirs(self) -> list[str]:
        return sorted(p for p, v in self.tree.items() if v is DIR)

    def files(self) -> list[str]:
        return sorted(p for p, v in self.tree.items() if v is not DIR)

    def subtree(self, root: str) -> Tree:
        return {p[len(root):] if root != "/" else p: v for p, v in self.tree.items() if _under(p, root)}

    def remove(self, root: str) -> None:
        for p in [p for p in self.tree if _under(p, root)]:
            del self.tree[p]

    def graft(self, root: str, sub: Tree) -> None:
        for rel, v in sub.items():
            p = root if rel in ("", "/") else (root.rstrip("/") + rel if root != "/" else rel)
            self.tree[p] = v


class Trial:
    def __init__(self, seed: int, ops: int, workdir: Path, slow_fsync: float = 0.0) -> None:
        self.seed = seed
        self.slow_fsync = slow_fsync
        self.rng = random.Random(seed)
        self.ops = ops
        self.dir = workdir
        self.m = Model()
        self.st = Stats(trials=1)
        self.cl = LocalCluster(workdir, 4, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.0,
                               scrub_interval=1.0, checkpoint_ops=40,
                               master_args=["--debug-fsync-delay", str(slow_fsync)] if slow_fsync else None)
        self.c: Client | None = None
        self.n = 0
        self.down: list[Any] = []
        self.corrupted: list[_ChunkRot | _RecordRot] = []  # injected corruptions not yet repaired

    # ------------------------------------------------------------------ helpers

    def client(self) -> Client:
        if self.c is None:
            self.c = self.cl.client()
        return self.c

    def name(self) -> str:
        self.n += 1
        return f"n{self.n}"

    def data(self, big: bool = False) -> bytes:
        n = self.rng.choice([0, 1, 100, 5000, CHUNK - 1, CHUNK, CHUNK + 7, 3 * CHUNK + 11] if big else
                            [0, 1, 10, 300, 4000, CHUNK + 3])
        return self.rng.randbytes(n)

    def expect_reject(self, fn: Any) -> None:
        before = self.client().dump()
        try:
            fn()
        except KubegfsError as exc:
            if exc.status >= 500:
                raise
            self.st.rejected += 1
            if self.client().dump() != before:
                raise Lost(f"a rejected request changed the state: {exc.message}") from exc
            return
        raise Lost("an invalid request was accepted")

    # ------------------------------------------------------------------ verification

    def verify(self, full: bool) -> None:
        c = self.client()
        seen: Tree = {}
        stack = ["/"]
        while stack:
            d = stack.pop()
            seen[d] = DIR
            for e in c.ls(d):
                if e["type"] == "dir":
                    stack.append(e["path"])
                else:
                    seen[e["path"]] = e["size"]
        want = {p: (DIR if v is DIR else len(v)) for p, v in self.m.tree.items()}
        if seen != want:
            extra = sorted(set(seen) - set(want))[:5]
            missing = sorted(set(want) - set(seen))[:5]
            diff = [p for p in set(seen) & set(want) if seen[p] != want[p]][:5]
            raise Lost(f"namespace differs: extra {extra}, missing {missing}, size/type {diff}")
        if full:
            for p in self.m.files():
                got = c.get(p)
                if got != self.m.tree[p]:
                    raise Lost(f"{p}: {len(got)} bytes read, sha {hashlib.sha256(got).hexdigest()[:12]} "
                               f"!= model {hashlib.sha256(self.m.tree[p]).hexdigest()[:12]}")

    def read_tree(self, root: str) -> Tree:
        """The subtree at ``root`` as the cluster has it, keyed like ``Model.subtree``."""
        c = self.client()
        got: Tree = {}
        if not c.exists(root):
            return got
        for e in c.walk(root):
            rel = e["path"][len(root):] if root != "/" else e["path"]
            got["" if rel == "/" else rel] = DIR if e["type"] == "dir" else c.get(e["path"])
        return got

    def verify_snapshot(self, name: str) -> None:
        c = self.client()
        target = f"/verify-{self.name()}"
        c.snapshot_restore(name, to=target)
        _root, sub = self.m.snaps[name]
        got = self.read_tree(target)
        want = {("" if k in ("", "/") else k): v for k, v in sub.items()}
        if got != want:
            raise Lost(f"snapshot {name} restored differently from its creation-time copy")
        c.rm(target, recursive=True)
        self.st.snapshots_verified += 1

    def check_diff(self, name: str) -> None:
        """Snapshot ``name`` against the live tree (nothing changed since) and against an earlier
        snapshot of the same path: every path whose content the witness says changed is covered
        by the report, and every file reported created or deleted is so in the witness."""
        c = self.client()
        root, new = self.m.snaps[name]
        if c.snapshot_diff(name)["changes"]:
            raise Lost(f"snapshot {name} differs from the live tree it was just taken of")
        older = [n for n, (r, _t) in self.m.snaps.items() if r == root and n != name]
        if not older:
            return
        prev = self.rng.choice(sorted(older))
        old = self.m.snaps[prev][1]
        report = c.snapshot_diff(prev, name)["changes"]

        def rel(p: str) -> str:
            return "" if p == "." else p[1:]  # "./a/b" -> "/a/b"

        exact = {rel(x["path"]) for x in report} | {rel(x["to"]) for x in report if x.get("to")}
        whole = [q for x in report if x["kind"] != "M" for q in (rel(x["path"]), rel(x.get("to") or "."))]
        changed = {p for p in old.keys() | new.keys() if p not in ("", "/") and old.get(p) != new.get(p)}
        for p in changed:  # reported itself, or inside a directory reported created/deleted/renamed
            if p not in exact and not any(q and p.startswith(q + "/") for q in whole):
                raise Lost(f"diff {prev} -> {name} misses {p}")
        for x in report:
            if x["kind"] == "+" and rel(x["path"]) not in new or x["kind"] == "-" and rel(x["path"]) not in old:
                raise Lost(f"diff {prev} -> {name} reports {x['kind']} {x['path']} the witness does not have")
        self.st.diffs_checked += 1

    # ------------------------------------------------------------------ operations

    def op(self) -> None:
        c = self.client()
        rng = self.rng
        dirs = self.m.dirs()
        files = self.m.files()
        kind = rng.choices(
            ["mkdir", "put", "overwrite", "append", "mv", "rm", "snapshot", "restore", "snapdel", "invalid"],
            [10, 20, 8, 10, 6, 5, 8, 6, 3, 4])[0]
        if kind in ("overwrite", "append") and not files:
            kind = "put"
        if kind in ("restore", "snapdel") and not self.m.snaps:
            kind = "snapshot"
        if kind == "mkdir":
            p = f"{rng.choice(dirs).rstrip('/')}/{self.name()}"
            c.mkdir(p)
            self.m.tree[p] = DIR
        elif kind == "put":
            p = f"{rng.choice(dirs).rstrip('/')}/{self.name()}"
            b = self.data(big=True)
            c.put(p, b)
            self.m.tree[p] = b
        elif kind == "overwrite":
            p = rng.choice(files)
            b = self.data(big=True)
            c.put(p, b)
            self.m.tree[p] = b
        elif kind == "append":
            p = rng.choice(files)
            b = self.data()
            c.put(p, b, append=True)
            self.m.tree[p] = self.m.tree[p] + b
        elif kind == "mv":
            src = rng.choice([p for p in self.m.tree if p != "/"] or ["/"])
            if src == "/":
                return
            dst_parent = rng.choice([d for d in dirs if not _under(d, src)])
            dst = f"{dst_parent.rstrip('/')}/{self.name()}"
            c.mv(src, dst)
            sub = self.m.subtree(src)
            self.m.remove(src)
            self.m.graft(dst, sub)
        elif kind == "rm":
            p = rng.choice([p for p in self.m.tree if p != "/"] or ["/"])
            if p == "/":
                return
            c.rm(p, recursive=True)
            self.m.remove(p)
        elif kind == "snapshot":
            root = rng.choice(dirs)
            name = f"s-{self.name()}"
            c.snapshot_create(root, name, copies=2)
            self.m.snaps[name] = (root, self.m.subtree(root))
            self.check_diff(name)
        elif kind == "restore":
            name = rng.choice(sorted(self.m.snaps))
            root, sub = self.m.snaps[name]
            if rng.random() < 0.5 and _parent(root) in self.m.tree and self.m.tree[_parent(root)] is DIR:
                c.snapshot_restore(name)
                self.m.remove(root)
                self.m.graft(root, sub)
            else:
                dst = f"{rng.choice(dirs).rstrip('/')}/{self.name()}"
                c.snapshot_restore(name, to=dst)
                self.m.graft(dst, sub)
        elif kind == "snapdel":
            name = rng.choice(sorted(self.m.snaps))
            c.snapshot_delete(name)
            del self.m.snaps[name]
        else:
            bad = rng.choice([
                lambda: c.mkdir(rng.choice(dirs)) if len(dirs) > 1 else c.mkdir("/"),
                lambda: c.put(f"/missing-{self.name()}/x", b"x"),
                lambda: c.mv("/", "/x"),
                lambda: c.snapshot_create("/no/such/dir", f"bad-{self.name()}"),
                lambda: c.snapshot_restore("no-such-snapshot"),
                lambda: c.mkdir("/a/../b"),
            ])
            self.expect_reject(bad)
            self.st.steps += 1
            return
        self.st.acked += 1
        self.st.steps += 1

    # ------------------------------------------------------------------ faults

    def fault(self) -> None:
        rng = self.rng
        kind = rng.choices(["master-kill", "cs-kill", "cs-disk-loss", "corrupt-chunk", "corrupt-record",
                            "checkpoint", "master-volume-loss"], [4, 2, 1, 3, 2, 2, 1])[0]
        self.st.faults[kind] += 1
        if kind == "master-kill":
            self.master_kill_mid_op()
        elif kind == "master-volume-loss":
            self.master_volume_loss()
        elif kind in ("cs-kill", "cs-disk-loss"):
            self.heal()
            p = rng.choice(self.cl.chunkservers)
            self.cl.kill(p, signal.SIGKILL)
            if kind == "cs-disk-loss":
                shutil.rmtree(p.data, ignore_errors=True)
            self.down.append(p)
        elif kind == "corrupt-chunk":
            self.heal()
            chunks = [f for p in self.cl.chunkservers for f in p.data.glob("chunks/*/*.chk") if f.stat().st_size]
            if chunks:
                f = rng.choice(chunks)
                raw = bytearray(f.read_bytes())
                i = rng.randrange(len(raw))
                raw[i] ^= 1 << rng.randrange(8)
                f.write_bytes(bytes(raw))
                self.corrupted.append(_ChunkRot(f, bytes(raw)))
                self.st.corruptions_injected += 1
        elif kind == "corrupt-record":
            self.heal()
            recs = [(p, rid, n) for p in self.cl.chunkservers
                    for rid, (_f, _off, n) in sorted(stored_records(p.data).items()) if n]
            if recs:
                p, rid, n = rng.choice(recs)
                damage_record(p.data, rid, rng.randrange(n))
                self.corrupted.append(_RecordRot(p.url, self.cl.internal_token, rid))
                self.st.corruptions_injected += 1
        else:
            self.client().checkpoint()

    def heal(self, timeout: float = 60.0) -> None:
        """Restart what is down, have every chunkserver scrub now, and wait until every chunk and
        record is fully replicated and every injected corruption was found and replaced (one
        fault at a time: two corruptions of both copies of a record before either is noticed is
        beyond what two copies protect against)."""
        import requests

        for p in self.down:
            self.cl.start_chunkserver(p)
        self.down = []
        t0 = time.monotonic()
        c = self.client()
        auth = {"Authorization": f"Bearer {self.cl.internal_token}"}
        for p in self.cl.chunkservers:
            requests.post(p.url + "/internal/scrub", headers=auth, timeout=30)
        while time.monotonic() - t0 < timeout:
            st = c.status()
            alive = {x["id"] for x in c.chunkservers() if x["alive"]}
            recs_ok = all(len([h for h in s["holders"] if h["id"] in alive]) >= min(2, len(alive))
                          for s in c.snapshot_list() if s["state"] == "ready")
            if st["under_replicated"] == 0 and st["chunkservers"]["alive"] >= 4 and recs_ok \
                    and not any(r.still_there() for r in self.corrupted):
                self.st.corruptions_detected += len(self.corrupted)
                self.corrupted = []
                self.st.recovery_seconds.append(time.monotonic() - t0)
                return
            time.sleep(0.1)
        left = [str(r) for r in self.corrupted if r.still_there()]
        raise Lost(f"cluster did not heal within {timeout}s: {c.status()}; undetected corruption: {left}")

    def master_kill_mid_op(self) -> None:
        c = self.client()
        rng = self.rng
        dirs = self.m.dirs()
        before = dict(self.m.tree)
        p = f"{rng.choice(dirs).rstrip('/')}/{self.name()}"
        b = self.data(big=True)
        snap_root = rng.choice(dirs)
        snap_name = f"s-{self.name()}"
        kinds = ["put", "snapshot", "mkdir"]
        if self.slow_fsync:  # the ops that free chunks or record copies
            kinds += ["rm", "snapdel", "restore-inplace"] * 2
        which = rng.choice(kinds)
        victim = rng.choice([q for q in self.m.tree if q != "/"] or ["/"])
        snap = rng.choice(sorted(self.m.snaps)) if self.m.snaps else ""
        if (which == "rm" and victim == "/") or (which in ("snapdel", "restore-inplace") and not snap):
            which = "mkdir"
        if which == "restore-inplace":
            root = self.m.snaps[snap][0]
            if _parent(root) not in self.m.tree or self.m.tree[_parent(root)] is not DIR:
                which = "mkdir"
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                cl2 = self.cl.client()
                if which == "put":
                    cl2.put(p, b)
                elif which == "snapshot":
                    cl2.snapshot_create(snap_root, snap_name, copies=2, timeout=5)
                elif which == "rm":
                    cl2.rm(victim, recursive=True)
                elif which == "snapdel":
                    cl2.snapshot_delete(snap)
                elif which == "restore-inplace":
                    cl2.snapshot_restore(snap)
                else:
                    cl2.mkdir(p)
                result["ok"] = True
            except KubegfsError as exc:
                result["err"] = exc

        t = threading.Thread(target=run)
        t.start()
        # with a slow disk, most kills land while the op is applied but not yet durable
        time.sleep(rng.random() * (self.slow_fsync * 1.5 if self.slow_fsync else 0.05))
        self.cl.kill(self.cl.master, signal.SIGKILL)
        t.join(timeout=30)
        t0 = time.monotonic()
        self.cl.start_master()
        self.st.recovery_seconds.append(time.monotonic() - t0)
        self.cl.wait_registered(4 - len(self.down), timeout=30)
        c = self.client()
        acked = result.get("ok", False)
        if which in ("put", "mkdir"):
            exists = c.exists(p)
            if acked and not exists:
                raise Lost(f"acknowledged {which} of {p} lost in a master crash")
            if exists:
                if which == "put" and c.get(p) != b:
                    raise Lost(f"{p}: a crashed write is visible but not whole")
                self.m.tree[p] = b if which == "put" else DIR
        elif which == "rm":
            exists = c.exists(victim)
            if acked and exists:
                raise Lost(f"acknowledged rm of {victim} undone by a master crash")
            if not exists:
                self.m.remove(victim)
            self.verify(full=True)  # whatever survived must still be readable
        elif which == "snapdel":
            present = snap in {s["name"] for s in c.snapshot_list()}
            if acked and present:
                raise Lost(f"acknowledged delete of snapshot {snap} undone by a master crash")
            if not present:
                del self.m.snaps[snap]
        elif which == "restore-inplace":
            root, sub = self.m.snaps[snap]
            got = self.read_tree(root)
            want_new = {("" if k in ("", "/") else k): v for k, v in sub.items()}
            if got == want_new:
                self.m.remove(root)
                self.m.graft(root, sub)
            elif acked:
                raise Lost(f"acknowledged restore of {snap} in place lost in a master crash")
            elif got != {("" if k in ("", "/") else k): v for k, v in self.m.subtree(root).items()}:
                raise Lost(f"an unacknowledged restore of {snap} left {root} neither old nor restored")
        else:
            names = {s["name"]: s for s in c.snapshot_list()}
            if acked and snap_name not in names:
                raise Lost(f"acknowledged snapshot {snap_name} lost in a master crash")
            if snap_name in names:
                c.snapshot_wait(snap_name, timeout=60)  # captured before the crash: resumed
                self.m.snaps[snap_name] = (snap_root, {k[len(snap_root):] if snap_root != "/" else k: v
                                                       for k, v in before.items() if _under(k, snap_root)})
        self.st.acked += int(acked)
        self.st.unacked += int(not acked)
        # replay is deterministic: restart again with no new ops, the dump must be identical
        d1 = c.dump()
        self.cl.kill(self.cl.master, signal.SIGKILL)
        self.cl.start_master()
        if c.dump() != d1:
            raise Lost("the namespace dump changed across a restart with no operations")
        self.cl.wait_registered(4 - len(self.down), timeout=30)

    def master_volume_loss(self) -> None:
        """kill -9 the master and delete its data directory (a lost PVC); the fresh master must
        refuse and delete nothing, and ``recover`` must bring back exactly the same namespace from
        the metadata copies on the chunkservers."""
        self.heal()
        c = self.client()
        deadline = time.monotonic() + 30  # a master lost in its first second has no copy yet
        while c.status()["metadata_replication"]["in_sync"] < 1:
            if time.monotonic() > deadline:
                raise Lost(f"no metadata copy in sync: {c.status()['metadata_replication']}")
            time.sleep(0.1)
        want = c.dump()
        self.cl.kill(self.cl.master, signal.SIGKILL)
        shutil.rmtree(self.cl.master.data)
        t0 = time.monotonic()
        self.cl.start_master()
        deadline = time.monotonic() + 30
        while len(c.status()["cluster"]["foreign_chunkservers"]) < len(self.cl.chunkservers):
            if time.monotonic() > deadline:
                raise Lost(f"the empty master did not see every chunkserver: {c.status()['cluster']}")
            time.sleep(0.1)
        if not c.status()["cluster"]["refusing"]:
            raise Lost("a master with an empty data directory accepted another cluster's chunkservers")
        r = c.api("POST", "/admin/recover", json={"from": "metadata"})
        self.st.recovery_seconds.append(time.monotonic() - t0)
        if c.dump() != want:
            raise Lost(f"the namespace recovered from the metadata copies differs (from {r.get('from_chunkserver')})")
        self.cl.wait_registered(len(self.cl.chunkservers), timeout=30)

    # ------------------------------------------------------------------ the trial

    def run(self) -> Stats:
        try:
            self.cl.start()
            for i in range(self.ops):
                if self.rng.random() < 0.12:
                    self.fault()
                else:
                    self.op()
                self.verify(full=(i % 10 == 9))
            self.heal()
            self.verify(full=True)
            for name in sorted(self.m.snaps):
                self.verify_snapshot(name)
        except Lost as exc:
            self.st.lost += 1
            self.st.failures.append(f"seed {self.seed}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other surprise is a failure too
            self.st.failures.append(f"seed {self.seed}: {type(exc).__name__}: {exc}")
        finally:
            if self.c is not None:
                self.c.close()
            self.cl.stop()
        return self.st


def report(st: Stats, seconds: float) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kubegfs chaos: {st.trials} trials in {seconds:.0f}s")
    t.add_column("what")
    t.add_column("count", justify="right")
    rows: list[tuple[str, Any]] = [
        ("trials run", st.trials), ("steps", st.steps), ("operations acknowledged", st.acked),
        ("invalid requests rejected cleanly", st.rejected), ("operations cut by a crash (unacknowledged)", st.unacked),
        ("operations lost (must be 0)", st.lost),
        ("corruptions injected", st.corruptions_injected),
        ("corruptions detected and repaired", st.corruptions_detected),
        ("snapshots restored and verified", st.snapshots_verified),
        ("snapshot diffs checked against the witness", st.diffs_checked),
    ]
    rows += [(f"fault: {k}", v) for k, v in sorted(st.faults.items())]
    if st.recovery_seconds:
        rs = sorted(st.recovery_seconds)
        rows += [("recovery p50 (s)", f"{rs[len(rs) // 2]:.2f}"), ("recovery max (s)", f"{rs[-1]:.2f}")]
    for k, v in rows:
        t.add_row(k, str(v))
    con = Console(width=100, record=True)
    con.print(t)
    for f in st.failures:
        con.print(f"[red]FAILED[/] {f}  (replay: python -m kubegfs_dev.chaos --trials 1 --seed {f.split()[1].rstrip(':')})")
    return con.export_text()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubegfs_dev.chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--ops", type=int, default=40)
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random, printed)")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs of failed trials")
    ap.add_argument("--slow-fsync", type=float, default=0.0, metavar="S",
                    help="each master op-log sync takes S seconds longer; master kills land in that window")
    a = ap.parse_args(argv)
    from kubegfs import logs

    logs.setup("WARNING")
    seed0 = a.seed if a.seed is not None else random.randrange(1 << 31)
    print(f"chaos: {a.trials} trials x {a.ops} ops, seeds {seed0}..{seed0 + a.trials - 1}", flush=True)
    total = Stats()
    t0 = time.monotonic()
    for i in range(a.trials):
        seed = seed0 + i
        wd = Path(tempfile.mkdtemp(prefix=f"kubegfs-chaos-{seed}-"))
        st = Trial(seed, a.ops, wd, slow_fsync=a.slow_fsync).run()
        total.merge(st)
        status = "ok" if not st.failures else "FAILED"
        print(f"  trial {i + 1}/{a.trials} seed {seed}: {status} ({st.steps} steps, faults {dict(st.faults)})",
              flush=True)
        if st.failures and a.keep:
            print(f"    data kept in {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    report(total, time.monotonic() - t0)
    return 1 if total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
