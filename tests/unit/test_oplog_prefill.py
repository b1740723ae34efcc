"""The master's op log written over zeros written ahead (``oplog``): crashes, restarts, rotation,
and the copies bootstrapped from it."""

import asyncio
import os

import pytest

from kubegfs.chunkserver.metastore import MetaStore
from kubegfs.errors import CorruptData
from kubegfs.formats import frame, packb, scan_log, sha256_hex
from kubegfs.master import oplog as oplog_mod
from kubegfs.master.metareplica import local_digest, read_batches
from kubegfs.master.oplog import OpLog, recover
from kubegfs.metalayout import segment_name


def mkdir(i):
    return {"op": "mkdir", "path": f"/d{i}", "parents": False, "mode": 0o755, "mtime": i}


def framed(first, last):
    return b"".join(frame(packb(mkdir(i) | {"seq": i})) for i in range(first, last + 1))


class Syncs:
    """The ``sync`` seam: fdatasyncs for real and notes what the segment held at each one."""

    def __init__(self):
        self.seen = []  # (file size, records' end, last seq on file) at each sync

    def __call__(self, fd):
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        scan = scan_log(data, padded=True)
        assert not scan.problem
        self.seen.append((len(data), scan.good_bytes, scan.records[-1]["seq"]))
        os.fdatasync(fd)


def write_ops(log, first, last, together=1):
    """Ops ``first..last``, ``together`` at a time (each group one batch at most)."""
    async def go():
        for start in range(first, last + 1, together):
            futs = [log.enqueue(log.stamp(mkdir(i))) for i in range(start, min(last, start + together - 1) + 1)]
            await asyncio.gather(*futs)
        await log.drain()
    asyncio.run(go())


def killed(log):
    """kill -9: the descriptor goes, the file stays as it is (zeros and all)."""
    os.close(log._fd)


def test_each_batch_overwrites_zeros_written_ahead_under_its_own_sync(tmp_path, monkeypatch):
    monkeypatch.setattr(oplog_mod, "PREFILL_BYTES", 500)  # so batches cross the pre-filled end
    syncs = Syncs()
    log = OpLog(tmp_path, 1, sync=syncs)
    write_ops(log, 1, 40, together=3)
    seg = tmp_path / segment_name(1)
    want = framed(1, 40)
    # at every sync the records are there and zeros follow them; each batch was synced once
    assert [s[2] for s in syncs.seen] == list(range(3, 40, 3)) + [40]
    assert all(size > end for size, end, _ in syncs.seen)
    sizes = [size for size, _, _ in syncs.seen]
    assert len(set(sizes)) > 2 and sizes == sorted(sizes)  # it grows by zeros, now and then
    data = seg.read_bytes()
    assert data[:len(want)] == want and not data[len(want):].strip(b"\0") and len(data) > len(want)
    assert log.durable_seq == 40
    log.close()  # a clean close cuts the zeros
    assert seg.read_bytes() == want


def test_a_kill_recovers_every_durable_op_and_restart_appends_after_the_records(tmp_path):
    log = OpLog(tmp_path, 1)
    write_ops(log, 1, 10, together=4)
    killed(log)
    seg = tmp_path / segment_name(1)
    assert seg.stat().st_size > len(framed(1, 10))  # the zeros are still there
    state, rep = recover(tmp_path, 0, 0)
    assert state.seq == 10 and state.n_dirs == 11 and rep.problems == [] and rep.replayed == 10
    assert seg.read_bytes() == framed(1, 10)  # cut to its records, quietly
    log = OpLog(tmp_path, state.seq + 1)
    write_ops(log, 11, 15)
    killed(log)
    state, rep = recover(tmp_path, 0, 0)
    assert state.seq == 15 and rep.problems == []
    assert seg.read_bytes() == framed(1, 15)


def test_a_log_opened_over_its_zeros_still_appends_after_the_records(tmp_path):
    """Recovery cuts the zeros before the log opens; the log finds the records' end anyway."""
    log = OpLog(tmp_path, 1)
    write_ops(log, 1, 6)
    killed(log)
    log = OpLog(tmp_path, 7)
    assert log._end == len(framed(1, 6)) < log._filled
    write_ops(log, 7, 9)
    killed(log)
    state, rep = recover(tmp_path, 0, 0)
    assert state.seq == 9 and rep.problems == []
    # and one left with something other than zeros after its records is not appended to
    seg = tmp_path / segment_name(1)
    with open(seg, "r+b") as f:
        f.seek(len(framed(1, 9)) + 100)
        f.write(b"\x07" * 3 + bytes(100))
    with pytest.raises(CorruptData, match="non-zero bytes after the end"):
        OpLog(tmp_path, 10)


