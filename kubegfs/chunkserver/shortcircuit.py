"""The chunkserver's short-circuit socket: hands a local client the descriptor of a chunk file
(the wire format and the design are in kubegfs/shortcircuit.py; the client's side is
kubegfs/localread.py).

**Authentication.** A request carries the same bearer token as every other request; it is
compared with every role's token (``Tokens.roles_of``: ``hmac.compare_digest``) and must be a
role the chunk data path admits (``chunkserver_policy`` of a chunk GET: client or internal). A
refused request is answered with its error (401, 403, 404, 409, 400, 503 busy) and no
descriptor. The socket is created mode 0600 in a directory this process owns and nobody else
may write (created 0700; an existing one that another user owns, or that is group- or
world-writable, is not used and the socket stays off), so only this user can connect and nobody
else can put a socket of theirs in its place. The descriptor is opened ``O_RDONLY`` for a
handle the store knows (``ChunkStore.open_local``; the request names a handle, never a path),
at a version ≥ the one the request names.

**Consistency.** The descriptor and its (version, length, CRCs) are taken under the chunk's
lock from the chunk's durable metadata, so they describe one state of the file. What can change
a chunk file's bytes afterwards: an append writes past the length (the bytes granted do not
change; an append under a new version is a new grant, since the master names the new version);
``set_version`` changes metadata only; ``clone`` copies into another file; a retried or
abandoned write at the same version may rewrite bytes at or after the last committed length and
a restart after a crash truncates what was never made durable: the client checks every block
against the granted CRCs (and the file's size by its reads), so changed bytes fail that check
and the client reads that piece over TCP instead (a debug log line and ``ReadStats``), never
hands them out. ``delete`` unlinks the file; a descriptor already granted still reads the old
bytes, which are exactly the bytes of the (handle, version) the master named to the client:
handles are never reused and every mutation of a chunk's committed bytes comes with a new
version or a new handle (copy on write), so those bytes are the ones any replica would have
served when the read began. The client keeps a descriptor at most ``localread.TTL`` seconds, which
bounds how long a deleted chunk's disk space stays held.

**Bounded resources.** One request per connection; at most ``max_clients`` are served at a time
(more are answered 503 busy at once), each by a worker thread with a receive timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import metrics as M
from .. import shortcircuit as sc
from ..auth import Tokens, chunkserver_policy
from ..errors import CorruptData, Forbidden, KubegfsError, Unauthorized, Unavailable

log = logging.getLogger("kubegfs.chunkserver.shortcircuit")

MAX_CLIENTS = 16  # connections served at a time
RECV_TIMEOUT = 5.0  # a connection sends its request within this
MAX_PATH = 107  # sun_path's length on Linux, less its NUL

# (handle, min version) -> (fd, version, length, CRCs), the caller's to close (ChunkStore.open_local)
OpenLocal = Callable[[int, int], tuple[int, int, int, array]]


class SocketUnusable(Exception):
    """The socket's place is not safe or not possible (the chunkserver runs without it)."""


def prepare_dir(d: Path) -> None:
    """Create ``d`` mode 0700, or accept it if this user owns it and nobody else may write in it;
    SocketUnusable otherwise."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(d)
    except OSError as exc:
        raise SocketUnusable(f"cannot make {d}: {exc.strerror}") from exc
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SocketUnusable(f"{d} must be owned by this user and writable by nobody else")


class ShortCircuitServer:
    def __init__(self, path: Path, tokens: Tokens, cs_id: str, open_local: OpenLocal,
                 on_corrupt: Callable[[int], object], max_clients: int = MAX_CLIENTS) -> None:
        self.path = path
        self.tokens = tokens
        self.cs_id = cs_id
        self.open_local = open_local
        self.on_corrupt = on_corrupt
        self.slots = threading.BoundedSemaphore(max_clients)
        self._pool = ThreadPoolExecutor(max_workers=max_clients, thread_name_prefix="short-circuit")
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Listen (SocketUnusable if the path is too long or its directory is not safe)."""
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise SocketUnusable(f"{self.path} is longer than a Unix socket path may be ({MAX_PATH} bytes)")
        prepare_dir(self.path.parent)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()  # a previous run's
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.bind(os.fspath(self.path))  # (in a 0700 directory: nobody else can reach it before the chmod)
            os.chmod(self.path, 0o600)
            s.listen(64)
            s.settimeout(0.5)  # so stop() is noticed
        except OSError as exc:
            s.close()
            raise SocketUnusable(f"cannot listen on {self.path}: {exc.strerror}") from exc
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, name="short-circuit-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _accept_loop(self) -> None:
        s = self._sock
        assert s is not None
        while not self._stopping.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                self._stopping.wait(0.1)  # e.g. out of file descriptors: try again
                continue
            if not self.slots.acquire(blocking=False):
                self._refuse(conn, Unavailable("too many short-circuit clients at once; read over TCP"), "busy")
                conn.close()
                continue
            try:
                self._pool.submit(self._serve, conn)
            except RuntimeError:  # shut down meanwhile
                self.slots.release()
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(RECV_TIMEOUT)
            self.answer(conn, conn.recv(sc.MAX_REQUEST + 1))
        except OSError:
            pass
        finally:
            conn.close()
            self.slots.release()

    def answer(self, conn: socket.socket, raw: bytes) -> None:
        """Answer one request on ``conn``: the descriptor and its grant, or a refusal."""
        req: sc.Request | None = None
        try:
            req = sc.parse_request(raw)
            roles = self.tokens.roles_of(req.token)
            if not roles:
                raise Unauthorized("wrong token")
            if not roles & chunkserver_policy("GET", "/internal/chunks/x"):
                raise Forbidden("a metrics token may not read chunks")
            fd, version, length, crcs = self.open_local(req.handle, req.version)
        except KubegfsError as err:
            if isinstance(err, CorruptData) and req is not None:
                self.on_corrupt(req.handle)
            self._refuse(conn, err, err.code)
            return
        try:
            grant = sc.Grant(self.cs_id, req.handle, version, length, crcs)
            socket.send_fds(conn, [sc.encode_grant(grant)], [fd])
        finally:
            os.close(fd)
        M.CS_SHORT_CIRCUIT_GRANTS.inc()

    @staticmethod
    def _refuse(conn: socket.socket, err: KubegfsError, reason: str) -> None:
        M.CS_SHORT_CIRCUIT_REFUSALS.labels(reason).inc()
        log.debug("short-circuit request refused: %s", err.message)
        try:
            conn.settimeout(1.0)
            conn.send(sc.encode_refusal(err))
        except OSError:
            pass
