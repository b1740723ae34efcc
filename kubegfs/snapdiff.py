"""Snapshot diff over Merkle directory blocks: the HDFS ``snapshotDiff`` report.

Comparing two roots descends only into directories whose digests differ, level by level, so the
work is proportional to what changed (times the size of the directories it changed in). The walk
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

from .merkle import Block, DirRef, Entry, FileEntry

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


Steps = Generator[list[DirRef], list[Block], list[Change]]


def diff_steps(a: DirRef, b: DirRef) -> Steps:
    """The changes from tree ``a`` to tree ``b``. Yields the references whose blocks it needs
    (a batch per level), expects them back in the same order."""
    changes: list[Change] = []
    frontier: list[tuple[str, DirRef, DirRef]] = [(".", a, b)] if a.digest != b.digest else []
    while frontier:
        refs = [r for _p, x, y in frontier for r in (x, y)]
        blocks = yield refs
        if len(blocks) != len(refs):
            raise ValueError("diff: one block per reference expected")
        nxt: list[tuple[str, DirRef, DirRef]] = []
        for i, (path, x, y) in enumerate(frontier):
            ba, bb = blocks[2 * i], blocks[2 * i + 1]
            ea, eb = ba.entries, bb.entries
            if ba.mode != bb.mode or ba.mtime != bb.mtime or ea.keys() != eb.keys():
                changes.append(Change("M", path, "dir", old=x, new=y, mode=bb.mode, mtime=bb.mtime))
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
        frontier = nxt
    return _renames(changes)


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


def run(steps: Steps, load: Callable[[list[DirRef]], list[Block]]) -> list[Change]:
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
