"""Typed shapes of the hottest API bodies, shared by the master (master/http.py) and the client.

They are the JSON (or msgpack) objects as sent: plain dicts, typed for mypy only.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

SMALL_FILE = 64 * 1024  # ``POST /fs/create`` may carry this many bytes of ``data`` (one round trip)


class Stat(TypedDict):
    """``GET /fs/stat``, an entry of an ls page or of ``stat_many``."""

    path: str
    type: str  # "file" or "dir"
    mode: int
    mtime_ns: int
    size: NotRequired[int]  # files
    chunks: NotRequired[int]  # files
    entries: NotRequired[int]  # directories


class StatError(TypedDict):
    """A path ``stat_many`` could not look up."""

    path: str
    error: str
    message: str


class LsPage(TypedDict):
    """``GET /fs/ls``: a page of a directory; ``next`` is the ``after`` of the next page."""

    path: str
    entries: list[Stat]
    next: str | None


class SnapshotFields(TypedDict):
    """What a snapshot catalog entry and its API view have in common."""

    id: str
    name: str
    path: str
    created: str  # RFC 3339
    epoch: int
    state: str  # "pending", "ready" or "failed"
    copies: int
    targets: list[str]
    near: dict[str, Any]
    labels: dict[str, str]
    files: int
    dirs: int
    chunks: int
    logical_bytes: int
    record_bytes: int
    sha256: str
    holders: list[dict[str, Any]]
    error: str
    duration_seconds: float
    # set once the snapshot is ready
    location_reason: NotRequired[str]
    root: NotRequired[str]
    changes: NotRequired[dict[str, Any]]
    format: NotRequired[int]  # 2: one record; 3: Merkle directory blocks
    shipped_bytes: NotRequired[int]


class SnapshotInfo(SnapshotFields):
    """``GET /snapshots/{ref}`` and each of ``GET /snapshots``."""

    live_copies: int
