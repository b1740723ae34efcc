"""Short-circuit local reads without a server: the socket's wire format (kubegfs/shortcircuit.py),
the chunkserver's answer to a request (``ShortCircuitServer.answer`` on a socket pair, over a
real ChunkStore), the store's grant (``ChunkStore.open_local``) and the client's checked reads
and descriptor cache (kubegfs/localread.py)."""

import os
import socket
import stat
import threading
import time
from array import array

import msgpack
import pytest

from kubegfs import localread
from kubegfs import shortcircuit as sc
from kubegfs.auth import Tokens
from kubegfs.chunkserver.shortcircuit import ShortCircuitServer, SocketUnusable, prepare_dir
from kubegfs.chunkserver.store import ChunkStore
from kubegfs.crc import crc32
from kubegfs.errors import (
    Conflict,
    CorruptData,
    Forbidden,
    InvalidArgument,
    NotFound,
    Unauthorized,
    Unavailable,
)
from kubegfs.formats import BLOCK_SIZE

B = BLOCK_SIZE


def _crcs(data: bytes) -> array:
    return array("I", [crc32(data[i : i + B]) for i in range(0, len(data), B)])


# ----------------------------------------------------------------------------- wire format

def test_a_request_round_trips_and_anything_else_is_refused():
    r = sc.Request("tok", (1 << 64) - 1, 7)
    assert sc.parse_request(sc.encode_request(r)) == r
    bad = [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"token": "t", "handle": 1}),
           msgpack.packb({"token": "t", "handle": -1, "version": 0}),
           msgpack.packb({"token": "t", "handle": 1, "version": True}),
           msgpack.packb({"token": 5, "handle": 1, "version": 0}),
           msgpack.packb({"token": "t", "handle": 1, "version": 0, "path": "/etc/shadow"}),
           msgpack.packb({"token": "x" * 5000, "handle": 1, "version": 0})]
    for raw in bad:
        with pytest.raises(InvalidArgument):
            sc.parse_request(raw)


def test_a_grant_round_trips_with_its_crcs_in_order():
    crcs = array("I", [0, 1, 0xDEADBEEF, 0xFFFFFFFF])
    g = sc.Grant("cs-a", 42, 3, 3 * B + 5, crcs)
    got = sc.parse_answer(sc.encode_grant(g))
    assert got == g and list(got.crcs) == list(crcs)
    raw = msgpack.unpackb(sc.encode_grant(g))
    assert raw["crcs"][8:12] == bytes.fromhex("deadbeef")  # big-endian on the wire


def test_a_refusal_is_its_error_and_a_malformed_answer_is_corrupt():
    with pytest.raises(Unauthorized, match="wrong token"):
        sc.parse_answer(sc.encode_refusal(Unauthorized("wrong token")))
    with pytest.raises(Conflict):
        sc.parse_answer(sc.encode_refusal(Conflict("stale")))
    for raw in (b"", msgpack.packb({"ok": True, "id": "a", "handle": 1, "version": 1, "length": 1, "crcs": b"abc"}),
                msgpack.packb({"ok": True, "id": 3, "handle": 1, "version": 1, "length": 1, "crcs": b""}),
                msgpack.packb({"ok": "yes"}), msgpack.packb([True])):
        with pytest.raises(CorruptData):
            sc.parse_answer(raw)


def test_host_id_is_the_boot_and_host_name_or_the_environment(monkeypatch):
    monkeypatch.delenv(sc.HOST_ENV, raising=False)
    hid = sc.host_id()
    assert hid.endswith("/" + socket.gethostname()) and len(hid) > len(socket.gethostname()) + 30
    monkeypatch.setenv(sc.HOST_ENV, "node-7")
    assert sc.host_id() == "node-7"


# ----------------------------------------------------------------------------- the store's grant

@pytest.fixture
def store(tmp_path):
    return ChunkStore(tmp_path / "cs", 1 << 20)


def test_open_local_grants_a_read_only_descriptor_of_the_durable_state(store):
    data = os.urandom(2 * B + 100)
    store.write(1, 0, data, version=3)
    store.write(1, len(data), b"pending", version=3, sync=False)  # not durable: not in the grant
    fd, v, n, crcs = store.open_local(1, 2)
    try:
        assert (v, n, list(crcs)) == (3, len(data), list(_crcs(data)))
        assert os.pread(fd, n, 0) == data
        with pytest.raises(OSError):
            os.write(fd, b"x")  # O_RDONLY
    finally:
        os.close(fd)
    with pytest.raises(Conflict):
        store.open_local(1, 4)
    with pytest.raises(NotFound):
        store.open_local(2, 0)


def test_open_local_refuses_a_file_shorter_than_its_metadata(store):
    store.write(1, 0, os.urandom(B + 1), version=1)
    os.truncate(store._paths(1)[0], B)
    with pytest.raises(CorruptData):
        store.open_local(1, 0)
    assert 1 in store.corrupt


# ----------------------------------------------------------------------------- the server's answer

TOKENS = Tokens("client-tok", "internal-tok", "metrics-tok")


