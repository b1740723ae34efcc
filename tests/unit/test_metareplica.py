"""Metadata copies without servers: target choice, the chunkserver's store, the local log reader."""

from functools import partial

import pytest

from kubegfs.chunkserver.metastore import MetaStore
from kubegfs.errors import Conflict, CorruptData
from kubegfs.formats import frame, packb, sha256_hex
from kubegfs.master.metareplica import Candidate, choose_targets, read_batches
from kubegfs.master.oplog import recover
from kubegfs.metalayout import checkpoint_name, segment_name
from kubegfs.topology import Location


def cand(i, zone, node=None):
    return Candidate(i, f"http://{i}", Location(node or i, zone, "r"))


def test_targets_spread_over_zones_avoid_the_master_node_and_stay_put():
    cs = [cand("a1", "a"), cand("a2", "a"), cand("b1", "b"), cand("m", "c", node="master-node")]
    master = Location("master-node", "c", "r")
    assert choose_targets(cs, [], 2, master) == ["a1", "b1"]
    assert choose_targets(cs, ["a2"], 2, master) == ["a2", "b1"]  # a current target stays
    assert choose_targets(cs, [], 3, master) == ["a1", "b1", "m"]  # master's node only as a last resort
    assert choose_targets(cs[:2], ["gone"], 2, master) == ["a1", "a2"]  # one zone left: still two copies


def batch(first, last):
    data = b"".join(frame(packb({"op": "mkdir", "path": f"/d{i}", "parents": False, "mode": 0o755,
                                 "mtime": i, "seq": i})) for i in range(first, last + 1))
    return data, sha256_hex(data)


def test_store_accepts_only_contiguous_verified_batches(tmp_path):
    st = MetaStore(tmp_path)
    st.reset("h1", 0)
    data, sha = batch(1, 3)
    assert st.append("h1", 1, 3, data, sha) == 3
    assert st.append("h1", 1, 3, data, sha) == 3  # a repeat is harmless
    with pytest.raises(Conflict) as ei:
        st.append("h1", 5, 6, *batch(5, 6))
    assert ei.value.details["last_seq"] == 3
    with pytest.raises(Conflict):
        st.append("h2", 4, 4, *batch(4, 4))  # another lineage
    with pytest.raises(CorruptData):
        st.append("h1", 4, 4, batch(4, 4)[0], "0" * 64)
    bad = bytearray(batch(4, 5)[0])
    bad[-1] ^= 1
    with pytest.raises(CorruptData):
        st.append("h1", 4, 5, bytes(bad), sha256_hex(bytes(bad)))
    with pytest.raises(CorruptData):
        st.append("h1", 4, 4, *batch(4, 5))  # says 4..4, holds 4..5
    assert st.inventory()["last_seq"] == 3
    assert st.append("h1", 2, 5, *batch(2, 5)) == 5  # an overlap: only 4..5 are added
    state, rep = recover(tmp_path / "meta", 0, 0)
    assert state.seq == 5 and not rep.problems


def test_store_survives_a_torn_tail_and_a_restart(tmp_path):
    st = MetaStore(tmp_path)
    st.reset("h", 0)
    st.append("h", 1, 4, *batch(1, 4))
    seg = tmp_path / "meta" / segment_name(1)
    size = seg.stat().st_size
    assert size > len(batch(1, 4)[0])  # pre-filled
    # a crash mid-write: the last batch only partly over the zeros
    seg.write_bytes(batch(1, 4)[0][:-3] + bytes(size - len(batch(1, 4)[0]) + 3))
    again = MetaStore(tmp_path)
    assert (again.history, again.last_seq) == ("h", 3)
    assert seg.stat().st_size == len(batch(1, 3)[0])  # cut back to the last good record
    again.append("h", 4, 5, *batch(4, 5))
    state, rep = recover(tmp_path / "meta", 0, 0)
    assert state.seq == 5 and rep.problems == []


def _extent_bytes(st):
    return b"".join(path.read_bytes()[:n] for path, n in st.log_extent())


