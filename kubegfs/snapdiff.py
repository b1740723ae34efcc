"""Snapshot diff over Merkle directory blocks: the HDFS ``snapshotDiff`` report.

Comparing two roots descends only into directories whose digests differ, level by level, and
within a big directory (split into sub-blocks, see merkle.py) only into the sub-blocks the two
sides do not share, so the work is proportional to what changed. The walk
is sans-I/O: :func:`diff_steps` yields the directory references it needs next (one batch per
level) and is sent their blocks, so the master can fetch them from chunkservers in batches and a
test can answer from memory.

Report entries, paths relative to the compared directory (``.`` is the directory itself):
``+`` created, ``-`` deleted, ``M`` modified (a file's content or metadata; a directory's own
mode/mtime or its list of entries), ``R`` renamed (a file deleted in one place and created in
another with the same metadata and chunks, or a directory with the same digest). Created and
deleted directories are reported once, not their contents (as HDFS does).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from .merkle import KIND_DIR, Block, DirRef, Entry, FileEntry
from .namespace import Dir, File, Node, changed_names

Kind = str  # "+", "-", "M", "R"


@dataclass(frozen=True)
class Change:
    kind: Kind
    path: str  # relative: "." or "./a/b"
    type: str  # "file" or "dir"
    to: str = ""  # R: the new path
    old: Entry | None = field(default=None, compare=False)  # the entry before (-, M, R)
    new: Entry | None = field(default=None, compare=False)  # the entry after (+, M, R)
    mode: int = field(default=-1, compare=False)  # M of a directory: its mode and mtime after
    mtime: int = field(default=-1, compare=False)

    def line(self) -> str:
        return f"R\t{self.path} -> {self.to}" if self.kind == "R" else f"{self.kind}\t{self.path}"

    def to_json(self) -> dict[str, str]:
        out = {"kind": self.kind, "path": self.path, "type": self.type}
        if self.to:
            out["to"] = self.to
        return out


def _join(base: str, name: str) -> str:
    return f"{base}/{name}"


def _type(e: Entry) -> str:
    return "dir" if isinstance(e, DirRef) else "file"


Steps = Generator[list[tuple[int, DirRef]], list[Block], list[Change]]


@dataclass
class _Side:
    """What is known of one side of a directory pair: its own mode/mtime (from its head), the
    entries of the blocks read so far, the sub-blocks still to read."""
    mode: int = -1
    mtime: int = -1
    entries: dict[str, Entry] = field(default_factory=dict)
    todo: list[DirRef] = field(default_factory=list)


def _read_pairs(pairs: list[tuple[DirRef, DirRef]]) -> Generator[list[tuple[int, DirRef]], list[Block],
                                                                list[tuple[_Side, _Side]]]:
    """Read both sides of each directory pair: the heads, then only the sub-blocks the two sides
    do not share (a sub-block on both sides holds the same entries on both, and no other block
    of either side holds those names), level by level. Returns, per pair, each side's mode,
    mtime and the entries of its unshared blocks."""
    sides = [(_Side(todo=[x]), _Side(todo=[y])) for x, y in pairs]
    while True:
        refs: list[tuple[int, DirRef]] = []
        where: list[_Side] = []
        for sa, sb in sides:
            shared = {r.digest for r in sa.todo} & {r.digest for r in sb.todo}
            for k, side in enumerate((sa, sb)):
                for r in side.todo:
                    if r.digest not in shared:
                        refs.append((k, r))
                        where.append(side)
                side.todo = []
        if not refs:
            return sides
        blocks = yield refs
        if len(blocks) != len(refs):
            raise ValueError("diff: one block per reference expected")
        for side, blk in zip(where, blocks, strict=True):
            if blk.kind == KIND_DIR:
                side.mode, side.mtime = blk.mode, blk.mtime
            side.entries.update(blk.entries)
            side.todo += [DirRef(p) for p in blk.parts]


def diff_steps(a: DirRef, b: DirRef) -> Steps:
    """The changes from tree ``a`` to tree ``b``. Yields the (side, reference) pairs whose blocks
    it needs (side 0: ``a``'s tree, 1: ``b``'s; a batch per level, directory heads and
    sub-blocks alike), expects the blocks back in the same order (a reference with a node may
    be answered with the node's whole block)."""
    changes: list[Change] = []
    frontier: list[tuple[str, DirRef, DirRef]] = [(".", a, b)] if a.digest != b.digest else []
    while frontier:
        # two directories held in memory are compared node by node (an unchanged entry is the
        # same object on both sides), without building their blocks
        mem = [f for f in frontier if f[1].node is not None and f[2].node is not None]
        frontier = [f for f in frontier if f[1].node is None or f[2].node is None]
        nxt_mem: list[tuple[str, DirRef, DirRef]] = []
        for path, x, y in mem:
            _compare_nodes(path, x, y, changes, nxt_mem)
        if not frontier:
            frontier = nxt_mem
            continue
        read = yield from _read_pairs([(x, y) for _p, x, y in frontier])
        nxt: list[tuple[str, DirRef, DirRef]] = []
        for (path, x, y), (sa, sb) in zip(frontier, read, strict=True):
            ea, eb = sa.entries, sb.entries
            if sa.mode != sb.mode or sa.mtime != sb.mtime or ea.keys() != eb.keys():
                changes.append(Change("M", path, "dir", old=x, new=y, mode=sb.mode, mtime=sb.mtime))
            for name, old in ea.items():
                p = _join(path, name)
                new = eb.get(name)
                if new is None:
                    changes.append(Change("-", p, _type(old), old=old))
                elif isinstance(old, DirRef) and isinstance(new, DirRef):
                    if old.digest != new.digest:
                        nxt.append((p, old, new))
                elif isinstance(old, FileEntry) and isinstance(new, FileEntry):
                    if old != new:
                        changes.append(Change("M", p, "file", old=old, new=new))
                else:  # a file became a directory or the other way round
                    changes.append(Change("-", p, _type(old), old=old))
                    changes.append(Change("+", p, _type(new), new=new))
            for name, new in eb.items():
                if name not in ea:
                    changes.append(Change("+", _join(path, name), _type(new), new=new))
        frontier = nxt + nxt_mem
    return _renames(changes)


def _entry(node: Node) -> Entry:
    if isinstance(node, Dir):
        assert node.digest is not None  # digests are computed before a diff starts
        return DirRef(node.digest, node)
    assert isinstance(node, File)
    return FileEntry(node.size, node.mtime, node.mode, node.chunks, ())


def _compare_nodes(path: str, x: DirRef, y: DirRef, changes: list[Change],
                   nxt: list[tuple[str, DirRef, DirRef]]) -> None:
    """One level of the diff between two in-memory directories (same rules as for blocks; file
    versions are not compared: in one master a chunk's version moves only with its file). An
    unchanged entry is the same object on both sides, or (where one directory is known to be
    the other but for some names, see namespace.changed_names) outside those names; only the
    names that differ are put in order."""
    a, b = x.node, y.node
    assert a is not None and b is not None
    ca, cb = a.children, b.children
    hint = changed_names(a, b)
    if hint is None:
        differ = [n for n, old in ca.items() if cb.get(n) is not old]
        differ += [n for n in cb.keys() if n not in ca]
    else:
        differ = [n for n in hint if ca.get(n) is not cb.get(n)]
    if a.mode != b.mode or a.mtime != b.mtime or any((n in ca) != (n in cb) for n in differ):
        changes.append(Change("M", path, "dir", old=x, new=y, mode=b.mode, mtime=b.mtime))
    for name in sorted(differ):
        old, new = ca.get(name), cb.get(name)
        p = _join(path, name)
        if new is None:
            assert old is not None
            changes.append(Change("-", p, "dir" if isinstance(old, Dir) else "file", old=_entry(old)))
        elif old is None:
            changes.append(Change("+", p, "dir" if isinstance(new, Dir) else "file", new=_entry(new)))
        elif isinstance(old, Dir) and isinstance(new, Dir):
            if old.digest != new.digest:
                nxt.append((p, DirRef(old.digest or b"", old), DirRef(new.digest or b"", new)))
        elif isinstance(old, File) and isinstance(new, File):
            if (old.size, old.mtime, old.mode, old.chunks) != (new.size, new.mtime, new.mode, new.chunks):
                changes.append(Change("M", p, "file", old=_entry(old), new=_entry(new)))
        else:
            changes.append(Change("-", p, "dir" if isinstance(old, Dir) else "file", old=_entry(old)))
            changes.append(Change("+", p, "dir" if isinstance(new, Dir) else "file", new=_entry(new)))


def _rename_key(e: Entry | None) -> object:
    if isinstance(e, DirRef):
        return ("d", e.digest)
    if isinstance(e, FileEntry) and e.chunks:
        return ("f", e)
    return None  # an empty file is not told apart from any other: no rename


def _renames(changes: list[Change]) -> list[Change]:
    """Pair each deletion with a creation of the same content (a rename), in path order."""
    created: dict[object, list[int]] = {}
    for i, c in enumerate(changes):
        k = _rename_key(c.new) if c.kind == "+" else None
        if k is not None:
            created.setdefault(k, []).append(i)
    pair: dict[int, int] = {}  # deletion index -> creation index
    for i, c in enumerate(changes):
        k = _rename_key(c.old) if c.kind == "-" else None
        if k is not None and created.get(k):
            pair[i] = created[k].pop(0)
    taken = set(pair.values())
    out: list[Change] = []
    for i, c in enumerate(changes):
        if i in pair:
            n = changes[pair[i]]
            out.append(Change("R", c.path, c.type, to=n.path, old=c.old, new=n.new))
        elif i not in taken:
            out.append(c)
    return sorted(out, key=lambda c: (c.path, c.kind))


def run(steps: Steps, load: Callable[[list[tuple[int, DirRef]]], list[Block]]) -> list[Change]:
    """Drive ``steps`` with a synchronous batch loader."""
    try:
        refs = next(steps)
        while True:
            refs = steps.send(load(refs))
    except StopIteration as stop:
        result: list[Change] = stop.value
        return result


@dataclass
class Summary:
    created: int = 0
    deleted: int = 0
    modified: int = 0
    renamed: int = 0

    def to_json(self) -> dict[str, int]:
        return {"created": self.created, "deleted": self.deleted, "modified": self.modified,
                "renamed": self.renamed}


def summarize(changes: list[Change]) -> Summary:
    s = Summary()
    for c in changes:
        if c.kind == "+":
            s.created += 1
        elif c.kind == "-":
            s.deleted += 1
        elif c.kind == "M":
            s.modified += 1
        else:
            s.renamed += 1
    return s