@pytest.mark.parametrize("damage", ["torn-batch", "late-page", "garbage-header"])
def test_a_torn_batch_over_the_zeros_is_cut_and_kept_and_nothing_after_the_durable_ops_survives(tmp_path, damage):
    log = OpLog(tmp_path, 1)
    write_ops(log, 1, 8, together=2)
    killed(log)
    seg = tmp_path / segment_name(1)
    end = len(framed(1, 8))
    raw = bytearray(seg.read_bytes())
    lost = frame(packb(mkdir(9) | {"seq": 9})) + frame(packb(mkdir(10) | {"seq": 10}))
    if damage == "torn-batch":  # the next batch only partly reached the disk
        raw[end:end + 20] = lost[:20]
    elif damage == "late-page":  # its second half did, its first did not (pages in any order)
        raw[end + 4096:end + 4096 + len(lost)] = lost
    else:  # a header whose body never made it: the body is zeros
        raw[end:end + 6] = b"\x40\x00\x00\x00\x12\x34"
    seg.write_bytes(bytes(raw))
    state, rep = recover(tmp_path, 0, 0)
    assert state.seq == 8 and state.n_dirs == 9  # every durable op, nothing after
    assert len(rep.problems) == 1 and "recovered to the last good record" in rep.problems[0]
    assert seg.read_bytes() == framed(1, 8)
    kept = list(tmp_path.glob(segment_name(1) + ".corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(raw)
    log = OpLog(tmp_path, 9)  # and appends go after the good records
    write_ops(log, 9, 11)
    log.close()
    state, rep = recover(tmp_path, 0, 0)
    assert state.seq == 11 and rep.problems == []


def test_rotate_cuts_the_segment_it_leaves_and_prefills_the_next(tmp_path):
    log = OpLog(tmp_path, 1)
    write_ops(log, 1, 5)
    asyncio.run(log.rotate())
    asyncio.run(log.rotate())  # nothing logged in between: the same new segment, still empty
    first, second = tmp_path / segment_name(1), tmp_path / segment_name(6)
    assert first.read_bytes() == framed(1, 5) and second.stat().st_size == 0
    write_ops(log, 6, 9)
    assert first.read_bytes() == framed(1, 5)
    assert second.stat().st_size > len(framed(6, 9))
    killed(log)
    state, rep = recover(tmp_path, 0, 0)
    assert state.seq == 9 and rep.problems == []
    assert second.read_bytes() == framed(6, 9)


def test_a_failed_log_is_closed_as_it_is(tmp_path):
    def failing(fd):
        raise OSError("disk gone")

    log = OpLog(tmp_path, 1, sync=failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        write_ops(log, 1, 1)
    assert log.failed is not None
    log.close()  # no cut: what is on the file is left for recovery to judge
    assert (tmp_path / segment_name(1)).stat().st_size > len(framed(1, 1))


def test_a_copy_bootstrapped_from_a_prefilled_log_holds_exactly_its_records(tmp_path):
    master = tmp_path / "master"
    master.mkdir()
    log = OpLog(master, 1)
    write_ops(log, 1, 12, together=5)
    # the copy is started while the master's segment is open, zeros and all
    assert (master / segment_name(1)).stat().st_size > len(framed(1, 12))
    st = MetaStore(tmp_path / "cs")
    st.reset("h", 0)
    for first, last, data in read_batches(master, 0, 12):
        st.append("h", first, last, data, sha256_hex(data))
    assert st.last_seq == 12
    assert b"".join(p.read_bytes()[:n] for p, n in st.log_extent()) == framed(1, 12)
    assert st.last_digest == local_digest(master, 12) != "" and local_digest(master, 13) == ""
    write_ops(log, 13, 14)
    log.close()
    for first, last, data in read_batches(master, 12, 14):
        st.append("h", first, last, data, sha256_hex(data))
    state, rep = recover(tmp_path / "cs" / "meta", 0, 0)
    assert state.seq == 14 and rep.problems == []


def test_close_twice_touches_no_other_file(tmp_path):
    (tmp_path / "a").mkdir()
    log = OpLog(tmp_path / "a", 1)
    write_ops(log, 1, 2)
    log.close()
    other = tmp_path / "other"
    other.write_bytes(b"x" * 1000)
    with open(other, "r+b"):  # may take the closed descriptor's number
        log.close()
    assert other.stat().st_size == 1000 and (tmp_path / "a" / segment_name(1)).read_bytes() == framed(1, 2)