def test_store_overwrites_zeros_ahead_and_readers_get_records_only(tmp_path, monkeypatch):
    import os

    from kubegfs.chunkserver import metastore
    from kubegfs.formats import scan_log

    monkeypatch.setattr(metastore, "PREFILL_BYTES", 300)  # so batches span the pre-filled end
    sizes = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(metastore.os, "fdatasync",
                        lambda fd: sizes.append(os.fstat(fd).st_size) or real_fdatasync(fd))
    st = MetaStore(tmp_path)
    st.reset("h", 0)
    seg = tmp_path / "meta" / segment_name(1)
    for i in range(1, 41):
        assert st.append("h", i, i, *batch(i, i)) == i
        records = batch(1, i)[0]
        assert seg.stat().st_size >= len(records) + 1  # zeros ahead of the records
        assert seg.read_bytes()[:len(records)] == records and not seg.read_bytes()[len(records):].strip(b"\0")
        assert st.log_extent() == [(seg, len(records))]
    assert len(sizes) == 40 and len(set(sizes)) < 40  # most appends overwrite without growing the file
    assert len(set(sizes)) > 2  # and a batch past the zeros grows it by more zeros
    assert st.inventory()["segments"] == [{"first": 1, "bytes": len(batch(1, 40)[0])}]
    scan = scan_log(_extent_bytes(st))  # what get_log sends: a plain valid log, no padding
    assert scan.problem == "" and [r["seq"] for r in scan.records] == list(range(1, 41))
    again = MetaStore(tmp_path)  # a restart cuts the zero tail and opens a new segment
    assert again.last_seq == 40 and seg.stat().st_size == len(batch(1, 40)[0])
    again.append("h", 41, 42, *batch(41, 42))
    assert [n for _p, n in again.log_extent()] == [len(batch(1, 40)[0]), len(batch(41, 42)[0])]
    assert scan_log(_extent_bytes(again)).records == scan_log(batch(1, 42)[0]).records


def test_store_cuts_records_left_beyond_a_gap_of_zeros(tmp_path):
    """A crash can keep a later page of an unsynced batch and lose an earlier one: records
    after zeros. They are cut at start, so a later append cannot end up in front of them."""
    st = MetaStore(tmp_path)
    st.reset("h", 0)
    st.append("h", 1, 3, *batch(1, 3))
    seg = tmp_path / "meta" / segment_name(1)
    size = seg.stat().st_size
    head = batch(1, 3)[0] + bytes(len(batch(4, 4)[0]))
    seg.write_bytes(head + batch(5, 5)[0] + bytes(size - len(head) - len(batch(5, 5)[0])))
    again = MetaStore(tmp_path)
    assert again.last_seq == 3 and seg.stat().st_size == len(batch(1, 3)[0])
    again.append("h", 4, 6, *batch(4, 6))
    state, rep = recover(tmp_path / "meta", 0, 0)
    assert state.seq == 6 and rep.problems == []


def test_checkpoints_must_not_run_ahead_old_ones_are_pruned_and_segments_are_cut(tmp_path):
    from kubegfs.master.checkpoint import encode_checkpoint
    from kubegfs.master.state import MasterState

    st = MetaStore(tmp_path)
    st.reset("h", 0)
    st.append("h", 1, 2, *batch(1, 2))
    ms = MasterState(1024, 1)
    for i in (1, 2):
        ms.apply({"op": "mkdir", "path": f"/d{i}", "parents": False, "mode": 0o755, "mtime": i, "seq": i})
    ck = encode_checkpoint(ms.checkpoint_view())
    with pytest.raises(Conflict):
        st.put_checkpoint("h", 9, ck, sha256_hex(ck))
    st.put_checkpoint("h", 2, ck, sha256_hex(ck))
    st.append("h", 3, 5, *batch(3, 5))
    inv = st.inventory()
    assert [c["seq"] for c in inv["checkpoints"]] == [2] and [s["first"] for s in inv["segments"]] == [1, 3]
    # the segment before the new one is cut to its records; the open one keeps its zeros
    first, second = tmp_path / "meta" / segment_name(1), tmp_path / "meta" / segment_name(3)
    assert first.stat().st_size == len(batch(1, 2)[0]) and second.stat().st_size > len(batch(3, 5)[0])
    assert st.log_extent() == [(first, len(batch(1, 2)[0])), (second, len(batch(3, 5)[0]))]
    state, rep = recover(tmp_path / "meta", 0, 0)  # a copy's directory replays as it is
    assert state.seq == 5 and state.n_dirs == 6 and not rep.problems
    assert second.stat().st_size == len(batch(3, 5)[0])  # its zero tail cut, quietly
    assert (tmp_path / "meta" / checkpoint_name(2)).with_suffix(".sha256").read_text() == sha256_hex(ck)


def test_read_batches_reframes_the_local_log_range(tmp_path):
    (tmp_path / segment_name(1)).write_bytes(batch(1, 5)[0])
    (tmp_path / segment_name(6)).write_bytes(batch(6, 8)[0])
    out = read_batches(tmp_path, 3, 7)
    assert [(f, la) for f, la, _ in out] == [(4, 7)]
    assert out[0][2] == batch(4, 7)[0]
    assert read_batches(tmp_path, 0, 9)[-1][1] == 8  # the newest may not be on disk yet
    (tmp_path / segment_name(6)).unlink()
    (tmp_path / segment_name(7)).write_bytes(batch(7, 8)[0])
    with pytest.raises(OSError, match="gap before seq 7"):
        read_batches(tmp_path, 0, 9)


