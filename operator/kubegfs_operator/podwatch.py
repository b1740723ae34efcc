"""A minimal informer: the pods of one namespace that match a label selector, kept current by one
LIST and then a WATCH from the LIST's resourceVersion, readable from any thread.

A watch the server ends (its timeout) is resumed from the last resourceVersion seen (bookmarks
included); one that expired (410 Gone) or failed starts over with a new LIST, after a backoff on
failure. Between a failure and the next LIST, readers get the pods as last seen, as with any
controller's informer cache.

``apply_event`` (one watch event onto the pods) is pure; ``PodWatch`` does the API calls on its
own thread. Pods are kept as the API's JSON (no model objects: decoding into models costs more
than the call).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("kubegfs.operator")


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class WatchError(Exception):
    """The API server sent an ERROR event."""


def apply_event(pods: dict[str, dict[str, Any]], event: dict[str, Any]) -> str | None:
    """Apply one watch event to ``pods`` (name -> pod JSON) and return the resourceVersion to resume
    from (None when the event carries none). BOOKMARK events move the resourceVersion only."""
    kind = event.get("type")
    obj = event.get("object") or {}
    if kind == "ERROR":
        if obj.get("code") == 410:
            raise Expired(obj.get("message", "resourceVersion expired"))
        raise WatchError(f"{obj.get('reason', '')}: {obj.get('message', obj)}")
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if kind in ("ADDED", "MODIFIED") and name:
        pods[name] = obj
    elif kind == "DELETED" and name:
        pods.pop(name, None)
    rv = meta.get("resourceVersion")
    return str(rv) if rv else None


def raw_json(call: Any, *args: Any, **kw: Any) -> dict[str, Any]:
    """A kubernetes-client API call's answer as the API's JSON (``_preload_content=False``: no
    model objects, whose decoding costs more than the call)."""
    resp = call(*args, _preload_content=False, **kw)
    try:
        out: dict[str, Any] = json.loads(resp.data)
        return out
    finally:
        resp.release_conn()


def lines(resp: Any) -> Iterator[str]:
    """The newline-delimited JSON events of a streamed watch response."""
    buf = bytearray()
    for chunk in resp.stream(amt=None, decode_content=False):
        buf.extend(chunk if isinstance(chunk, bytes | bytearray) else str(chunk).encode())
        while (nl := buf.find(b"\n")) != -1:
            line = bytes(buf[:nl]).strip()
            del buf[: nl + 1]
            if line:
                yield line.decode()


class PodWatch:
    """The pods of ``namespace`` matching ``selector``, from ``core`` (a CoreV1Api)."""

    def __init__(self, core: Any, namespace: str, selector: str, timeout_seconds: int = 240,
                 backoff: tuple[float, float] = (0.5, 10.0)) -> None:
        self.namespace = namespace
        self._core, self._selector, self._timeout = core, selector, timeout_seconds
        self._backoff = backoff
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, Any]] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._resp: Any = None
        self.error: str | None = None  # the last failure, until the next LIST succeeds
        self._thread = threading.Thread(target=self._run, name=f"podwatch-{namespace}", daemon=True)

    def start(self) -> PodWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching: a read blocked on the stream ends at once (its socket is shut down; a
        close from another thread would not wake it). The thread is a daemon, never waited for."""
        self._stop.set()
        conn = getattr(self._resp, "connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_synced(self, timeout: float) -> bool:
        """True once the first LIST is in (then always)."""
        return self._synced.wait(timeout)

    def pods(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._pods.values())

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            try:
                rv = self._list()
                delay = self._backoff[0]
                while not self._stop.is_set():
                    rv = self._watch(rv)
            except Expired:
                continue  # list again at once
            except Exception as exc:  # noqa: BLE001 - any failure: list again after a backoff
                if self._stop.is_set():
                    return
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("watching the pods of namespace %s failed (%s); listing again in %.1fs",
                            self.namespace, self.error, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])

    def _list(self) -> str:
        listed = raw_json(self._core.list_namespaced_pod, self.namespace, label_selector=self._selector)
        pods = {p["metadata"]["name"]: p for p in listed.get("items") or []}
        with self._lock:
            self._pods = pods
        self.error = None
        self._synced.set()
        return str(listed["metadata"]["resourceVersion"])

    def _watch(self, rv: str) -> str:
        """One watch from ``rv`` until the server ends it; returns the resourceVersion reached."""
        self._resp = resp = self._core.list_namespaced_pod(
            self.namespace, label_selector=self._selector, watch=True, resource_version=rv,
            allow_watch_bookmarks=True, timeout_seconds=self._timeout, _preload_content=False,
            _request_timeout=(10, self._timeout + 30))
        try:
            for line in lines(resp):
                event = json.loads(line)
                with self._lock:
                    rv = apply_event(self._pods, event) or rv
        except BaseException:
            resp.close()  # left mid-stream: never back into the pool with unread events on it
            raise
        finally:
            self._resp = None
        resp.release_conn()
        return rv