def _server(store):
    corrupt = []
    srv = ShortCircuitServer(store.root / "run" / "s.sock", TOKENS, "cs-1", store.open_local, corrupt.append)
    return srv, corrupt


def _exchange(srv, raw: bytes):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        srv.answer(a, raw)
        msg, fds, _, _ = socket.recv_fds(b, sc.MAX_ANSWER, 2)
    try:
        return sc.parse_answer(msg), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def test_the_server_grants_a_known_token_a_descriptor(store):
    data = os.urandom(B + 7)
    store.write(5, 0, data, version=2)
    srv, _ = _server(store)
    for tok in ("client-tok", "internal-tok"):
        g, fds = _exchange(srv, sc.encode_request(sc.Request(tok, 5, 2)))
        assert len(fds) == 1 and (g.cs_id, g.handle, g.version, g.length) == ("cs-1", 5, 2, len(data))
        assert os.pread(fds[0], len(data), 0) == data
        os.close(fds[0])


def test_refused_requests_get_their_error_and_no_descriptor(store):
    store.write(5, 0, b"x" * 10, version=2)
    srv, corrupt = _server(store)
    cases = [(sc.encode_request(sc.Request("wrong", 5, 2)), Unauthorized),
             (sc.encode_request(sc.Request("metrics-tok", 5, 2)), Forbidden),
             (sc.encode_request(sc.Request("client-tok", 6, 0)), NotFound),
             (sc.encode_request(sc.Request("client-tok", 5, 3)), Conflict),
             (b"garbage", InvalidArgument)]
    for raw, err in cases:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            srv.answer(a, raw)
            msg, fds, _, _ = socket.recv_fds(b, sc.MAX_ANSWER, 2)
        assert fds == []
        with pytest.raises(err):
            sc.parse_answer(msg)
    os.truncate(store._paths(5)[0], 3)  # shorter than its metadata: corrupt, and reported
    with pytest.raises(CorruptData):
        _exchange(srv, sc.encode_request(sc.Request("client-tok", 5, 0)))
    assert corrupt == [5]


def test_the_socket_is_0600_in_a_private_directory_and_an_unsafe_one_is_not_used(tmp_path, store):
    srv, _ = _server(store)
    srv.start()
    try:
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(srv.path.parent).st_mode) == 0o700
    finally:
        srv.stop()
    assert not srv.path.exists()
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    with pytest.raises(SocketUnusable):
        prepare_dir(loose)
    long = ShortCircuitServer(tmp_path / ("x" * 120) / "s.sock", Tokens("t"), "cs", store.open_local, print)
    with pytest.raises(SocketUnusable):
        long.start()


def test_a_full_server_answers_busy(store):
    srv, _ = _server(store)
    srv.slots = threading.BoundedSemaphore(1)
    srv.slots.acquire()  # the one slot is taken
    srv.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5)
            s.connect(str(srv.path))
            msg, fds, _, _ = socket.recv_fds(s, sc.MAX_ANSWER, 2)
        assert fds == []
        with pytest.raises(Unavailable, match="too many"):
            sc.parse_answer(msg)
    finally:
        srv.slots.release()
        srv.stop()


# ----------------------------------------------------------------------------- the client

def _file(tmp_path, data: bytes) -> int:
    p = tmp_path / "chunk"
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


def test_a_checked_read_returns_exactly_the_range(tmp_path):
    data = os.urandom(9 * B + 321)
    fd = _file(tmp_path, data)
    g = sc.Grant("cs", 1, 1, len(data), _crcs(data))
    try:
        for off, n in ((0, len(data)), (B, 4 * B), (100, 70_000), (len(data) - 5, 5), (B - 1, 2)):
            assert bytes(localread._read_checked(fd, g, off, n, None)) == data[off : off + n]
        buf = bytearray(8 * B)
        got = localread._read_checked(fd, g, 0, 8 * B, buf)
        assert got.obj is buf and bytes(got) == data[: 8 * B]  # into the caller's buffer
    finally:
        os.close(fd)


def test_a_changed_block_or_a_short_file_is_caught(tmp_path):
    data = bytearray(os.urandom(6 * B))
    g = sc.Grant("cs", 1, 1, len(data), _crcs(bytes(data)))
    data[5 * B + 3] ^= 1  # the sixth block, in the second slice
    fd = _file(tmp_path, bytes(data))
    try:
        assert bytes(localread._read_checked(fd, g, 0, 4 * B, None)) == bytes(data[: 4 * B])
        with pytest.raises(CorruptData, match="block 5"):
            localread._read_checked(fd, g, 0, 6 * B, None)
    finally:
        os.close(fd)
    fd = _file(tmp_path, bytes(data[: 3 * B]))
    try:
        with pytest.raises(CorruptData, match="ends at"):
            localread._read_checked(fd, g, 0, 4 * B, None)
    finally:
        os.close(fd)