def test_a_copy_names_its_last_record_so_a_diverged_tail_is_noticed(tmp_path):
    from kubegfs.formats import record_digest, scan_log
    from kubegfs.master.metareplica import local_digest

    st = MetaStore(tmp_path / "cs")
    st.reset("h", 0)
    st.append("h", 1, 3, *batch(1, 3))
    (tmp_path / segment_name(1)).write_bytes(batch(1, 3)[0])  # the master's own log
    assert st.inventory()["last_digest"] == local_digest(tmp_path, 3) != ""
    assert MetaStore(tmp_path / "cs").last_digest == st.last_digest  # survives a restart
    # the master crashed before record 3 was durable here and wrote another record 3 after
    other = scan_log(batch(3, 3)[0]).records[0] | {"path": "/elsewhere"}
    (tmp_path / segment_name(1)).write_bytes(batch(1, 2)[0] + frame(packb(other)))
    assert local_digest(tmp_path, 3) == record_digest(other) != st.last_digest
    assert local_digest(tmp_path, 9) == ""


def test_stream_messages_carry_range_checksum_and_records():
    from kubegfs.metalayout import pack_stream_batch, unpack_stream_batch

    data, sha = batch(4, 6)
    assert unpack_stream_batch(pack_stream_batch(4, 6, sha, data)) == (4, 6, sha, data)
    with pytest.raises(ValueError, match="shorter"):
        unpack_stream_batch(b"\0" * 10)
    with pytest.raises(ValueError, match="bad range"):
        unpack_stream_batch(pack_stream_batch(6, 4, sha, data))
    with pytest.raises(ValueError, match="bad range"):
        unpack_stream_batch(pack_stream_batch(0, 0, sha, data))


def test_batches_that_queued_up_are_written_with_one_fdatasync_and_a_bad_one_refuses_all(tmp_path, monkeypatch):
    import os

    from kubegfs.chunkserver import metastore

    syncs = []
    monkeypatch.setattr(metastore.os, "fdatasync", lambda fd: syncs.append(fd) or os.fsync(fd))
    st = MetaStore(tmp_path)
    st.reset("h", 0)
    assert st.append_many("h", [metastore.LogBatch(f, la, *batch(f, la)) for f, la in ((1, 2), (3, 3), (4, 7))]) == 7
    assert len(syncs) == 1
    bad = bytearray(batch(9, 9)[0])
    bad[-1] ^= 1
    with pytest.raises(CorruptData):
        st.append_many("h", [metastore.LogBatch(8, 8, *batch(8, 8)),
                             metastore.LogBatch(9, 9, bytes(bad), sha256_hex(bytes(bad)))])
    with pytest.raises(Conflict):  # a gap between two batches
        st.append_many("h", [metastore.LogBatch(8, 8, *batch(8, 8)), metastore.LogBatch(10, 10, *batch(10, 10))])
    assert st.last_seq == 7 and len(syncs) == 1  # nothing of a refused group was written
    assert st.append_many("h", [metastore.LogBatch(5, 8, *batch(5, 8))]) == 8  # an overlap adds only 8
    state, rep = recover(tmp_path / "meta", 0, 0)
    assert state.seq == 8 and not rep.problems


class _FakeStream:
    def __init__(self):
        self.out = []
        self.closed = False

    def put(self, b):
        self.out.append(b)

    def close(self):
        self.closed = True

    def sent(self):
        out, self.out = [(b.first, b.last) for b in self.out], []
        return out


