"""In-process benchmarks on a master state: the snapshot capture pause (``capture``), the
seed's deepcopy + pickle of the same trees (``seed``) and the master's work for an incremental
snapshot, diff and restore (``incremental``)."""

from __future__ import annotations

import copy
import gc
import pickle
import statistics
import time
from collections.abc import Callable

from kubegfs.formats import packb
from kubegfs.master.ops import SnapCapture
from kubegfs.master.state import now_ns

from .report import Row, at_least, at_most, human_n
from .trees import Tree, seed_metadata, state_with


def bench_capture(trees: dict[int, Tree], repeats: int = 201) -> list[Row]:
    """Time MasterState.apply of a snap_capture op on a state holding all the trees."""
    st = state_with(trees)
    rows = []
    times: dict[int, list[float]] = {}
    for n in trees:
        samples = []
        for r in range(repeats):
            op = SnapCapture(op="snap_capture", id=f"c-{n}-{r}", name=f"c-{n}-{r}", path=f"/t{n}",
                             created=now_ns(), copies=2, seq=st.seq + 1)
            t0 = time.perf_counter_ns()
            st.apply(op)
            samples.append((time.perf_counter_ns() - t0) / 1e9)
        st.pins.clear()
        times[n] = samples
        rows.append(at_most(Row("capture", f"capture pause, {human_n(n)} files", "s", samples,
                                extra={"files": n}), 0.010, "≤ 10 ms"))
    if len(times) >= 2:
        small, big = min(times), max(times)
        ratio = statistics.median(times[big]) / statistics.median(times[small])
        rows.append(at_most(Row("capture", f"t({human_n(big)}) / t({human_n(small)})", "x", [ratio],
                                extra={"small": small, "big": big}), 2.0, "≤ 2×"))
    return rows


def bench_seed(trees: dict[int, Tree], capture_rows: list[Row], repeats: dict[int, int]) -> list[Row]:
    """The seed's capture: deepcopy the metadata subtree, then pickle it (in process only)."""
    version: dict[int, int] = {}
    rows = []
    cap = {r.extra.get("files"): r.median for r in capture_rows if "files" in r.extra}
    for n, t in trees.items():
        meta = {"/": seed_metadata(t.root, version)}
        samples = []
        size = 0
        for _ in range(repeats.get(n, 3)):
            gc.collect()
            t0 = time.perf_counter()
            snap = copy.deepcopy(meta["/"])
            # the seed pickled its deep copy: this is the baseline being measured, not a use of
            # pickle by kubegfs (the only pickle call in the repository)
            blob = pickle.dumps(snap)  # noqa: S301
            samples.append(time.perf_counter() - t0)
            size = len(blob)
            del snap, blob
        del meta
        rows.append(Row("seed", f"seed capture (deepcopy+pickle), {human_n(n)} files", "s", samples,
                        extra={"files": n, "pickle_bytes": size}))
        rows.append(Row("seed", f"seed bytes per file, {human_n(n)} files", "B/file", [size / n],
                        extra={"files": n}))
        if n in cap and cap[n] > 0:
            ratios = [s / cap[n] for s in samples]
            rows.append(at_least(Row("seed", f"seed / kubegfs capture, {human_n(n)} files", "x", ratios,
                                     extra={"files": n}), 100, "≥ 100×"))
    return rows


def _base_in(holder: dict[bytes, bytes], by_prefix: dict[bytes, bytes]) -> Callable[[bytes], bytes | None]:
    """A delta's base from a dict standing in for a holder, by digest prefix."""
    return lambda p: holder.get(by_prefix.get(p, b""))


