"""The master's namespace as a persistent (immutable, structurally shared) tree.

Every mutation copies only the directories on the path from the root to the change
(O(depth · log32 fan-out) with a HAMT per directory), so pinning a point-in-time view of any
subtree (a snapshot, a checkpoint) is O(1): keep a reference to the current root. This is the
"copy-on-write of directory nodes" HDFS uses for snapshots, without per-node diff lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import final

import immutables

from .errors import AlreadyExists, Conflict, InvalidArgument, NotFound

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


@final
class File:
    """Immutable file metadata. ``chunks`` are chunk handles in file order."""

    __slots__ = ("size", "mtime", "mode", "chunks")

    def __init__(self, size: int, mtime: int, mode: int, chunks: tuple[int, ...]) -> None:
        self.size = size
        self.mtime = mtime  # ns since the epoch
        self.mode = mode
        self.chunks = chunks

    def __repr__(self) -> str:
        return f"File(size={self.size}, chunks={len(self.chunks)})"


@final
class Dir:
    """Immutable directory: ``children`` maps a name to a File or Dir. ``digest`` is its Merkle
    block digest once computed (``merkle.digest`` memoises it; the node never changes)."""

    __slots__ = ("children", "mtime", "mode", "digest", "stats", "base", "changed", "delta")

    def __init__(self, children: immutables.Map[str, Node], mtime: int, mode: int = DEFAULT_DIR_MODE) -> None:
        self.children = children
        self.mtime = mtime
        self.mode = mode
        self.digest: bytes | None = None
        self.stats: tuple[int, int, int, int] | None = None  # (files, dirs, chunk refs, bytes), with digest
        # until its digest is computed: an earlier version of this directory whose digest was
        # (``base``) and the names whose entries may differ from it, so that only the blocks
        # holding those are encoded again (see merkle); None: not derived, or too many changes
        self.base: Dir | None = None
        self.changed: frozenset[str] | None = None
        # once its digest is known: the digest of a directory it differs from only in the
        # entries of these names (its base, or the live directory a restore edited), so two
        # directories one of which is the other plus a few changes are compared by those names
        # alone (see changed_names); None: unknown
        self.delta: tuple[bytes, frozenset[str]] | None = None

    def __repr__(self) -> str:
        return f"Dir({len(self.children)} entries)"


Node = File | Dir
EMPTY: immutables.Map[str, Node] = immutables.Map()


def empty_root(mtime: int = 0) -> Dir:
    return Dir(EMPTY, mtime)


def get(root: Dir, parts: tuple[str, ...]) -> Node | None:
    node: Node = root
    for name in parts:
        if not isinstance(node, Dir):
            return None
        nxt = node.children.get(name)
        if nxt is None:
            return None
        node = nxt
    return node


def must_get(root: Dir, parts: tuple[str, ...]) -> Node:
    node = get(root, parts)
    if node is None:
        raise NotFound("no such file or directory: /" + "/".join(parts))
    return node


def must_dir(root: Dir, parts: tuple[str, ...]) -> Dir:
    node = must_get(root, parts)
    if not isinstance(node, Dir):
        raise InvalidArgument("not a directory: /" + "/".join(parts))
    return node


def _parent_chain(root: Dir, parts: tuple[str, ...]) -> list[Dir]:
    """Directories root, /p0, /p0/p1, ... up to the parent of ``parts``."""
    chain = [root]
    node: Node = root
    for i, name in enumerate(parts[:-1]):
        assert isinstance(node, Dir)
        nxt = node.children.get(name)
        if nxt is None:
            raise NotFound("no such directory: /" + "/".join(parts[: i + 1]))
        if not isinstance(nxt, Dir):
            raise InvalidArgument("not a directory: /" + "/".join(parts[: i + 1]))
        chain.append(nxt)
        node = nxt
    return chain


def replace(root: Dir, parts: tuple[str, ...], node: Node | None, mtime: int) -> Dir:
    """A new root in which ``parts`` is ``node`` (``None`` removes it). The parent must exist.
    Only the directories on the path are copied; the changed parent's mtime becomes ``mtime``."""
    if not parts:
        if not isinstance(node, Dir):
            raise InvalidArgument("the root must stay a directory")
        return node
    chain = _parent_chain(root, parts)
    parent = chain[-1]
    if node is None:
        children = parent.children.delete(parts[-1])
    else:
        children = parent.children.set(parts[-1], node)
    new: Dir = Dir(children, mtime, parent.mode)
    _derive(new, parent, parts[-1])
    for depth in range(len(chain) - 2, -1, -1):
        d = chain[depth]
        up = Dir(d.children.set(parts[depth], new), d.mtime, d.mode)
        _derive(up, d, parts[depth])
        new = up
    return new


