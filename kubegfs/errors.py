"""Errors that cross the wire: each has an HTTP status and a stable machine-readable code."""

from __future__ import annotations

from typing import Any


class KubegfsError(Exception):
    """Base error. ``status`` is the HTTP status the servers answer with; ``code`` is stable."""

    status = 500
    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidArgument(KubegfsError):
    status = 400
    code = "invalid_argument"


class Unauthorized(KubegfsError):
    status = 401
    code = "unauthorized"


class Forbidden(KubegfsError):
    status = 403
    code = "forbidden"


class NotFound(KubegfsError):
    status = 404
    code = "not_found"


class AlreadyExists(KubegfsError):
    status = 409
    code = "already_exists"


class Conflict(KubegfsError):
    status = 409
    code = "conflict"


class ClusterMismatch(Conflict):
    """Master and chunkserver belong to different clusters (see master/identity.py)."""

    code = "cluster_mismatch"


class PayloadTooLarge(KubegfsError):
    status = 413
    code = "payload_too_large"


class Unavailable(KubegfsError):
    status = 503
    code = "unavailable"


class CorruptData(KubegfsError):
    """A checksum did not match: the data on this replica (or this record copy) is bad."""

    status = 502
    code = "corrupt"


class NoSpace(KubegfsError):
    status = 507
    code = "no_space"


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument, Unauthorized, Forbidden, NotFound, AlreadyExists, Conflict, ClusterMismatch,
        PayloadTooLarge, Unavailable, CorruptData, NoSpace, KubegfsError,
    )
}


def from_json(status: int, body: Any) -> KubegfsError:
    """Rebuild an error from a server's JSON answer (used by the clients)."""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        cls = _BY_CODE.get(str(body.get("error")), KubegfsError)
        err = cls(body["message"], **(body.get("details") or {}))
        err.status = status
        return err
    err = KubegfsError(f"HTTP {status}: {str(body)[:200]}")
    err.status = status
    return err