def bench_incremental(trees: dict[int, Tree], changed: int = 100, rounds: int = 3) -> list[Row]:
    """The master's own work for a snapshot after ``changed`` files in as many directories changed, in
    process (no fsync, no round trip): digests, the since-previous diff, encoding + compressing
    the blocks to ship (deltas against the previous tree's where the holder has those), the
    commit op's block infos; the bytes shipped per copy (the request bodies); a holder's work
    on that body (a chunkserver's block store in a temporary directory that stored the first
    snapshot's blocks: each block rebuilt from its base, hashed, compressed, the pack written
    and fsynced); then a restore
    in place of the previous snapshot over the changed tree (assembly, the op's blocks, the
    subtrees it swaps) from the tree in memory and from blocks read back, and as the master
    makes it when the tree is in memory (the edits to the live tree, the subtrees it swaps);
    and the diff of two trees as many files apart."""
    import random
    import tempfile
    from pathlib import Path

    from kubegfs import blockdelta, merkle
    from kubegfs import namespace as ns
    from kubegfs.chunkserver.blocks import BlockStore
    from kubegfs.master.snapshots import Encoded, _assemble_job, diff_nodes, outgoing

    def version(_h: int) -> int:
        return 1

    rows: list[Row] = []
    for n, t in trees.items():
        rng = random.Random(n)
        prev = t.root
        merkle.digest(prev, version)
        holder = {dg: b for dg, b, _node in merkle.iter_blocks(prev, version, lambda _d: False)}
        by_prefix = {dg[:blockdelta.PREFIX]: dg for dg in holder}
        store_dir = tempfile.TemporaryDirectory(prefix="kubegfs-bench-blocks-")
        store = BlockStore(Path(store_dir.name))
        for part in merkle.batches(list(holder.items()), 4 << 20):  # as the first snapshot's batches come
            store.put([(dg, merkle.compress(b)) for dg, b in part])
        picks = list({p[:-1]: p for p, x in ns.walk(prev) if isinstance(x, ns.File)}.values())
        k = min(changed, len(picks))
        got: dict[str, list[float]] = {}
        for _round in range(rounds):
            live = prev
            for p in rng.sample(picks, k):
                f = ns.must_get(live, p)
                assert isinstance(f, ns.File)
                live = ns.replace(live, p, ns.File(f.size + 1, f.mtime + 1, f.mode, ((1 << 60) + rng.randrange(1 << 30),)),
                                  f.mtime + 1)
            t0 = time.perf_counter()
            kept: merkle.Kept = {}  # as a build keeps what its digest pass encoded, for shipping
            dg = merkle.digest(live, version, kept)
            merkle.stats(live, version)
            t1 = time.perf_counter()
            diff_nodes(merkle.DirRef(merkle.digest(prev, version), prev), version, merkle.DirRef(dg, live), version)
            t2 = time.perf_counter()
            new = outgoing(live, version, holder.__contains__, Encoded(kept=kept, prev=prev), version)
            body = blockdelta.pack(new)
            t3 = time.perf_counter()
            merkle.new_block_infos(live, version, holder.__contains__)
            t4 = time.perf_counter()
            for key, v in (("digests", t1 - t0), ("since-previous diff", t2 - t1), ("encode + compress to ship", t3 - t2),
                           ("commit op's block infos", t4 - t3), ("build total", t4 - t0),
                           ("bytes shipped", float(len(body)))):
                got.setdefault(key, []).append(v)
            t0 = time.perf_counter()
            store.put_delta(body)
            got.setdefault("a holder storing them", []).append(time.perf_counter() - t0)
            for blk_dg, blk, _z in blockdelta.unpack(body, _base_in(holder, by_prefix)):
                holder[blk_dg] = blk
                by_prefix[blk_dg[:blockdelta.PREFIX]] = blk_dg
            for src in ("tree in memory", "blocks read back"):
                local = merkle.TreeBlocks(prev, version) if src == "tree in memory" else None
                have: dict[bytes, bytes] = {}
                memo = merkle.Decoded()
                t0 = time.perf_counter()
                while True:
                    try:
                        tree, used, _h = _assemble_job(merkle.digest(prev, version), have, [live], version, [], memo,
                                                       local)
                        break
                    except merkle.NeedBlocks as need:
                        have.update({d: holder[d] for d in need.digests})
                merkle.pack_frames([(d, have[d]) for d in used])
                ns.changed_subtrees(live, tree)
                got.setdefault(f"restore in place ({src})", []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # what the master does with the snapshot's tree in memory
            edits = ns.edits_to(live, prev)
            assert edits is not None
            packb(edits)
            ns.changed_subtrees(live, prev)
            got.setdefault("restore in place (edits, tree in memory)", []).append(time.perf_counter() - t0)
            prev = live
        store_dir.cleanup()
        b = prev
        for p in rng.sample(picks, k):
            f = ns.must_get(b, p)
            assert isinstance(f, ns.File)
            b = ns.replace(b, p, ns.File(f.size + 2, f.mtime + 2, f.mode, f.chunks), f.mtime + 2)
        db = merkle.digest(b, version)
        for _ in range(rounds):
            t0 = time.perf_counter()
            diff_nodes(merkle.DirRef(merkle.digest(prev, version), prev), version, merkle.DirRef(db, b), version)
            got.setdefault("diff of two trees", []).append(time.perf_counter() - t0)
        ex = {"files": n, "changed": k}
        for key, vals in got.items():
            unit = "B" if key.startswith("bytes") else "s"
            name = (f"{key} after {k} changed, {human_n(n)} files (in process)" if key != "diff of two trees"
                    else f"diff of two trees {k} files apart, {human_n(n)} files (in process)")
            row = Row("incremental", name, unit, vals, extra=ex)
            if n >= 1_000_000:
                limit = {"build total": 0.020, "bytes shipped": 64 * 1024, "diff of two trees": 0.020,
                         "restore in place (blocks read back)": 0.050}.get(key)
                if limit is not None:
                    at_most(row, limit, "≤ 64 KiB" if unit == "B" else f"≤ {limit * 1e3:.0f} ms")
            rows.append(row)
    return rows
