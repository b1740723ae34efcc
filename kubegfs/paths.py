"""Path normalisation and validation for the namespace (pure, no I/O).

``//a/./b/`` becomes ``/a/b``. ``..``, NUL and control characters, over-long names and paths
are rejected: the namespace never resolves ``..`` because a client-supplied path must not be able
to escape the subtree it names (and a snapshot or restore path must mean one thing).
"""

from __future__ import annotations

from .errors import InvalidArgument

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 256


def _bad_char(name: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)


def validate_name(name: str) -> str:
    """A single path component."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("empty name")
    if name in (".", ".."):
        raise InvalidArgument(f"name {name!r} is not allowed")
    if "/" in name:
        raise InvalidArgument(f"name {name!r} must not contain '/'")
    if "\x00" in name:
        raise InvalidArgument("name contains a NUL byte")
    if _bad_char(name):
        raise InvalidArgument(f"name {name!r} contains a control character")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"name longer than {MAX_NAME_BYTES} bytes")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument("name is not valid UTF-8") from exc
    return name


def split(path: str) -> tuple[str, ...]:
    """Normalise ``path`` and return its components (``()`` for the root)."""
    if not isinstance(path, str):
        raise InvalidArgument("path must be a string")
    if not path.startswith("/"):
        raise InvalidArgument(f"path {path!r} must be absolute (start with '/')")
    if "\x00" in path:
        raise InvalidArgument("path contains a NUL byte")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"path longer than {MAX_PATH_BYTES} bytes")
    parts = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            raise InvalidArgument(f"path {path!r} contains '..'")
        parts.append(validate_name(seg))
    if len(parts) > MAX_DEPTH:
        raise InvalidArgument(f"path deeper than {MAX_DEPTH} levels")
    return tuple(parts)


def normalize(path: str) -> str:
    return join(split(path))


def join(parts: tuple[str, ...] | list[str]) -> str:
    return "/" + "/".join(parts)


def is_within(child: tuple[str, ...], parent: tuple[str, ...]) -> bool:
    """True if ``child`` is ``parent`` or below it."""
    return child[: len(parent)] == parent