MAX_CHANGED = 64  # names tracked per derived directory; beyond, its blocks are all encoded again


def _derive(new: Dir, old: Dir, name: str) -> None:
    """``new`` is ``old`` with entry ``name`` changed: remember the last version of it whose
    digest was computed and what changed since (undigested versions in between are skipped, so
    a directory keeps at most one older version alive)."""
    # each slot read once: a digest pass in a worker thread may be clearing ``old``'s meanwhile
    base, changed = old.base, old.changed
    if old.digest is not None:
        new.base, new.changed = old, frozenset((name,))
    elif base is not None and changed is not None and len(changed) < MAX_CHANGED:
        new.base, new.changed = base, changed | {name}


def mkdir(root: Dir, parts: tuple[str, ...], mtime: int, mode: int, parents: bool) -> Dir:
    if not parts:
        if parents:
            return root
        raise AlreadyExists("/ already exists")
    existing = get(root, parts)
    if existing is not None:
        if isinstance(existing, Dir) and parents:
            return root
        raise AlreadyExists("already exists: /" + "/".join(parts))
    if parents:
        for i in range(1, len(parts)):
            sub = parts[:i]
            cur = get(root, sub)
            if cur is None:
                root = replace(root, sub, Dir(EMPTY, mtime, mode), mtime)
            elif not isinstance(cur, Dir):
                raise InvalidArgument("not a directory: /" + "/".join(sub))
    return replace(root, parts, Dir(EMPTY, mtime, mode), mtime)


def walk(node: Node, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Node]]:
    """Pre-order walk, children in name order (deterministic)."""
    yield prefix, node
    if isinstance(node, Dir):
        for name in sorted(node.children.keys()):
            yield from walk(node.children[name], prefix + (name,))


def iter_chunks(node: Node) -> Iterator[int]:
    """Every chunk handle referenced by the files below ``node`` (one per reference)."""
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, File):
            yield from n.chunks
        else:
            stack.extend(n.children.values())


def count(node: Node) -> tuple[int, int, int, int]:
    """(files, directories, chunk references, logical bytes) below and including ``node``."""
    files = dirs = chunks = size = 0
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, File):
            files += 1
            chunks += len(n.chunks)
            size += n.size
        else:
            dirs += 1
            stack.extend(n.children.values())
    return files, dirs, chunks, size


def changed_names(a: Dir, b: Dir) -> frozenset[str] | None:
    """The names whose entries may differ between ``a`` and ``b`` when one is known to be a
    directory with the other's digest plus changes to those names (``Dir.delta``; a digest names
    the entries' content), else None (compare every name). The same digest means the same
    entries, so any name outside the set has equal entries on both sides."""
    got = None
    bd, ad = b.delta, a.delta
    if bd is not None and a.digest is not None and bd[0] == a.digest:
        got = bd[1]
    if ad is not None and b.digest is not None and ad[0] == b.digest and (got is None or len(ad[1]) < len(got)):
        got = ad[1]
    return got


def changed_subtrees(old: Node | None, new: Node | None) -> tuple[list[Node], list[Node]]:
    """(subtrees only in ``new``, subtrees only in ``old``) when ``new`` replaces ``old``:
    identical nodes (the same object) are skipped, directories on both sides are compared by
    name (only by the names :func:`changed_names` gives when it knows them), so the work is
    proportional to what differs. An entry left out that way has equal content on both sides,
    so what the caller counts from the result comes out the same."""
    added: list[Node] = []
    removed: list[Node] = []
    stack: list[tuple[Node | None, Node | None]] = [(old, new)]
    while stack:
        a, b = stack.pop()
        if a is b:
            continue
        if isinstance(a, Dir) and isinstance(b, Dir):
            if a.digest is not None and a.digest == b.digest:  # the same entries
                continue
            names = changed_names(a, b)
            for name in (_union(a, b) if names is None else names):
                stack.append((a.children.get(name), b.children.get(name)))
            continue
        if a is not None:
            removed.append(a)
        if b is not None:
            added.append(b)
    return added, removed


def _union(a: Dir, b: Dir) -> list[str]:
    names = list(a.children.keys())
    names.extend(n for n in b.children.keys() if n not in a.children)
    return names


def check_move(src: tuple[str, ...], dst: tuple[str, ...]) -> None:
    if not src:
        raise InvalidArgument("cannot move the root")
    if dst[: len(src)] == src:
        raise Conflict("cannot move a directory into itself")
