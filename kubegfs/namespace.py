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

    __slots__ = ("children", "mtime", "mode", "digest", "stats", "base", "changed", "delta", "far")

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
        # the same against an older version, kept across digests (each adds its ``delta``'s
        # names) from the last version a snapshot's build shipped (marked with no names, see
        # merkle.mark_shipped), so that a walk for what a holder of that snapshot lacks visits
        # only those names even when ``delta``'s is a version digested ahead that no holder
        # has; None: unknown
        self.far: tuple[bytes, frozenset[str]] | None = None

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


def _changed_since(y: Dir, x: Dir) -> frozenset[str] | None:
    """Names whose entries may differ between ``y`` and ``x`` if ``y`` is known to be ``x``'s
    content plus changes to them: through its ``delta`` (once digested) or its ``base`` and
    ``changed`` (until then), each slot read once (a digest pass may clear them meanwhile)."""
    got = None
    dl = y.delta
    if dl is not None and x.digest is not None and dl[0] == x.digest:
        got = dl[1]
    base, changed = y.base, y.changed
    if base is not None and changed is not None and (base is x or (base.digest is not None and base.digest == x.digest)) \
            and (got is None or len(changed) < len(got)):
        got = changed
    return got


def changed_names(a: Dir, b: Dir) -> frozenset[str] | None:
    """The names whose entries may differ between ``a`` and ``b`` when one is known to be a
    directory with the other's content plus changes to those names (``Dir.delta``, or
    ``Dir.base`` and ``Dir.changed``; a digest names the entries' content), else None (compare
    every name). Any name outside the set has equal entries on both sides."""
    one, two = _changed_since(b, a), _changed_since(a, b)
    if one is None or (two is not None and len(two) < len(one)):
        return two
    return one


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


# A restore's edit of a live directory tree (msgpack-able lists, paths relative to its root):
# ["d", parts, mode, mtime] a directory's own mode and mtime; ["f", parts, size, mtime, mode,
# chunks] a file put at ``parts``; ["x", parts] the entry at ``parts`` removed.
Edit = list[object]
MAX_EDITS = 10_000  # beyond, a restore goes by blocks (an op of edits grows with them)


def edits_to(live: Dir, target: Dir) -> list[Edit] | None:
    """The edits that turn ``live`` into a tree with ``target``'s content (see
    :func:`apply_edits`), found where the two differ (identical nodes and equal digests are
    skipped, directories compared by :func:`changed_names` where known); None when a directory
    of ``target`` has none at its place in ``live`` (the edits would have to carry its whole
    tree) or there are more than MAX_EDITS."""
    out: list[Edit] = []
    stack: list[tuple[tuple[str, ...], Dir, Dir]] = [((), live, target)]
    while stack:
        parts, lv, tg = stack.pop()
        if lv is tg or (lv.digest is not None and lv.digest == tg.digest):
            continue
        if (lv.mode, lv.mtime) != (tg.mode, tg.mtime):
            out.append(["d", list(parts), tg.mode, tg.mtime])
        names = changed_names(lv, tg)
        lch, tch = lv.children, tg.children
        for name in sorted(_union(lv, tg) if names is None else names):
            a, b = lch.get(name), tch.get(name)
            if a is b:
                continue
            path = (*parts, name)
            if isinstance(b, Dir):
                if not isinstance(a, Dir):
                    return None
                stack.append((path, a, b))
            elif b is None:
                out.append(["x", list(path)])
            elif not (isinstance(a, File) and (a.size, a.mtime, a.mode, a.chunks) == (b.size, b.mtime, b.mode, b.chunks)):
                out.append(["f", list(path), b.size, b.mtime, b.mode, list(b.chunks)])
        if len(out) > MAX_EDITS:
            return None
    return out


def apply_edits(live: Dir, edits: list[Edit]) -> Dir:
    """``live`` with ``edits`` (see :func:`edits_to`) made; only the directories on their paths
    are copied. A path through something that is not a directory is a bad edit (InvalidArgument)."""
    meta: dict[tuple[str, ...], tuple[int, int]] = {}
    below: dict[tuple[str, ...], dict[str, Node | None]] = {}  # a directory's entries set or removed
    kids: dict[tuple[str, ...], set[str]] = {}  # a directory's subdirectories with edits in them
    for e in edits:
        kind, raw = e[0], e[1]
        if not (isinstance(raw, list) and all(isinstance(p, str) for p in raw)):
            raise InvalidArgument(f"bad restore edit {e[:2]!r}")
        parts: tuple[str, ...] = tuple(raw)
        nums = [x for x in e[2:] if isinstance(x, int)]
        if kind == "d" and len(nums) == len(e) - 2 == 2:
            meta[parts] = (nums[0], nums[1])
        elif kind == "f" and parts and len(nums) == 3 and len(e) == 6 and isinstance(e[5], list):
            below.setdefault(parts[:-1], {})[parts[-1]] = File(nums[0], nums[1], nums[2], tuple(e[5]))
            parts = parts[:-1]
        elif kind == "x" and parts and len(e) == 2:
            below.setdefault(parts[:-1], {})[parts[-1]] = None
            parts = parts[:-1]
        else:
            raise InvalidArgument(f"bad restore edit {e[:2]!r}")
        for i in range(len(parts)):
            kids.setdefault(parts[:i], set()).add(parts[i])

    def rebuild(d: Dir, parts: tuple[str, ...]) -> Dir:
        m = d.children.mutate()
        for name, node in below.get(parts, {}).items():
            if node is None:
                if name in m:
                    del m[name]
            else:
                m[name] = node
        for name in kids.get(parts, ()):
            sub = d.children.get(name)
            if not isinstance(sub, Dir):
                raise InvalidArgument("a restore edit goes through a non-directory: /" + "/".join((*parts, name)))
            m[name] = rebuild(sub, (*parts, name))
        mode, mtime = meta.get(parts, (d.mode, d.mtime))
        return Dir(m.finish(), mtime, mode)

    return rebuild(live, ())


def _union(a: Dir, b: Dir) -> list[str]:
    names = list(a.children.keys())
    names.extend(n for n in b.children.keys() if n not in a.children)
    return names


def check_move(src: tuple[str, ...], dst: tuple[str, ...]) -> None:
    if not src:
        raise InvalidArgument("cannot move the root")
    if dst[: len(src)] == src:
        raise Conflict("cannot move a directory into itself")
