"""On-disk formats: op-log framing (torn tails, flipped bytes), SnapObj codec, chunk store."""

import hashlib
import os
import random

import immutables
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.chunkserver.store import ChunkStore
from kubegfs.errors import Conflict, CorruptData, InvalidArgument
from kubegfs.formats import BLOCK_SIZE, frame, packb, scan_log
from kubegfs.snapobj import build_record, parse_record


def records(n):
    return [{"seq": i + 1, "op": "mkdir", "path": f"/d{i}"} for i in range(n)]


def test_log_scan_roundtrip():
    data = b"".join(frame(packb(r)) for r in records(50))
    scan = scan_log(data)
    assert scan.records == records(50) and scan.problem == "" and scan.good_bytes == len(data)


@pytest.mark.parametrize("cut", [1, 3, 7, 9, 20])
def test_log_torn_tail_dropped(cut):
    data = b"".join(frame(packb(r)) for r in records(10))
    scan = scan_log(data[:-cut])
    assert scan.records == records(9)
    assert "torn" in scan.problem
    assert scan.good_bytes == len(b"".join(frame(packb(r)) for r in records(9)))


def test_log_padded_with_zeros_ends_at_the_records_and_only_there():
    data = b"".join(frame(packb(r)) for r in records(5))
    scan = scan_log(data + bytes(100), padded=True)
    assert (scan.records, scan.good_bytes, scan.problem) == (records(5), len(data), "")
    assert scan_log(data + bytes(3), padded=True).problem == ""  # fewer zeros than a header
    assert scan_log(data, padded=True).good_bytes == len(data)  # no zeros at all
    assert scan_log(bytes(64), padded=True) == scan_log(b"")  # nothing written yet
    assert "undecodable" in scan_log(data + bytes(100)).problem  # not padded: zeros are damage
    torn = data + frame(packb(records(6)[5]))[:-4] + bytes(50)  # a batch cut short over the zeros
    scan = scan_log(torn, padded=True)
    assert scan.records == records(5) and scan.good_bytes == len(data) and scan.problem
    late = data + bytes(30) + frame(packb(records(7)[6])) + bytes(30)  # a later page kept, not this one
    scan = scan_log(late, padded=True)
    assert scan.records == records(5) and scan.good_bytes == len(data) and "non-zero" in scan.problem


def test_log_flipped_byte_detected_at_every_position():
    data = b"".join(frame(packb(r)) for r in records(5))
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        scan = scan_log(bytes(bad))
        assert scan.problem, f"flip at {pos} undetected"
        assert scan.records == records(len(scan.records))  # always a correct prefix


def random_tree(rng, n_files, depth=3):
    h = iter(range(1, 10**9))
    def make(d):
        kids = {}
        for i in range(rng.randrange(1, 6)):
            name = f"{rng.choice(['log', 'data', 'img', 'x'])}-{i}-{rng.randrange(10**6)}"
            if d < depth and rng.random() < 0.3:
                kids[name] = make(d + 1)
            else:
                k = rng.randrange(0, 4)
                kids[name] = ns.File(rng.randrange(0, 10**9), rng.randrange(10**18), 0o644,
                                     tuple(next(h) for _ in range(k)))
        return ns.Dir(immutables.Map(kids), rng.randrange(10**18), 0o755)
    return make(0)


def tree_equal(a, b):
    return list(map(_key, ns.walk(a))) == list(map(_key, ns.walk(b)))


def _key(item):
    parts, n = item
    if isinstance(n, ns.File):
        return (parts, "f", n.size, n.mtime, n.mode, n.chunks)
    return (parts, "d", n.mtime, n.mode)


@pytest.mark.parametrize("seed", range(5))
def test_snapobj_roundtrip(seed):
    rng = random.Random(seed)
    tree = random_tree(rng, 100)
    rec = build_record({"id": "s", "name": "n", "path": "/p"}, tree, lambda h: h % 7 + 1)
    p = parse_record(rec.data, rec.sha256)
    assert tree_equal(p.root, tree)
    assert p.header["name"] == "n" and p.header["format"] == 2
    assert [v for _h, v in p.chunks] == [h % 7 + 1 for h, _v in p.chunks]
    assert sorted(rec.handles) == sorted(h for h, _ in p.chunks)


