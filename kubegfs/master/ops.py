"""The op records of the master's state machine (state.py), one TypedDict per op kind, and the
snapshot catalog entries they make.

An op is a plain dict on the wire and in the operation log (msgpack; its key order is what the
constructors below write, so a record's bytes stay the same). Keys starting with ``_`` are hints
the server computed for the in-memory apply; the log never stores them (oplog.enqueue drops them),
so a replay works without them. ``NotRequired`` keys are optional or absent in older logs.
``seq`` is stamped by the log just before the apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

from ..wire import SnapshotFields

if TYPE_CHECKING:
    from ..namespace import Dir
    from ..snapobj import ParsedRecord


class _Stamped(TypedDict, total=False):
    seq: int


class Init(_Stamped):
    op: Literal["init"]
    chunk_size: int
    replication: int


class Incarnation(_Stamped):
    op: Literal["incarnation"]
    n: int


class Mkdir(_Stamped):
    op: Literal["mkdir"]
    path: str
    parents: bool
    mode: int
    mtime: int


class Rm(_Stamped):
    op: Literal["rm"]
    path: str
    mtime: int


class Mv(_Stamped):
    op: Literal["mv"]
    src: str
    dst: str
    mtime: int


class Commit(_Stamped):
    op: Literal["commit"]
    path: str
    size: int
    chunks: list[int]
    new: NotRequired[list[list[int]]]  # [handle, version] of chunks born with this write
    mode: int
    mtime: int


class Bump(_Stamped):
    op: Literal["bump"]
    h: int
    v: int
    path: NotRequired[str]


class Cow(_Stamped):
    op: Literal["cow"]
    path: str
    index: int
    old: int
    new: int


class SnapCapture(_Stamped):
    op: Literal["snap_capture"]
    id: str
    name: str
    path: str
    created: int
    copies: int
    targets: NotRequired[list[str]]
    near: NotRequired[dict[str, Any]]
    labels: NotRequired[dict[str, str]]


class SnapCommit(_Stamped):
    op: Literal["snap_commit"]
    id: str
    sha256: str
    record_bytes: int
    holders: list[dict[str, Any]]
    files: int
    dirs: int
    chunks: int
    logical_bytes: int
    duration_seconds: float
    location_reason: NotRequired[str]
    root: NotRequired[str]  # format 3: the root block's digest (hex)
    changes: NotRequired[dict[str, Any]]
    shipped_bytes: NotRequired[int]
    blocks: NotRequired[list[list[bytes]] | bytes]  # format 3: the blocks not counted yet (state.encode_block_infos(_z))
    handles_z: NotRequired[bytes]  # format 2: the record's chunk handles
    _precounted: NotRequired[bool]
    _infos: NotRequired[Any]  # in memory only: ``blocks`` before encoding (dict[bytes, merkle.BlockInfo])
    _plan: NotRequired[Any]  # in memory only: their counting worked out ahead (state.RefPlan)


class SnapFail(_Stamped):
    op: Literal["snap_fail"]
    id: str
    error: str


class SnapAdopt(_Stamped):
    op: Literal["snap_adopt"]
    id: str
    name: str
    path: str
    created: int
    epoch: NotRequired[int]
    sha256: str
    record_bytes: int
    holders: list[dict[str, Any]]
    files: int
    dirs: int
    logical_bytes: int
    handles_z: bytes
    versions: bytes
    root: NotRequired[str]
    blocks: NotRequired[list[list[bytes]]]


class SnapHolders(_Stamped):
    op: Literal["snap_holders"]
    id: str
    holders: list[dict[str, Any]]


class SnapDelete(_Stamped):
    op: Literal["snap_delete"]
    id: str


class Restore(_Stamped):
    op: Literal["restore"]
    id: str
    path: str
    mode: str  # "inplace" or "new"
    mtime: int
    rid: str | None
    summary: dict[str, Any]
    blob: NotRequired[bytes]  # format 2: the whole record
    _parsed: NotRequired[ParsedRecord]
    format: NotRequired[int]
    root: NotRequired[str]  # format 3: the root block's digest (hex)
    source_path: NotRequired[str]
    blocks: NotRequired[bytes]  # format 3: the framed blocks the live tree lacks
    counts: NotRequired[dict[str, int]]
    edits: NotRequired[list[list[Any]]]  # format 4: the edits that turn the live tree into the snapshot's
    _tree: NotRequired[Dir]


Op = (
    Init | Incarnation | Mkdir | Rm | Mv | Commit | Bump | Cow | SnapCapture | SnapCommit | SnapFail
    | SnapAdopt | SnapHolders | SnapDelete | Restore
)

class SnapshotEntry(SnapshotFields):
    """A snapshot catalog entry (``MasterState.snapshots``), made by ``snap_capture`` or
    ``snap_adopt`` and completed by ``snap_commit``/``snap_fail``; checkpoints store it as it is,
    and the API shows it (``wire.SnapshotInfo``) without ``handles_z`` and ``created_ns``."""

    created_ns: int
    handles_z: NotRequired[bytes]  # format 2 (and adopted): the record's chunk handles

# op kind -> its record type; state.py's apply registry has exactly these keys
KINDS: dict[str, type] = {
    "init": Init, "incarnation": Incarnation, "mkdir": Mkdir, "rm": Rm, "mv": Mv, "commit": Commit,
    "bump": Bump, "cow": Cow, "snap_capture": SnapCapture, "snap_commit": SnapCommit,
    "snap_fail": SnapFail, "snap_adopt": SnapAdopt, "snap_holders": SnapHolders,
    "snap_delete": SnapDelete, "restore": Restore,
}