def test_batches_stream_to_every_copy_at_once_and_settle_in_order_when_all_answered(tmp_path):
    import asyncio

    from kubegfs.master.metareplica import MetaReplicationConfig, MetaReplicator, Target

    async def scenario():
        r = MetaReplicator(MetaReplicationConfig("sync", 2, timeout_seconds=0.3), tmp_path, lambda: "h",
                           lambda: None, lambda: [cand("a", "za"), cand("b", "zb")], Location("m", "zm", "r"))
        r.targets = {i: Target(i, f"http://{i}", f"z{i}", in_sync=True) for i in "ab"}
        r._streams = {i: _FakeStream() for i in "ab"}
        streams = dict(r._streams)
        b1 = r.on_durable(b"one", 1, 2)
        f1, wait1 = b1.fut, b1.wait
        f2 = r.on_durable(b"two", 3, 3).fut
        assert wait1 and streams["a"].sent() == streams["b"].sent() == [(1, 2), (3, 3)]  # not held back
        answered = []
        b1.then(lambda: answered.append(1))
        r._acked(r.targets["a"], 3)
        assert not f1.done() and not f2.done() and not answered  # b has not answered
        r._acked(r.targets["b"], 2)
        assert f1.done() and not f2.done()
        assert answered == [1]  # in the step that settled it, not at the next pass of the loop
        b1.then(lambda: answered.append(2))
        assert answered == [1, 2]  # settled already: at once
        r._drop(r.targets["b"], "test")  # out of sync: no longer waited for
        assert f2.done() and streams["b"].closed and r.in_sync() == 1
        f3 = r.on_durable(b"three", 4, 4).fut
        assert streams["a"].sent() == [(4, 4)] and streams["b"].sent() == []
        watcher = asyncio.create_task(r._watch())
        await asyncio.sleep(0.6)  # a never answers batch 4: dropped after timeout_seconds
        assert f3.done() and not r.targets["a"].in_sync and "no answer to log batch 4..4" in r.targets["a"].error
        # that wait was the bound: with no copy left, the next ones go out on the local log alone
        assert r._gave_up and r.on_durable(b"four", 5, 5) is None
        # after a restart (no copy in sync yet, chunkservers there) they wait, then give up
        r._gave_up = False
        b6 = r.on_durable(b"six", 6, 6)
        f6, wait6 = b6.fut, b6.wait
        await asyncio.sleep(0.1)
        assert wait6 and not f6.done() and r._kick.is_set()  # a copy is being brought in sync
        await asyncio.sleep(0.5)
        assert f6.done() and r._gave_up
        watcher.cancel()

    asyncio.run(scenario())


class _FakeWS:
    """The master's end of a stream: ``frames`` holds each message sent, unpacked; ``answer``
    makes the copy answer with its last seq; ``gate`` makes the next send wait (flow control)."""

    def __init__(self):
        import asyncio

        self.frames, self.gate, self.fail = [], None, None
        self.closed = False
        self._answers = asyncio.Queue()

    async def send_bytes(self, data):
        from kubegfs.metalayout import unpack_stream_batch

        if self.fail:
            raise ConnectionResetError(self.fail)
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate
        self.frames.append(unpack_stream_batch(data))

    def ranges(self):
        return [(first, last) for first, last, _sha, _data in self.frames]

    def answer(self, seq):
        import aiohttp

        self._answers.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, f'{{"last_seq": {seq}}}', None))

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._answers.get()

    async def close(self):
        self.closed = True


def _batches(loop, *ranges):
    from kubegfs.master.metareplica import _Batch

    return [_Batch(batch(f, la)[0], f, la, 0.0, loop.create_future()) for f, la in ranges]


def test_take_run_joins_contiguous_batches_into_one_message_a_copy_accepts(tmp_path):
    import asyncio
    from collections import deque

    from kubegfs.chunkserver.metastore import LogBatch
    from kubegfs.master.metareplica import take_run
    from kubegfs.metalayout import unpack_stream_batch

    async def scenario():
        loop = asyncio.get_running_loop()
        backlog = deque(_batches(loop, (1, 2), (3, 3), (4, 6), (8, 8), (9, 9)))
        msg, last = take_run(backlog)
        assert last == 6 and [b.first for b in backlog] == [8, 9]  # stops at the gap before 8
        first, last, sha, data = unpack_stream_batch(msg)
        assert (first, last) == (1, 6) and data == batch(1, 6)[0] and sha == sha256_hex(data)
        st = MetaStore(tmp_path)
        st.reset("h", 0)
        assert st.append_many("h", [LogBatch(first, last, data, sha)]) == 6  # one batch to the copy
        assert take_run(backlog)[1] == 9 and not backlog
        one = deque(_batches(loop, (1, 1), (2, 2)))
        msg, last = take_run(one, limit=len(one[0].data))  # the limit stops a run, never its first
        assert last == 1 and unpack_stream_batch(msg)[:3] == (1, 1, sha256_hex(batch(1, 1)[0]))

    asyncio.run(scenario())


def test_stream_keeps_one_send_in_flight_and_sends_what_waited_as_one_when_answered():
    import asyncio

    from kubegfs.master.metareplica import _Stream

    async def scenario():
        loop = asyncio.get_running_loop()
        ws, failed, acks = _FakeWS(), [], []
        st = _Stream(ws, acks.append, failed.append)
        b = _batches(loop, (1, 1), (2, 2), (3, 4), (5, 5), (6, 6), (7, 7))
        st.put(b[0])
        assert ws.ranges() == [(1, 1)]  # on the socket before this step ends
        st.put(b[1])
        st.put(b[2])
        await asyncio.sleep(0.01)
        assert ws.ranges() == [(1, 1)]  # the copy has not answered 1: 2..4 wait
        ws.answer(1)
        await asyncio.sleep(0.01)
        assert acks == [1] and ws.ranges() == [(1, 1), (2, 4)]  # one send for both
        assert ws.frames[1][3] == batch(2, 4)[0] and ws.frames[1][2] == sha256_hex(batch(2, 4)[0])
        ws.answer(4)
        await asyncio.sleep(0.01)
        gate = ws.gate = loop.create_future()
        st.put(b[3])  # has to wait for the transport
        st.put(b[4])
        ws.answer(5)  # (the copy cannot answer before the send is written; the stream copes)
        await asyncio.sleep(0.01)
        assert ws.ranges()[2:] == [] and st._draining is not None
        gate.set_result(None)  # 5 is written; the copy answered it: 6 follows
        await asyncio.sleep(0.01)
        assert ws.ranges()[2:] == [(5, 5), (6, 6)] and st._draining is None and acks == [1, 4, 5]
        ws.fail = "gone"
        ws.answer(6)
        await asyncio.sleep(0.01)
        st.put(b[5])
        assert not failed  # reported in a later step, as a sender task would
        await asyncio.sleep(0)
        assert failed and "stream send" in failed[0]
        st.close()

    asyncio.run(scenario())