def test_snapobj_single_file_and_empty_dir():
    for node in (ns.File(5, 1, 0o600, (9,)), ns.Dir(immutables.Map(), 1)):
        rec = build_record({"id": "s"}, node, lambda h: 1)
        assert tree_equal(parse_record(rec.data).root, node)


def test_snapobj_corruption_always_detected_by_sha():
    tree = random_tree(random.Random(3), 50)
    rec = build_record({"id": "s"}, tree, lambda h: 1)
    rng = random.Random(4)
    for _ in range(200):
        bad = bytearray(rec.data)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptData):
            parse_record(bytes(bad), rec.sha256)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_snapobj_decoder_rejects_garbage_cleanly(blob):
    try:
        parse_record(b"KGFSSNAP" + blob)
    except CorruptData:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_log_scanner_never_crashes(blob):
    scan = scan_log(blob)
    assert scan.good_bytes <= len(blob)


# --------------------------------------------------------------------------- chunk store


def test_chunk_write_read_append_and_checksums(tmp_path):
    s = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    data = random.Random(1).randbytes(BLOCK_SIZE + 100)
    assert s.write(7, 0, data, 1) == len(data)
    more = b"x" * (BLOCK_SIZE)
    s.write(7, len(data), more, 2)
    assert s.read(7, 0, 10**9) == data + more
    assert s.read(7, BLOCK_SIZE - 5, 10) == (data + more)[BLOCK_SIZE - 5 : BLOCK_SIZE + 5]
    with pytest.raises(Conflict):
        s.write(7, 0, b"a", 1)  # stale version
    with pytest.raises(InvalidArgument):
        s.write(7, 10**6, b"a", 2)  # gap
    with pytest.raises(InvalidArgument):
        s.write(8, 5, b"a", 1)
    with pytest.raises(InvalidArgument):
        s.write(7, 4 * BLOCK_SIZE - 1, b"ab", 2)  # past chunk size
    s2 = ChunkStore(tmp_path, 4 * BLOCK_SIZE)  # reload from disk
    assert s2.index[7] == (2, len(data) + len(more))


def test_unsynced_pieces_never_leave_a_chunk_failing_its_checksums(tmp_path):
    """A crash after unsynced pieces (a new ChunkStore over the same directory: the page cache
    holds the unsynced bytes, the metadata on disk does not) brings each chunk back at its last
    synced length, readable, never a mix of new CRCs and old bytes."""
    rng = random.Random(3)
    acked = rng.randbytes(BLOCK_SIZE + 100)

    def store_with_unsynced(d):
        s = ChunkStore(d, 8 * BLOCK_SIZE)
        s.write(1, 0, acked, 1, sync=True)
        s.write(1, len(acked), rng.randbytes(2 * BLOCK_SIZE), 2, sync=False)  # into the partial block
        assert s.read(1, 0, 10**9)[: len(acked)] == acked and s.index[1] == (2, len(acked) + 2 * BLOCK_SIZE)
        return s

    s = store_with_unsynced(tmp_path / "crash")
    s.write(2, 0, rng.randbytes(BLOCK_SIZE), 1, sync=False)  # a new chunk, never synced
    crashed = ChunkStore(tmp_path / "crash", 8 * BLOCK_SIZE)
    assert crashed.index == {1: (1, len(acked))}
    assert crashed.read(1, 0, 10**9) == acked and crashed.verify(1)
    # a synced piece makes the earlier unsynced ones durable too
    s = store_with_unsynced(tmp_path / "sync")
    s.write(1, len(acked) + 2 * BLOCK_SIZE, b"t" * 10, 2, sync=True)
    whole = s.read(1, 0, 10**9)
    assert ChunkStore(tmp_path / "sync", 8 * BLOCK_SIZE).read(1, 0, 10**9) == whole
    # so does a version change (the master's order before an append)
    s = store_with_unsynced(tmp_path / "version")
    whole = s.read(1, 0, 10**9)
    s.set_version(1, 3)
    assert ChunkStore(tmp_path / "version", 8 * BLOCK_SIZE).read(1, 0, 10**9) == whole


