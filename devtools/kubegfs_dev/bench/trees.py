"""Synthetic directory trees built straight from namespace nodes (no per-file ops), a master
state holding them, and the seed's plain-dict metadata of a tree."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import immutables

from kubegfs import namespace as ns
from kubegfs.master.state import MasterState, now_ns

from .report import MiB

CHUNK_SIZE = 64 * MiB
FILES_PER_DIR = 250


@dataclass
class Tree:
    """A synthetic directory of ``files`` files (nested, realistic names, random sizes)."""

    files: int
    root: ns.Dir
    first: int  # first chunk handle; handles are first .. first + chunks - 1
    chunks: int
    dirs: int
    sample_files: list[str]  # a few file paths relative to the tree root


def _leaf_path(i: int) -> tuple[str, ...]:
    q, kind = divmod(i, 3)
    if kind == 0:
        return ("logs", str(2020 + q // 336), f"{(q // 28) % 12 + 1:02d}", f"{q % 28 + 1:02d}")
    if kind == 1:
        return ("data", f"team-{q % 16:02d}", f"dataset-{(q // 16) % 64:02d}",
                f"dt=2026-{(q // 1024) % 12 + 1:02d}-{(q // 12288) + 1:02d}")
    return ("home", f"user{q % 100:03d}", "projects", f"proj-{q // 100}", "src")


def _file_name(kind: int, j: int, r: int) -> str:
    if kind == 0:
        return f"app-{r:08x}-{j:04d}.log"
    if kind == 1:
        return f"part-{j:05d}-{r:08x}{r ^ 0x5bd1e995:08x}.snappy.parquet"
    return f"module_{r & 0xFFFFFF:06x}_{j}.py"


def make_tree(files: int, first_handle: int, seed: int = 7, chunk_size: int = CHUNK_SIZE) -> Tree:
    """Build the tree directly from Dir/File nodes and immutables.Map (no per-file ops)."""
    rng = random.Random(seed)
    mtime = now_ns()
    nested: dict[str, Any] = {}
    h = first_handle
    left = files
    leaf = 0
    samples: list[str] = []
    lognorm = rng.lognormvariate
    bits = rng.getrandbits
    while left > 0:
        k = min(FILES_PER_DIR, left)
        path = _leaf_path(leaf)
        kind = leaf % 3
        pairs = []
        for j in range(k):
            size = min(int(lognorm(11.0, 2.5)), 1 << 40)  # median ~60 KB, a long tail of big files
            n = -(-size // chunk_size)
            pairs.append((_file_name(kind, j, bits(32)),
                          ns.File(size, mtime - bits(30), 0o644, tuple(range(h, h + n)))))
            h += n
        if len(samples) < 4096:
            samples.append("/".join((*path, pairs[leaf % k][0])))
        d = nested
        for part in path[:-1]:
            d = d.setdefault(part, {})
        d[path[-1]] = immutables.Map(pairs)
        left -= k
        leaf += 1
    dirs = 0

    def build(d: dict[str, Any] | immutables.Map[str, ns.Node]) -> ns.Dir:
        nonlocal dirs
        dirs += 1
        if isinstance(d, immutables.Map):
            return ns.Dir(d, mtime)
        return ns.Dir(immutables.Map({k: build(v) for k, v in d.items()}), mtime)

    root = build(nested)
    return Tree(files, root, first_handle, h - first_handle, dirs, samples)


def make_trees(sizes: list[int]) -> dict[int, Tree]:
    """Trees with disjoint handle ranges (incarnation 1), so they can share one master."""
    out: dict[int, Tree] = {}
    nxt = (1 << 32) | 1
    for i, n in enumerate(sizes):
        t = make_tree(n, nxt, seed=1000 + i)
        out[n] = t
        nxt += t.chunks
    return out


def state_with(trees: dict[int, Tree]) -> MasterState:
    st = MasterState(CHUNK_SIZE, 3)
    st.incarnation = 1
    st.root = ns.Dir(immutables.Map({f"t{n}": t.root for n, t in trees.items()}), now_ns())
    for t in trees.values():
        rng = range(t.first, t.first + t.chunks)
        st.version.update(dict.fromkeys(rng, 1))
        st.born.update(dict.fromkeys(rng, 1))
        st.live.update(dict.fromkeys(rng, 1))
        st.next_counter = max(st.next_counter, (t.first + t.chunks) & 0xFFFFFFFF)
    st.seq = 1
    return st


def seed_metadata(node: ns.Node, version: dict[int, int]) -> dict[str, Any]:
    """The seed's plain dict/list metadata tree for ``node``."""
    if isinstance(node, ns.File):
        return {"type": "file", "size": node.size, "mtime": node.mtime, "mode": node.mode,
                "chunks": [[h, version.get(h, 1)] for h in node.chunks]}
    return {"type": "dir", "mtime": node.mtime, "mode": node.mode,
            "children": {k: seed_metadata(v, version) for k, v in node.children.items()}}