def test_async_stream_starts_its_sends_an_interval_apart_and_a_timer_sends_what_waited():
    import asyncio

    from kubegfs.master.metareplica import _Stream

    async def scenario():
        loop = asyncio.get_running_loop()
        ws = _FakeWS()
        st = _Stream(ws, lambda seq: None, lambda why: None, interval=0.5)
        b = _batches(loop, (1, 1), (2, 2), (3, 3), (4, 4))
        t0 = loop.time()
        st.put(b[0])
        assert ws.ranges() == [(1, 1)]  # the first goes at once
        ws.answer(1)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        st.put(b[1])
        st.put(b[2])
        assert st._inflight == 0 and st._timer is not None  # answered, but the interval has not passed
        while len(ws.frames) < 2 and loop.time() - t0 < 5:
            await asyncio.sleep(0.01)
        assert ws.ranges() == [(1, 1), (2, 3)] and loop.time() - t0 >= 0.5  # the timer sent both as one
        ws.answer(3)
        await asyncio.sleep(0.6)
        st.put(b[3])
        assert ws.ranges()[-1] == (4, 4)  # the interval has passed: at once
        st.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sync_never_holds_a_batch_back_in_a_stream_async_does(tmp_path, mode):
    import asyncio

    from kubegfs.master.metareplica import MetaReplicationConfig, MetaReplicator, Target, _Stream
    from kubegfs.master.oplog import OpLog

    class AnsweringWS(_FakeWS):
        async def send_bytes(self, data):
            await super().send_bytes(data)
            asyncio.get_running_loop().call_later(0.002, self.answer, self.frames[-1][1])

    async def scenario():
        log = OpLog(tmp_path, 1, fsync=False)
        r = MetaReplicator(MetaReplicationConfig(mode, 2), tmp_path, lambda: "h", lambda: None,
                           lambda: [cand("a", "za"), cand("b", "zb")], Location("m", "zm", "r"))
        r.attach(log)
        r.targets = {i: Target(i, f"http://{i}", f"z{i}", in_sync=True) for i in "ab"}
        ws = {i: AnsweringWS() for i in "ab"}
        held = []
        r._streams = {i: _Stream(ws[i], partial(r._acked, r.targets[i]), partial(r._drop, r.targets[i]))
                      for i in "ab"}
        for st in r._streams.values():
            put = st.put
            st.put = lambda b, st=st, put=put: (held.append(bool(st._inflight or st._backlog)), put(b))

        async def client(c):
            for i in range(20):
                await log.enqueue(log.stamp({"op": "mkdir", "path": f"/c{c}/{i}"}))

        await asyncio.gather(*(client(c) for c in range(8)))
        await log.drain()
        for _ in range(100):
            if not r._queue:
                break
            await asyncio.sleep(0.01)
        assert [w.frames[-1][1] for w in ws.values()] == [160, 160]
        for w in ws.values():  # every seq once, in order
            assert [f[0] for f in w.frames] == [1] + [f[1] + 1 for f in w.frames[:-1]]
        assert not any(held) if mode == "sync" else any(held)
        for st in r._streams.values():
            st.close()
        log.close()

    asyncio.run(scenario())