def test_chunk_corruption_detected_on_read_and_before_append(tmp_path):
    s = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    data = random.Random(2).randbytes(2 * BLOCK_SIZE + 10)
    s.write(1, 0, data, 1)
    path, _ = s._paths(1)
    raw = bytearray(path.read_bytes())
    raw[BLOCK_SIZE + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert s.read(1, 0, 100) == data[:100]  # block 0 still fine
    with pytest.raises(CorruptData):
        s.read(1, BLOCK_SIZE, 10)
    assert 1 in s.corrupt
    # corruption in the partial last block is not laundered by an append
    s.write(2, 0, b"abc", 1)
    p2, _ = s._paths(2)
    p2.write_bytes(b"abX")
    with pytest.raises(CorruptData):
        s.write(2, 3, b"def", 1)
    assert not s.verify(2)


def test_chunk_clone_is_independent(tmp_path):
    s = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    s.write(1, 0, b"hello", 3)
    s.clone(1, 2, 3)
    s.write(2, 5, b" world", 3)
    assert s.read(1, 0, 100) == b"hello"
    assert s.read(2, 0, 100) == b"hello world"
    assert s.index[2] == (3, 11)
    assert s.chunk_bytes == 5 + 11  # the running total follows writes, clones and deletes
    s.delete(1)
    assert s.chunk_bytes == 11


def test_record_store_verifies(tmp_path):
    s = ChunkStore(tmp_path, BLOCK_SIZE)
    body = b"record" * 1000
    sha = hashlib.sha256(body).hexdigest()
    with pytest.raises(CorruptData):
        s.put_record("r1", iter([body]), "0" * 64)
    assert s.list_records() == []
    s.put_record("r1", iter([body[:10], body[10:]]), sha)
    assert s.list_records() == ["r1"] and s.verify_record("r1") and s.record("r1") == (body, sha)
    at = s.log.records["r1"]
    with open(s.log.dir / at.name, "r+b") as f:  # a byte of it rots in the log
        f.seek(at.off)
        f.write(b"X")
    assert not s.verify_record("r1")


def test_chunk_store_tidies_crash_leftovers_on_start(tmp_path):
    s = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    s.write(1, 0, b"committed", 1)
    s.write(2, 0, b"to be deleted", 1)
    d1, _ = s._paths(1)
    with open(d1, "ab") as f:
        f.write(b"torn tail of an unacknowledged write")
    d2, m2 = s._paths(2)
    m2.unlink()  # a delete interrupted after the metadata went
    s2 = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    assert s2.read(1, 0, 100) == b"committed" and d1.stat().st_size == 9
    assert 2 not in s2.index and not d2.exists()
    assert s2.chunk_bytes == 9
    assert s2.verify(1)


def test_tree_decoder_rejects_inconsistent_shapes():
    from kubegfs.formats import _build_tree

    ok = ([2, -1, -1], ["", "a", "b"], [0, 0, 0], [0, 0, 0], [1, 2], [0, 0], [])
    assert sorted(_build_tree(*ok).children.keys()) == ["a", "b"]
    for bad in (
        ([2, -1, -1], ["", "a", "a"], [0, 0, 0], [0, 0, 0], [1, 2], [0, 0], []),   # duplicate name
        ([3, -1, -1], ["", "a", "b"], [0, 0, 0], [0, 0, 0], [1, 2], [0, 0], []),   # runs past the end
        ([1, -1, -1], ["", "a", "b"], [0, 0, 0], [0, 0, 0], [1, 2], [0, 0], []),   # leftover entry
        ([1, 0, 1], ["", "a", "b"], [0, 0, 0], [0, 0, 0], [], [], []),             # a dir owning itself
        ([2, -1, -1], ["", "a", "x/y"], [0, 0, 0], [0, 0, 0], [1, 2], [0, 0], []),  # slash in a name
        ([1, -1], ["", "a"], [0, 0], [0, 0], [1], [2], [7]),                       # too few handles
    ):
        with pytest.raises(CorruptData):
            _build_tree(*bad)


def test_snapobj_bytes_do_not_depend_on_the_hash_seed():
    """A build resumed after a restart (another hash seed) writes the same record: canonical."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import random, sys; sys.path.insert(0, {here!r}); from test_formats import random_tree;"
            "from kubegfs.snapobj import build_record;"
            "print(build_record({'id': 's'}, random_tree(random.Random(3), 300), lambda h: 1).sha256)")
    shas = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in (1, 2, 3)}
    assert len(shas) == 1, shas


def _old_record(tmp_path, rid, body):
    """A record as earlier versions stored it: ``records/<id>.rec`` and its sha256 sidecar."""
    (tmp_path / "records").mkdir(exist_ok=True)
    (tmp_path / "records" / f"{rid}.rec").write_bytes(body)
    (tmp_path / "records" / f"{rid}.sha256").write_text(hashlib.sha256(body).hexdigest())


def _two_records(tmp_path):
    """A store holding records r1 and r2 (the same 600 bytes) as files of an earlier version;
    the store, the bytes, their sha256."""
    body = b"record" * 100
    sha = hashlib.sha256(body).hexdigest()
    _old_record(tmp_path, "r1", body)
    _old_record(tmp_path, "r2", body)
    return ChunkStore(tmp_path, 4 * BLOCK_SIZE), body, sha


def test_record_digests_notice_a_truncated_record_and_a_new_sidecar_without_rereading_old_ones(tmp_path):
    s, body, sha = _two_records(tmp_path)
    assert s.record_digests() == {"r1": [600, sha], "r2": [600, sha]}
    assert s.used_bytes() == 1200 and len(s.record_sizes) == 2
    rec1, side1 = s._rec_paths("r1")
    # the same sidecar file rewritten in place with its stat unchanged is not read again
    st = side1.stat()
    with open(side1, "r+b") as f:
        f.write(b"f" * 64)
    os.utime(side1, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert s.record_digests()["r1"] == [600, sha]
    # a truncated record and a replaced sidecar (a new file, as every write makes) are noticed
    os.truncate(rec1, 10)
    tmp = side1.with_suffix(".new")
    tmp.write_bytes(b"e" * 64)
    os.replace(tmp, side1)
    assert s.record_digests()["r1"] == [10, "e" * 64]
    s.delete_record("r2")
    assert "r2" not in s.record_sizes and s.used_bytes() == 10
    assert ChunkStore(tmp_path, 4 * BLOCK_SIZE).record_sizes == {"r1": 10}  # a restart counts them again


def test_record_digests_without_a_pass_are_the_last_pass_with_the_stores_and_deletes_since(tmp_path):
    s, body, sha = _two_records(tmp_path)
    s.delete_record("r1")
    s.put_record("r3", iter([body[:60]]), hashlib.sha256(body[:60]).hexdigest())
    want = {"r2": [600, sha], "r3": [60, hashlib.sha256(body[:60]).hexdigest()]}
    assert s.record_digests(scan=False) == want == s.record_digests()
    got = s.record_digests(scan=False)
    got["r9"] = [1, ""]  # a copy: the caller's to keep
    assert "r9" not in s.record_digests(scan=False)
    rec2, side2 = s._rec_paths("r2")
    os.truncate(rec2, 10)  # damage from outside: not seen without a pass, seen by the next one
    assert s.record_digests(scan=False)["r2"] == [600, sha]
    assert s.record_digests()["r2"] == [10, sha]
    assert s.record_digests(scan=False)["r2"] == [10, sha]


def test_a_record_is_stored_by_what_stores_its_blocks_and_not_at_all_if_that_fails(tmp_path):
    s = ChunkStore(tmp_path, BLOCK_SIZE)
    body = b"record" * 100
    sha = hashlib.sha256(body).hexdigest()
    data = b"a directory block"
    blk = (merkle.block_digest(data), merkle.compress(data))

    def blocks(rec):
        assert "r1" not in s.list_records()  # not before the blocks are durable
        return s.log.put([blk], rec)

    assert s.put_record("r1", iter([body]), sha, blocks) == (600, sha)
    assert s.record_digests() == {"r1": [600, sha]} and s.verify_record("r1")
    assert s.log.records["r1"].name == s.log.index[blk[0]][0]  # one append: the blocks, then the record

    def fails(rec):
        raise CorruptData("a block failed its digest")

    with pytest.raises(CorruptData, match="a block"):
        s.put_record("r2", iter([body]), sha, fails)
    ran = []
    with pytest.raises(CorruptData, match="record checksum"):  # checked before the blocks are stored
        s.put_record("r3", iter([body]), "0" * 64, lambda rec: ran.append(1))
    assert ran == [] and s.list_records() == ["r1"]
    assert list(s.records_dir.iterdir()) == []  # no file at all