class _Asks:
    """Stands in for ``localread.ask``: grants of files under ``d``, counted."""

    def __init__(self, d, data: bytes, cs_id="cs", version=1) -> None:
        self.d, self.data, self.cs_id, self.version = d, data, cs_id, version
        self.n = 0
        self.fds: list[int] = []

    def __call__(self, path, token, handle, version):
        self.n += 1
        p = self.d / f"c{handle}"
        p.write_bytes(self.data)
        fd = os.open(p, os.O_RDONLY)
        self.fds.append((fd, os.fstat(fd).st_ino, os.fstat(fd).st_dev))
        os.replace(p, self.d / f"c{handle}-{self.n}")  # the next grant of it is another file
        return sc.Grant(self.cs_id, handle, self.version, len(self.data), _crcs(self.data)), fd


def _gone(held: tuple[int, int, int]) -> bool:
    """Whether that descriptor is closed within 2 s (the closer thread closes them)."""
    deadline = time.monotonic() + 2
    while not _closed(held) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _closed(held)


def _closed(held: tuple[int, int, int]) -> bool:
    """Whether that descriptor is closed (its number may have been reused for another file)."""
    fd, ino, dev = held
    try:
        st = os.fstat(fd)
    except OSError:
        return True
    return (st.st_ino, st.st_dev) != (ino, dev)


def test_descriptors_are_cached_evicted_lru_and_closed(tmp_path, monkeypatch):
    data = os.urandom(2 * B)
    asks = _Asks(tmp_path, data)
    monkeypatch.setattr(localread, "ask", asks)
    lr = localread.LocalReads("t", size=2)
    assert bytes(lr.read("s", "cs", 1, 1, 0, B)) == data[:B]
    assert bytes(lr.read("s", "cs", 1, 1, B, B)) == data[B:]
    assert asks.n == 1  # one grant per chunk
    lr.read("s", "cs", 2, 1, 0, 1)
    lr.read("s", "cs", 3, 1, 0, 1)  # evicts chunk 1's descriptor
    assert asks.n == 3 and _gone(asks.fds[0]) and not _closed(asks.fds[1])
    asks.version = 2
    lr.read("s", "cs", 2, 2, 0, 1)  # a newer version than the one held: asked again...
    assert asks.n == 4 and _gone(asks.fds[1])
    with pytest.raises(Unavailable):  # ...and a grant older than asked is refused
        lr.read("s", "cs", 4, 3, 0, 1)
    lr.close()
    assert all(_gone(fd) for fd in asks.fds)


def test_a_descriptor_expires_and_a_wrong_chunkserver_is_refused(tmp_path, monkeypatch):
    data = os.urandom(100)
    asks = _Asks(tmp_path, data, cs_id="cs-other")
    monkeypatch.setattr(localread, "ask", asks)
    lr = localread.LocalReads("t", ttl=0.0)
    with pytest.raises(localread.NotLocal):
        lr.read("s", "cs", 1, 1, 0, 10)
    assert _closed(asks.fds[0])  # never held
    asks.cs_id = "cs"
    lr.read("s", "cs", 1, 1, 0, 10)
    lr.read("s", "cs", 1, 1, 0, 10)
    assert asks.n == 3 and _gone(asks.fds[1])  # expired at once (ttl 0): asked again, the old one closed
    lr.close()


def test_a_descriptor_evicted_while_read_is_closed_by_its_reader(tmp_path, monkeypatch):
    data = os.urandom(B)
    asks = _Asks(tmp_path, data)
    monkeypatch.setattr(localread, "ask", asks)
    lr = localread.LocalReads("t", size=1)
    h = lr._take("s", "cs", 1, 1, 10)  # a read in progress holds it
    lr.read("s", "cs", 2, 1, 0, 10)  # evicts it
    assert not _closed(asks.fds[0])
    lr._release(h)
    assert _gone(asks.fds[0])
    lr.close()


def test_an_unused_descriptor_is_closed_after_its_ttl_and_the_closer_ends(tmp_path, monkeypatch):
    asks = _Asks(tmp_path, os.urandom(100))
    monkeypatch.setattr(localread, "ask", asks)
    lr = localread.LocalReads("t", ttl=0.2)
    lr.read("s", "cs", 1, 1, 0, 10)
    assert not _closed(asks.fds[0]) and lr._closer is not None
    assert _gone(asks.fds[0])  # nobody read again: the closer expired it
    deadline = time.monotonic() + 2
    while lr._closer is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lr._closer is None and not lr._held  # nothing held: no thread left behind
    lr.close()


def test_a_mismatch_drops_the_descriptor(tmp_path, monkeypatch):
    data = os.urandom(B)
    asks = _Asks(tmp_path, data)
    monkeypatch.setattr(localread, "ask", asks)
    lr = localread.LocalReads("t")
    lr.read("s", "cs", 1, 1, 0, 10)
    (tmp_path / "c1-1").write_bytes(b"\0" * B)  # the file changed under the descriptor
    with pytest.raises(CorruptData):
        lr.read("s", "cs", 1, 1, 0, 10)
    assert _gone(asks.fds[0])
    lr.read("s", "cs", 1, 1, 0, 10)  # asked again (the stand-in writes the right bytes back)
    assert asks.n == 2
    lr.close()