def test_async_gathers_the_batches_made_during_a_round_trip_and_still_bounds_the_lag(tmp_path):
    import asyncio

    from kubegfs.master.metareplica import MetaReplicationConfig, MetaReplicator, Target, _Stream

    async def scenario():
        r = MetaReplicator(MetaReplicationConfig("async", 2, max_lag_seconds=0.2), tmp_path, lambda: "h",
                           lambda: None, lambda: [cand("a", "za"), cand("b", "zb")], Location("m", "zm", "r"))
        r.targets = {i: Target(i, f"http://{i}", f"z{i}", in_sync=True) for i in "ab"}
        ws = {i: _FakeWS() for i in "ab"}
        r._streams = {i: _Stream(ws[i], partial(r._acked, r.targets[i]), partial(r._drop, r.targets[i]))
                      for i in "ab"}
        made = [r.on_durable(batch(i, i)[0], i, i) for i in range(1, 5)]  # at the local disk's pace
        assert not any(b.wait for b in made)  # async: answered at the local fsync
        assert ws["a"].ranges() == ws["b"].ranges() == [(1, 1)]  # 2..4 wait for the answer to 1
        ws["a"].answer(1)
        ws["b"].answer(1)
        await asyncio.sleep(0.01)
        assert ws["a"].ranges() == ws["b"].ranges() == [(1, 1), (2, 4)] and made[0].fut.done()
        ws["a"].answer(4)  # b does not answer: the copies trail
        await asyncio.sleep(0.3)
        late = r.on_durable(batch(5, 5)[0], 5, 5)
        assert late.wait and r.lag_seconds() > 0.2  # past the bound: its writers wait for the copies
        assert not made[3].fut.done() and ws["a"].ranges()[-1] == (5, 5) and ws["b"].ranges()[-1] == (2, 4)
        ws["b"].answer(4)
        await asyncio.sleep(0.01)
        assert ws["b"].ranges()[-1] == (5, 5) and made[3].fut.done() and not late.fut.done()
        ws["a"].answer(5)
        ws["b"].answer(5)
        await asyncio.sleep(0.01)
        assert late.fut.done() and r.lag_seconds() == 0 and not r.on_durable(batch(6, 6)[0], 6, 6).wait
        for s in r._streams.values():
            s.close()

    asyncio.run(scenario())


def test_stream_writer_writes_what_queued_up_at_once_answers_in_order_and_stops_on_a_refusal(tmp_path):
    import asyncio
    import threading

    from kubegfs.chunkserver import metastore
    from kubegfs.chunkserver.metaapi import StreamWriter

    st = MetaStore(tmp_path)
    st.reset("h", 0)
    calls, hold = [], threading.Event()
    real = st.append_many

    def append_many(history, batches):
        calls.append([(b.first, b.last) for b in batches])
        hold.wait(5)
        return real(history, batches)

    st.append_many = append_many

    async def run():
        w = StreamWriter(st, "h", asyncio.get_running_loop())
        w.put(metastore.LogBatch(1, 2, *batch(1, 2)))
        while not calls:  # the first write is under way (held) ...
            await asyncio.sleep(0.001)
        w.put(metastore.LogBatch(3, 3, *batch(3, 3)))  # ... while these two queue up
        w.put(metastore.LogBatch(4, 5, *batch(4, 5)))
        hold.set()
        got = [await w.answers.get(), await w.answers.get()]
        w.put(metastore.LogBatch(7, 7, *batch(7, 7)))  # a gap: refused, and the writer stops
        got.append(await w.answers.get())
        got.append(await w.answers.get())
        w.put(metastore.LogBatch(6, 6, *batch(6, 6)))  # not written any more
        w.close()
        await asyncio.sleep(0.05)
        return got

    got = asyncio.run(run())
    assert got[:2] == [2, 5] and isinstance(got[2], Conflict) and got[3] is None
    assert calls == [[(1, 2)], [(3, 3), (4, 5)], [(7, 7)]] and st.last_seq == 5


def test_stream_writer_writes_what_was_put_before_close_then_answers_none(tmp_path):
    import asyncio

    from kubegfs.chunkserver import metastore
    from kubegfs.chunkserver.metaapi import StreamWriter

    st = MetaStore(tmp_path)
    st.reset("h", 0)

    async def run():
        w = StreamWriter(st, "h", asyncio.get_running_loop())
        w.put(metastore.LogBatch(1, 3, *batch(1, 3)))
        w.close()
        out = []
        while (got := await w.answers.get()) is not None:
            out.append(got)
        return out

    assert asyncio.run(run()) == [3] and st.last_seq == 3


class _Shipment:
    def __init__(self, wait):
        import asyncio

        self.fut = asyncio.get_running_loop().create_future()
        self.wait = wait

    def then(self, fn):
        self.fut.add_done_callback(lambda _f: fn())


class _FakeCopies:
    """An op log whose batches go to stand-in copies: ``shipped`` holds each batch's range and
    its shipment, which the test answers by hand."""

    def __init__(self, tmp_path, wait=True):
        from kubegfs.master.oplog import OpLog

        self.log = OpLog(tmp_path, 1, fsync=False)
        self.log.replicate = self.replicate
        self.wait = wait
        self.shipped = []

    def replicate(self, data, first, last):
        self.shipped.append((first, last, _Shipment(self.wait)))
        return self.shipped[-1][2]

    def ranges(self):
        return [(first, last) for first, last, _ in self.shipped]

    def answer(self, i):
        self.shipped[i][2].fut.set_result(None)

    def create(self, i):
        return self.log.enqueue(self.log.stamp({"op": "mkdir", "path": f"/d{i}"}))

    async def close(self):
        await self.log.drain()
        self.log.close()


