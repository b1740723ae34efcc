"""A client's short-circuit local reads (kubegfs/shortcircuit.py has the design and the wire
format; the chunkserver's side is kubegfs/chunkserver/shortcircuit.py).

``LocalReads.read`` reads a piece of a chunk from a chunkserver on this host without TCP: it
asks the chunkserver's Unix socket for the chunk file's descriptor (once per chunk, kept in a
small LRU), ``os.preadv``s the whole 64 KiB blocks covering the piece into the caller's buffer
in 256 KiB slices and checks every block against the CRC the chunkserver granted as soon as its
slice is in (while it is in the CPU's cache), so no unverified byte is returned. Any failure
(the socket unreachable or not this chunkserver's, a refusal, a short file, a block whose CRC
does not match) raises, and the client reads that piece over TCP instead.

Trust: the socket's directory must be owned by the user the socket's peer runs as
(``SO_PEERCRED``) and writable by nobody else, so a process of another user cannot stand in for
the chunkserver (and be sent the token); the answer must name the replica the master named.

Bounded: at most ``size`` descriptors are held, each for at most ``ttl`` seconds (a descriptor
of a deleted chunk holds its disk space); one evicted while a read uses it is closed when that
read is done. Descriptors are closed by a thread of their own, never on a read's path: the last
close of a chunk file the chunkserver deleted meanwhile frees its pages and blocks in the
closing thread (15-25 ms per 64 MiB chunk here; a 1 GiB read that closed the descriptors of
the file it replaced took 0.5-0.9 s longer), work that the chunkserver's unlink does when no
descriptor is open. That thread also closes descriptors unused for ``ttl`` seconds.
"""

from __future__ import annotations

import os
import queue
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from . import rangecrc
from . import shortcircuit as sc
from .errors import CorruptData, Unavailable


class NotLocal(Unavailable):
    """The socket is not the named chunkserver's, or not to be trusted: not used again."""


CACHE = 64  # descriptors held (HDFS keeps 256 streams for 5 minutes; a descriptor of a deleted chunk holds its space)
TTL = 30.0  # seconds a descriptor is used before it is asked for again
SLICE = 256 * 1024  # read and checked at a time (4 blocks: they stay in the CPU's cache in between)
TIMEOUT = 5.0  # a grant's whole exchange


@dataclass
class _Held:
    grant: sc.Grant
    fd: int
    at: float
    users: int = 0
    dropped: bool = False
    key: tuple[str, int] = field(default=("", 0))