@pytest.mark.parametrize("wait", [True, False], ids=["sync", "async"])
def test_sync_keeps_one_batch_in_flight_to_the_copies_and_the_next_takes_what_queued(tmp_path, wait):
    import asyncio

    async def scenario():
        c = _FakeCopies(tmp_path, wait)
        f1 = c.create(1)
        await asyncio.sleep(0.05)  # batch 1 is written here and on its way to the copies
        later = [c.create(i) for i in (2, 3, 4)]
        await asyncio.sleep(0.05)
        if wait:  # held until the copies hold batch 1: then 2..4 go as one batch
            assert c.ranges() == [(1, 1)] and not f1.done() and c.log.durable_seq == 0
        else:  # async: the next batch does not wait for the copies
            assert c.ranges() == [(1, 1), (2, 4)] and f1.done()
        c.answer(0)
        await asyncio.sleep(0.05)
        assert c.ranges() == [(1, 1), (2, 4)] and f1.done() and c.log.durable_seq == 1
        assert not any(f.done() for f in later) if wait else all(f.done() for f in later)
        c.answer(1)
        await asyncio.sleep(0.01)
        assert all(f.done() for f in later) and c.log.durable_seq == 4
        await c.close()

    asyncio.run(scenario())


def test_sync_batch_of_several_waits_briefly_for_half_the_clients_it_answered(tmp_path, monkeypatch):
    import asyncio

    from kubegfs.master import oplog

    async def scenario():
        c = _FakeCopies(tmp_path)
        monkeypatch.setattr(oplog, "COMMIT_DELAY", 30.0)
        first = [c.create(i) for i in range(1, 5)]  # four clients in one batch
        await asyncio.sleep(0.5)  # its round trip
        c.create(5)  # arrives while it is at the copies
        c.answer(0)
        await asyncio.sleep(0.05)
        assert all(f.done() for f in first) and len(c.shipped) == 1  # waits for 2 of the 4 answered
        c.create(6)
        await asyncio.sleep(0.05)
        assert len(c.shipped) == 1
        c.create(7)  # the second: the batch goes at once, with what queued
        await asyncio.sleep(0.01)
        assert c.ranges() == [(1, 4), (5, 7)]
        monkeypatch.setattr(oplog, "COMMIT_DELAY", 0.01)
        c.answer(1)  # answered 3: waits for 2, for at most the delay
        c.create(8)
        await asyncio.sleep(0.05)
        assert c.ranges()[-1] == (8, 8)
        monkeypatch.setattr(oplog, "COMMIT_DELAY", 30.0)
        c.create(9)
        c.create(10)
        await asyncio.sleep(0.5)
        c.answer(2)  # a batch of one: a lone writer never waits
        for _ in range(30):
            await asyncio.sleep(0.01)
            if c.ranges()[-1] == (9, 10):
                break
        assert c.ranges()[-1] == (9, 10)  # well before the 0.5 s its round trip would allow
        await asyncio.sleep(0.005)
        c.answer(3)  # answered 2 after ~5 ms: waits no longer than that
        c.create(11)
        await asyncio.sleep(0.1)
        assert c.ranges()[-1] == (11, 11)
        c.answer(4)
        await c.close()

    asyncio.run(scenario())


def test_a_stopped_replicator_answers_what_it_held_and_ships_nothing_more(tmp_path):
    import asyncio

    from kubegfs.master.metareplica import MetaReplicationConfig, MetaReplicator, Target

    async def scenario():
        r = MetaReplicator(MetaReplicationConfig("sync", 2), tmp_path, lambda: "h", lambda: None,
                           lambda: [cand("a", "za"), cand("b", "zb")], Location("m", "zm", "r"))
        r.targets = {i: Target(i, f"http://{i}", f"z{i}", in_sync=True) for i in "ab"}
        r._streams = {i: _FakeStream() for i in "ab"}
        held = r.on_durable(b"one", 1, 1)
        running = asyncio.create_task(r.run())
        await asyncio.sleep(0.05)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        # the master is stopping: what it held is answered (durable locally), and a batch made
        # after that (the op log draining) is not left waiting for copies nobody will answer
        assert held.fut.done() and r.in_sync() == 0
        assert r.on_durable(b"two", 2, 2) is None

    asyncio.run(scenario())