class LocalReads:
    def __init__(self, token: str, size: int = CACHE, ttl: float = TTL) -> None:
        self.token = token
        self.size = size
        self.ttl = ttl
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[str, int], _Held] = OrderedDict()  # by (socket path, handle)
        self.grants = 0  # descriptors asked for and received
        self._closing: queue.SimpleQueue[int] = queue.SimpleQueue()  # descriptors the closer closes
        self._closer: threading.Thread | None = None
        self._stop = False

    def read(self, path: str, cs_id: str, handle: int, version: int, off: int, n: int,
             into: bytearray | None = None) -> memoryview:
        """The ``n`` bytes at ``off`` of chunk ``handle`` (version ≥ ``version``) from the
        chunkserver ``cs_id`` whose socket is ``path``, every covering block checked; received
        into ``into`` when it is large enough. Raises KubegfsError or OSError on any failure."""
        held = self._take(path, cs_id, handle, version, off + n)
        try:
            return _read_checked(held.fd, held.grant, off, n, into)
        except CorruptData:
            self._drop(held)  # whatever changed, ask again next time
            raise
        finally:
            self._release(held)

    def close(self) -> None:
        """Close every descriptor not in use now (those in use: when their reads are done)."""
        with self._lock:
            self._stop = True
            for h in list(self._held.values()):
                self._evict(h)
        self.settle()

    def settle(self) -> None:
        """Close the descriptors waiting for the closer, in this thread."""
        while True:
            try:
                os.close(self._closing.get_nowait())
            except queue.Empty:
                return

    # ------------------------------------------------------------------ the cache

    def _take(self, path: str, cs_id: str, handle: int, version: int, end: int) -> _Held:
        key = (path, handle)
        now = time.monotonic()
        with self._lock:
            h = self._held.get(key)
            if h is not None:
                g = h.grant
                if g.cs_id == cs_id and g.version >= version and g.length >= end and now - h.at < self.ttl:
                    self._held.move_to_end(key)
                    h.users += 1
                    return h
                self._evict(h)
        grant, fd = ask(path, self.token, handle, version)
        if grant.cs_id != cs_id or grant.handle != handle or grant.version < version:
            os.close(fd)
            raise NotLocal(f"{path} answered for {grant.cs_id} chunk {grant.handle:016x} v{grant.version}, "
                              f"not {cs_id} chunk {handle:016x} v≥{version}")
        if grant.length < end:
            os.close(fd)
            raise CorruptData(f"{cs_id} holds {grant.length} bytes of chunk {handle:016x}, not {end}")
        h = _Held(grant, fd, now, users=1, key=key)
        with self._lock:
            self.grants += 1
            old = self._held.pop(key, None)
            if old is not None:
                self._evict(old)
            self._held[key] = h
            while len(self._held) > self.size:
                self._evict(next(iter(self._held.values())))
            self._ensure_closer()
        return h

    def _release(self, h: _Held) -> None:
        with self._lock:
            h.users -= 1
            if h.dropped and h.users == 0:
                self._close_later(h.fd)

    def _drop(self, h: _Held) -> None:
        with self._lock:
            if self._held.get(h.key) is h:
                self._evict(h)

    def _evict(self, h: _Held) -> None:
        """(lock held) Out of the cache; closed now, or by its last reader."""
        if self._held.get(h.key) is h:
            del self._held[h.key]
        if not h.dropped:
            h.dropped = True
            if h.users == 0:
                self._close_later(h.fd)

    def _close_later(self, fd: int) -> None:
        """(lock held)"""
        if self._stop:
            os.close(fd)
            return
        self._closing.put(fd)
        self._ensure_closer()

    def _ensure_closer(self) -> None:
        """(lock held) The closer runs while anything is held or waits to be closed."""
        if self._closer is None and not self._stop:
            self._closer = threading.Thread(target=self._close_loop, name="kubegfs-localread-closer", daemon=True)
            self._closer.start()

    def _close_loop(self) -> None:
        """Close what is queued; every ``ttl`` / 2 seconds, evict what was not used for ``ttl``;
        end once nothing is held or queued (started again when something is)."""
        period = max(0.05, self.ttl / 2)
        while True:
            try:
                os.close(self._closing.get(timeout=period))
                continue
            except queue.Empty:
                pass
            now = time.monotonic()
            with self._lock:
                for h in [h for h in self._held.values() if now - h.at >= self.ttl]:
                    self._evict(h)
                if self._stop or (not self._held and self._closing.empty()):
                    self._closer = None
                    break
        self.settle()


def ask(path: str, token: str, handle: int, version: int) -> tuple[sc.Grant, int]:
    """One request to the chunkserver's socket at ``path``: its grant and the descriptor (the
    caller's to close). Raises the refusal's KubegfsError, NotLocal for a socket that is not
    to be trusted, OSError when it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        trusted(path, s)
        s.sendall(sc.encode_request(sc.Request(token, handle, version)))
        raw, fds, _, _ = socket.recv_fds(s, sc.MAX_ANSWER, 2, socket.MSG_CMSG_CLOEXEC)
    try:
        grant = sc.parse_answer(raw)
        if len(fds) != 1:
            raise CorruptData(f"a short-circuit grant came with {len(fds)} descriptors")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return grant, fds[0]


def trusted(path: str, s: socket.socket) -> None:
    """NotLocal unless the socket's directory is owned by the user of the process at the
    other end of ``s`` and writable by nobody else."""
    _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    st = os.stat(os.path.dirname(path) or ".")
    if st.st_uid != uid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NotLocal(f"{path}: its directory is not the chunkserver's own (owner {st.st_uid}, peer {uid})")


def _read_checked(fd: int, g: sc.Grant, off: int, n: int, into: bytearray | None) -> memoryview:
    """The ``n`` bytes at ``off``: the covering blocks read in SLICEs, each block checked against
    the granted CRCs as its slice is in; CorruptData on a mismatch or a file shorter than granted."""
    first, count = rangecrc.covering(off, n, g.length)
    base, span = rangecrc.span(first, count, g.length)
    buf = into if into is not None and len(into) >= span else bytearray(span)
    view = memoryview(buf)[:span]
    check = rangecrc.Check(view, base, g.length, g.crcs[first : first + count])
    pos = 0
    while pos < span:
        got = os.preadv(fd, [view[pos : pos + min(SLICE, span - pos)]], base + pos)
        if got <= 0:
            raise CorruptData(f"chunk {g.handle:016x}'s file ends at {base + pos}, before {base + span}")
        pos += got
        check.arrived(pos)
    return rangecrc.cut(view, base, off, n)