def test_lean_messages_and_answers_are_taken_whole_and_a_partial_one_waits():
    from kubegfs.metalayout import (
        LEAN_MAX_MESSAGE,
        LEAN_MAX_REFUSAL,
        lean_answer,
        lean_message,
        lean_refusal,
        take_lean_answers,
        take_lean_messages,
    )

    buf = bytearray(lean_message(b"one") + lean_message(b"") + lean_message(b"three")[:5])
    assert take_lean_messages(buf) == [b"one", b""] and bytes(buf) == lean_message(b"three")[:5]
    buf += lean_message(b"three")[5:]
    assert take_lean_messages(buf) == [b"three"] and not buf
    with pytest.raises(ValueError, match="at most"):
        take_lean_messages(bytearray((LEAN_MAX_MESSAGE + 1).to_bytes(4, "big")))
    refusal = lean_refusal({"error": "conflict", "status": 409})
    buf = bytearray(lean_answer(5) + lean_answer(9) + refusal[:-2])
    assert take_lean_answers(buf) == ([5, 9], None) and bytes(buf) == refusal[:-2]  # the refusal is not whole yet
    buf += refusal[-2:]
    assert take_lean_answers(buf) == ([], {"error": "conflict", "status": 409}) and not buf
    assert take_lean_answers(bytearray(lean_answer(3)[:7])) == ([], None)
    # a refusal longer than the cap is an error at once, not bytes to wait for
    huge = lean_answer((1 << 64) - 1) + (LEAN_MAX_REFUSAL + 1).to_bytes(4, "big")
    with pytest.raises(ValueError, match="at most"):
        take_lean_answers(bytearray(huge))


def test_lean_stream_thread_writes_what_arrived_with_one_fdatasync_answers_in_order_and_ends_on_a_refusal(
        tmp_path, monkeypatch):
    import os
    import socket
    import threading

    from kubegfs.chunkserver import metastore
    from kubegfs.chunkserver.metaapi import serve_lean_stream
    from kubegfs.metalayout import lean_message, pack_stream_batch, take_lean_answers

    syncs = []
    monkeypatch.setattr(metastore.os, "fdatasync", lambda fd: syncs.append(fd) or os.fsync(fd))
    st = MetaStore(tmp_path)
    st.reset("h", 0)

    def msg(first, last):
        data, sha = batch(first, last)
        return lean_message(pack_stream_batch(first, last, sha, data))

    master, copy = socket.socketpair()
    master.settimeout(10)
    early = msg(1, 2)[:10]  # came with the head: the rest follows on the socket
    master.sendall(msg(1, 2)[10:] + msg(3, 3) + msg(4, 5))  # arrived together: one write, one answer
    t = threading.Thread(target=serve_lean_stream, args=(st, copy, "h", early))
    t.start()
    buf = bytearray()
    while len(buf) < 8:
        buf += master.recv(100)
    assert take_lean_answers(buf) == ([5], None) and len(syncs) == 1
    master.sendall(msg(7, 7))  # a gap: refused with its error, and the stream ends
    t.join(5)
    copy.close()
    while (more := master.recv(4096)):
        buf += more
    seqs, refusal = take_lean_answers(buf)
    assert not t.is_alive() and seqs == [] and refusal["status"] == 409 and refusal["error"] == "conflict"
    assert st.last_seq == 5 and len(syncs) == 1
    master.close()

    master, copy = socket.socketpair()  # a malformed message: 400, nothing written
    t = threading.Thread(target=serve_lean_stream, args=(st, copy, "h", b""))
    t.start()
    master.sendall(lean_message(b"\0" * 10))
    t.join(5)
    copy.close()
    master.settimeout(10)
    buf = bytearray(master.recv(4096))
    assert take_lean_answers(buf)[1]["status"] == 400 and st.last_seq == 5
    master.close()

    master, copy = socket.socketpair()  # the master going away ends the thread quietly
    t = threading.Thread(target=serve_lean_stream, args=(st, copy, "h", b""))
    t.start()
    master.close()
    t.join(5)
    assert not t.is_alive()
    copy.close()


def test_lean_link_refuses_an_answer_head_announcing_a_body_over_the_cap():
    """The copy's answer to the stream's head is an error object or nothing: a head that says its
    body is longer than LEAN_MAX_REFUSAL fails the link at once instead of being buffered."""
    import asyncio

    from kubegfs.master.metareplica import _LeanLink
    from kubegfs.metalayout import LEAN_MAX_REFUSAL

    async def scenario():
        link = _LeanLink()
        link.data_received(b"HTTP/1.1 409 Conflict\r\nContent-Length: %d\r\n\r\n{" % (LEAN_MAX_REFUSAL + 1))
        with pytest.raises(OSError, match="at most"):
            await asyncio.wait_for(link.head, 5)  # (without the cap it waits for the body)
        ok = _LeanLink()
        ok.data_received(b'HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\n\r\n{}')
        assert await ok.head == (409, b"{}")

    asyncio.run(scenario())
