"""The block log (kubegfs/chunkserver/blocklog.py) and the stores on it: framing, a torn last
entry cut at every byte, a damaged entry mid-file, segments rolled, unlinked and compacted, the
older pack files read beside the log; records with their blocks in one append, tombstones, and
the record files of earlier versions read beside the log."""

from __future__ import annotations

import hashlib
import logging
import os
import random

import pytest

from kubegfs import merkle
from kubegfs.chunkserver import blocklog
from kubegfs.chunkserver.blocks import PACK_MAGIC, BlockStore, LogRecord
from kubegfs.chunkserver.store import ChunkStore
from kubegfs.errors import NotFound


def _blocks(n: int, rng: random.Random) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(n):
        data = rng.randbytes(rng.randrange(1, 300))
        out.append((merkle.block_digest(data), merkle.compress(data)))
    return out


def _segment(*puts: list[tuple[bytes, bytes]], v1: bool = False) -> tuple[bytes, list[int]]:
    """A segment holding one append (or, ``v1``, one entry as earlier versions wrote) per put,
    and where each starts."""
    data = bytearray(blocklog.V1_MAGIC if v1 else blocklog.SEGMENT_MAGIC)
    starts = []
    for items in puts:
        starts.append(len(data))
        parts = blocklog.entry(blocklog.frames(items)[0])
        if not v1:
            parts = [*blocklog.append_head(len(data), sum(map(len, parts))), *parts]
        data += b"".join(parts)
    return bytes(data), starts


def _segments(tmp_path):
    return sorted(p.name for p in (tmp_path / "blocks").glob("*.log"))


def _digests(*puts):
    return sorted(dg for p in puts for dg, _ in p)


H = blocklog.APPEND_HEAD


def test_an_entry_frames_its_blocks_and_the_scan_finds_each_where_it_is():
    rng = random.Random(1)
    a, b = _blocks(3, rng), _blocks(4, rng)
    data, starts = _segment(a, b)
    got = list(blocklog.scan(data))
    assert [e.at for e in got] == [s + H for s in starts] and {e.kind for e in got} == {blocklog.BLOCKS}
    assert [e.end for e in got] == [*starts[1:], len(data)]
    blocks = [blk for e in got for blk in e.blocks]
    assert [(dg, data[off:off + ln]) for dg, off, ln in blocks] == a + b


def test_a_torn_last_entry_is_dropped_at_every_byte_it_can_be_cut_at(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # (the cut's syncs: not what is tested here)
    caplog.set_level(logging.WARNING)
    rng = random.Random(2)
    a, b = _blocks(3, rng), _blocks(2, rng)
    data, starts = _segment(a, b)
    (tmp_path / "blocks").mkdir()
    seg = tmp_path / "blocks" / blocklog.segment_name(1)
    for cut in range(starts[1], len(data)):
        for tail in (b"", bytes(len(data) - cut)):  # the file ends there, or zeros to its length
            seg.write_bytes(data[:cut] + tail)
            s = BlockStore(tmp_path)
            assert sorted(s.digests()) == sorted(dg for dg, _ in a), (cut, len(tail))
            assert s.get([dg for dg, _ in a]) == a and seg.stat().st_size == starts[1]
            assert not s.dropped and not s.damaged_records  # never acknowledged: nothing reported
    assert "nothing after it is read" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # in the newest segment: a warning
    seg.write_bytes(data)
    assert sorted(BlockStore(tmp_path).digests()) == sorted(dg for dg, _ in a + b)


def _flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    bad = bytearray(data)
    bad[at] ^= mask
    return bytes(bad)


def test_rot_in_the_newest_segment_keeps_every_later_append_and_reports_what_it_hit(tmp_path, caplog):
    """A damaged append followed by another was synced before it (appends are written one after
    the other, each after the last one's fdatasync): damage, not a torn append; nothing is cut,
    neither at this start nor at a later one, when the segment is no longer the newest."""
    rng = random.Random(3)
    a, b, c = _blocks(2, rng), _blocks(2, rng), _blocks(2, rng)
    data, starts = _segment(a, b, c)
    (tmp_path / "blocks").mkdir()
    seg = tmp_path / "blocks" / blocklog.segment_name(1)
    first = starts[1] + H + blocklog.ENTRY_HEAD + blocklog.FRAME_HEAD  # b's first block's bytes
    for damage, bad, kept, dropped in [
        ("a bit of b's first block", _flip(data, first + 3), a + b[1:] + c, [b[0][0]]),
        ("b's pages lost, c's on disk", data[:starts[1]] + bytes(starts[2] - starts[1]) + data[starts[2]:], a + c, []),
        ("a bit of b's append head", _flip(data, starts[1] + 14), a + b + c, []),
        # a length that fails: b's frames, walked, each still matching its digest
        ("a bit of b's entry's length", _flip(data, starts[1] + H + 5), a + b + c, []),
        ("b's length past the segment", _flip(data, starts[1] + H + 7, 0x80), a + b + c, []),
        ("b's entry's length and a block", _flip(_flip(data, starts[1] + H + 5), first + 3), a + b[1:] + c, [b[0][0]]),
        ("b's append head's length", _flip(data, starts[1] + 12 + 8 + 3, 0x40), a + b + c, []),
    ]:
        seg.write_bytes(bad)
        caplog.clear()
        for _again in range(2):  # the newest segment, then (after a put) an older one
            with caplog.at_level(logging.ERROR):
                s = BlockStore(tmp_path)
            assert sorted(s.missing(_digests(a, b, c))) == sorted(set(_digests(a, b, c)) - set(_digests(kept))), damage
            assert s.get([dg for dg, _ in kept]) == kept  # (each verified)
            assert sorted(s.dropped) == sorted(dropped), damage
            assert seg.read_bytes() == bad and not list((tmp_path / "blocks").glob("*.corrupt-*"))  # nothing cut
            assert "reported damaged" in caplog.text
            s.put(_blocks(1, rng))
        for p in (tmp_path / "blocks").glob("*.log"):
            p.unlink()


def test_a_torn_tail_that_holds_what_looks_like_an_append_head_is_still_cut(tmp_path, monkeypatch):
    """A head is taken only where its CRC holds and it names its own offset: garbage in a torn
    append (here the bytes of heads naming another offset, or with a CRC that fails) is not a
    later append, so the torn one is still the tail and is cut."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    rng = random.Random(12)
    a, b = _blocks(2, rng), _blocks(3, rng)
    data, starts = _segment(a, b)
    (tmp_path / "blocks").mkdir()
    seg = tmp_path / "blocks" / blocklog.segment_name(1)
    inside = starts[1] + H + 60
    for fake in (b"".join(blocklog.append_head(starts[1], 10)),  # another offset than its own
                 _flip(b"".join(blocklog.append_head(inside, 10)), 9)):  # its own, but a CRC that fails
        torn = bytearray(data)
        torn[starts[1]:starts[1] + H] = bytes(H)  # b's head lost
        torn[inside:inside + len(fake)] = fake
        seg.write_bytes(bytes(torn))
        s = BlockStore(tmp_path)
        assert sorted(s.digests()) == _digests(a) and seg.stat().st_size == starts[1]
        assert not s.dropped
        for p in (tmp_path / "blocks").glob("*.corrupt-*"):
            p.unlink()


def test_no_damage_makes_the_scan_read_out_of_bounds_or_loop():
    """3000 random damages, in segments that end with their last append or with zeros (a
    pre-filled head; the damage may land in them too)."""
    rng = random.Random(13)
    puts = [_blocks(rng.randrange(1, 4), rng) for _ in range(5)]
    data, starts = _segment(*puts)
    for i in range(3000):
        bad = bytearray(data) + bytes(rng.choice((0, 1, 200, 5000)))
        for _ in range(rng.choice((1, 1, 2, 8))):
            at = rng.randrange(len(blocklog.SEGMENT_MAGIC), len(bad))
            if rng.random() < 0.3:  # a length field of an append head or an entry: anything
                at = rng.choice(starts) + rng.choice((4, 12, 20, H + 4)) + rng.randrange(4)
            bad[at] = rng.randrange(256)
        bad = bad[:rng.randrange(len(bad) // 2, len(bad) + 1)] if i % 3 == 0 else bad
        got = list(blocklog.scan(bytes(bad), newest=i % 2 == 0))
        pos = 0
        for e in got:
            assert pos <= e.at < e.end <= len(bad)  # in order, in bounds, each taking bytes
            pos = e.end
            for _dg, off, ln in e.blocks:
                assert e.at < off and off + ln <= e.end
        assert sum(isinstance(e, blocklog.Bad) and e.tail for e in got) <= (1 if got and got[-1].end == len(bad) else 0)
        for e in got:  # the end of the appends is only zeros, and it is the last thing
            assert not (isinstance(e, blocklog.Bad) and e.zeros) or (e is got[-1] and not bytes(bad[e.at:]).strip(b"\0"))
    for zeros in (1, 200, blocklog.PREFILL_BYTES, blocklog.PREFILL_BYTES + 4096):  # undamaged, zeros after
        got = list(blocklog.scan(data + bytes(zeros)))
        assert [e.at for e in got] == [s + H for s in starts] + [len(data)] and got[-1].zeros


def test_segments_of_earlier_versions_are_read_by_their_rules(tmp_path, caplog, monkeypatch):
    """``KGBLKLG1``, no append heads: the newest cut at its first bad entry; in an older one a
    damaged entry is skipped (what it holds reported, as for rot now) and a damaged head stops the scan."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    rng = random.Random(11)
    a, b, c = _blocks(2, rng), _blocks(2, rng), _blocks(2, rng)
    data, starts = _segment(a, b, c, v1=True)
    (tmp_path / "blocks").mkdir()
    seg = tmp_path / "blocks" / blocklog.segment_name(1)
    bad = bytearray(_flip(data, starts[1] + blocklog.ENTRY_HEAD + blocklog.FRAME_HEAD + 3))  # a bit of b[0]: rot
    seg.write_bytes(bytes(bad))
    s = BlockStore(tmp_path)
    assert sorted(s.digests()) == _digests(a) and seg.stat().st_size == starts[1]  # the newest: cut
    for p in (tmp_path / "blocks").glob("*.corrupt-*"):
        p.unlink()
    seg.write_bytes(bytes(bad))
    (tmp_path / "blocks" / blocklog.segment_name(2)).write_bytes(b"".join(_segment(_blocks(1, rng))[:1]))  # the newest
    with caplog.at_level(logging.ERROR):
        s = BlockStore(tmp_path)
    assert sorted(s.missing([dg for dg, _ in a + b + c])) == [b[0][0]] and s.dropped == {b[0][0]}
    assert "fails its checksum; skipped" in caplog.text and seg.read_bytes() == bytes(bad)  # nothing cut
    bad[starts[1]:starts[1] + 4] = b"XXXX"  # b's head: where c starts is not known
    seg.write_bytes(bytes(bad))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        s = BlockStore(tmp_path)
    assert sorted(s.missing([dg for dg, _ in a + b + c])) == _digests(b, c)
    assert "has no known kind; nothing after it is read" in caplog.text
    d = _blocks(2, rng)
    s.put(d)  # into a new, pre-filled segment beside them
    new = tmp_path / "blocks" / s.head.name
    assert new.read_bytes()[:8] == blocklog.SEGMENT_MAGIC and new.stat().st_size > s.head.size
    again = BlockStore(tmp_path)
    assert sorted(again.missing([dg for dg, _ in a + b + c + d])) == _digests(b, c)
    assert seg.read_bytes()[:8] == blocklog.V1_MAGIC and new.stat().st_size == s.head.size


def test_puts_append_to_one_segment_and_a_restart_starts_a_new_one(tmp_path):
    rng = random.Random(4)
    puts = [_blocks(3, rng) for _ in range(4)]
    s = BlockStore(tmp_path)
    for p in puts[:3]:
        assert s.put(p) == 3
    assert _segments(tmp_path) == [blocklog.segment_name(1)]
    s2 = BlockStore(tmp_path)  # reopened: everything back, the old head never appended to again
    assert s2.get([dg for p in puts[:3] for dg, _ in p]) == [it for p in puts[:3] for it in p]
    s2.put(puts[3])
    assert _segments(tmp_path) == [blocklog.segment_name(1), blocklog.segment_name(2)]
    assert sorted(BlockStore(tmp_path).digests()) == sorted(dg for p in puts for dg, _ in p)


def test_a_failed_append_is_never_followed_in_its_segment(tmp_path, monkeypatch):
    rng = random.Random(5)
    a, b, c = _blocks(2, rng), _blocks(2, rng), _blocks(2, rng)
    s = BlockStore(tmp_path)
    s.put(a)
    a_end = s.head.size
    real = os.fdatasync

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(OSError):
        s.put(b)
    monkeypatch.setattr(os, "fdatasync", real)
    assert s.missing([dg for dg, _ in b]) == [dg for dg, _ in b]  # not acknowledged, not indexed
    assert (tmp_path / "blocks" / blocklog.segment_name(1)).stat().st_size == a_end  # cut off again
    s.put(c)
    assert _segments(tmp_path) == [blocklog.segment_name(1), blocklog.segment_name(2)]
    assert BlockStore(tmp_path).get([dg for dg, _ in a + c]) == a + c


def test_a_mostly_unwanted_segment_is_compacted_into_the_head(tmp_path, monkeypatch):
    rng = random.Random(6)
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", 1500)
    s = BlockStore(tmp_path)
    first = [_blocks(4, rng) for _ in range(6)]
    for p in first:
        s.put(p)
    segs = _segments(tmp_path)
    assert len(segs) >= 2
    old = segs[0]
    in_old = [dg for dg, (name, _o, _l) in s.index.items() if name == old]
    keep = in_old[:1]
    s.delete([dg for dg in in_old if dg not in keep][:len(in_old) // 2])  # half unwanted: kept
    assert old in _segments(tmp_path)
    s.delete([dg for dg in in_old if dg not in keep])  # under a quarter wanted: compacted
    assert old not in _segments(tmp_path)
    assert all(s.index[dg][0] == s.head.name for dg in keep)
    want = {dg: z for p in first for dg, z in p if dg in s.index}
    assert dict(s.get(list(want))) == want
    again = BlockStore(tmp_path)
    assert sorted(again.digests()) == sorted(want) and dict(again.get(list(want))) == want


def test_a_segment_all_unwanted_is_unlinked_once_it_is_no_longer_the_head(tmp_path, monkeypatch):
    rng = random.Random(7)
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", 1)
    s = BlockStore(tmp_path)
    a, b = _blocks(3, rng), _blocks(3, rng)
    s.put(a)
    s.delete([dg for dg, _ in a])
    assert _segments(tmp_path) == [blocklog.segment_name(1)]  # the head stays until the next put
    s.put(b)
    assert _segments(tmp_path) == [blocklog.segment_name(2)]


def test_packs_of_earlier_versions_are_read_beside_the_log(tmp_path):
    rng = random.Random(8)
    a, b = _blocks(3, rng), _blocks(3, rng)
    (tmp_path / "blocks").mkdir()
    pack = tmp_path / "blocks" / "0000000000000007.pack"
    pack.write_bytes(PACK_MAGIC + merkle.pack_frames(a, compressed=True))
    s = BlockStore(tmp_path)
    assert s.get([dg for dg, _ in a]) == a
    s.put(b + a[:1])  # what the pack holds is not stored again
    assert _segments(tmp_path) == [blocklog.segment_name(8)]  # numbered after the pack
    again = BlockStore(tmp_path)
    assert again.get([dg for dg, _ in a + b]) == a + b
    assert again.live == {pack.name: 3, blocklog.segment_name(8): 3}
    again.delete([dg for dg, _ in a])
    assert not pack.exists()


# ------------------------------------------------------------------------ the pre-filled head


def _snapshots(tmp_path, rng: random.Random, n: int, size: int):
    """A store holding ``n`` snapshots (3 blocks and a record of ``size`` bytes, one append
    each): (the store, the puts, the head's path)."""
    puts = [(_blocks(3, rng), _record(f"r{i}", rng.randbytes(size))) for i in range(n)]
    s = BlockStore(tmp_path)
    for blocks, rec in puts:
        s.put(blocks, rec)
    return s, puts, tmp_path / "blocks" / s.head.name


def _no_warnings(caplog) -> bool:
    return not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_appends_into_the_pre_filled_head_all_come_back_after_a_restart(tmp_path, caplog):
    """The head is written over zeros: the file is longer than its appends; a scan of it (as a
    running holder's) ends quietly at the zeros; a start keeps every append, cuts the zeros off
    (nothing kept aside, nothing said) and appends to a new head."""
    rng = random.Random(20)
    s, puts, seg = _snapshots(tmp_path, rng, 5, 300)
    data = seg.read_bytes()
    assert len(data) == s.head.filled == len(blocklog.SEGMENT_MAGIC) + blocklog.PREFILL_BYTES > s.head.size  # zeros written once
    assert s.sizes[s.head.name] == s.head.size
    assert not data[s.head.size:].strip(b"\0")
    caplog.set_level(logging.INFO)
    got = list(blocklog.scan(data, seg.name))
    assert [e.kind for e in got[:-1]] == [blocklog.BLOCKS, blocklog.RECORD] * 5
    assert isinstance(got[-1], blocklog.Bad) and got[-1].zeros and got[-1].at == s.head.size
    again = BlockStore(tmp_path)
    assert _no_warnings(caplog) and not list((tmp_path / "blocks").glob("*.corrupt-*"))
    assert seg.read_bytes() == data[:s.head.size] and again.sizes[seg.name] == s.head.size
    held = [it for blocks, _rec in puts for it in blocks]
    assert again.get([dg for dg, _ in held]) == held
    assert {rid: again.read_record(rid) for rid in again.records} == {r.rid: (r.data, r.sha256) for _b, r in puts}
    more = _blocks(2, rng)
    again.put(more)
    assert _segments(tmp_path) == [seg.name, blocklog.segment_name(2)]
    assert sorted(BlockStore(tmp_path).digests()) == _digests(held, more) and _no_warnings(caplog)


def test_a_torn_append_on_the_zeros_is_cut(tmp_path, caplog, monkeypatch):
    """A crash during an append into the pre-filled head leaves some of its pages on the zeros
    (the file as long as before, or as long as the append's own zeros made it): whatever part
    reached the disk, the append is the torn tail (a warning), cut, and what it left kept aside
    up to its last byte that is not zero."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    rng = random.Random(21)
    a, b = _blocks(3, rng), _blocks(30, rng)
    s = BlockStore(tmp_path)
    s.put(a)
    a_end = s.head.size
    s.put(b, _record("rb", rng.randbytes(12000)))
    seg = tmp_path / "blocks" / s.head.name
    whole = seg.read_bytes()
    b_end = s.head.size
    assert b_end - a_end > 3 * 4096
    page = 4096
    for what, keep in [
        ("its head's page only", [(a_end, page)]),
        ("its head lost, a later page on disk", [(a_end + page, a_end + 2 * page)]),
        ("a page in its middle lost", [(a_end, page), (a_end + 2 * page, b_end)]),
        ("all but its last byte", [(a_end, b_end - 1)]),
        ("its last page only", [(b_end - 100, b_end)]),
    ]:
        for length in (len(whole), b_end + 50):  # the zeros written before it, or its own
            torn = bytearray(whole[:a_end]) + bytes(length - a_end)
            for lo, hi in keep:
                torn[lo:hi] = whole[lo:hi]
            seg.write_bytes(bytes(torn))
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                again = BlockStore(tmp_path)
            assert sorted(again.digests()) == _digests(a) and "rb" not in again.records, what
            assert seg.stat().st_size == a_end and not again.dropped and not again.damaged_records, what
            assert "an append a crash cut" in caplog.text, what
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR], what
            aside = list((tmp_path / "blocks").glob("*.corrupt-*"))
            assert [p.read_bytes() for p in aside] == [bytes(torn[a_end:]).rstrip(b"\0")], what
            for p in aside:
                p.unlink()


def test_rot_that_zeroes_bytes_before_later_appends_is_rot(tmp_path, caplog):
    """Zeros in the middle of the pre-filled head with a good append after them are rot, not its
    end: the later appends are kept, what the zeroed one held is reported, nothing is cut but
    the zeros after the last append; the same at a later start, when the segment is an older one."""
    rng = random.Random(22)
    a, b, c = _blocks(2, rng), _blocks(3, rng), _blocks(2, rng)
    s = BlockStore(tmp_path)
    s.put(a)
    b_at = s.head.size
    s.put(b, _record("rb", rng.randbytes(200)))
    c_at = s.head.size
    s.put(c, _record("rc", rng.randbytes(200)))
    s.put(_blocks(1, rng))
    seg = tmp_path / "blocks" / s.head.name
    whole = seg.read_bytes()
    for what, lo, hi, lost in [
        ("b's whole append", b_at, c_at, _digests(b)),
        ("b's head", b_at, b_at + H, []),
        ("from b's middle to c's head", b_at + 200, c_at, None),
    ]:
        damaged = bytearray(whole)
        damaged[lo:hi] = bytes(hi - lo)
        seg.write_bytes(bytes(damaged))
        for p in (tmp_path / "blocks").glob("*.log"):
            if p != seg:
                p.unlink()
        for _again in range(2):  # the newest segment, then (after a put) an older one
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                again = BlockStore(tmp_path)
            assert "reported damaged" in caplog.text, what
            assert again.missing(_digests(a, c)) == [] and "rc" in again.records, what
            if lost is not None:
                assert again.missing(_digests(b)) == lost, what
            assert "rb" not in again.records or what == "b's head", what
            assert seg.read_bytes() == bytes(damaged[:s.head.size]), what  # only the zeros after the last append cut
            assert not list((tmp_path / "blocks").glob("*.corrupt-*")), what
            again.put(_blocks(1, rng))


def _puts_until(tmp_path, s: BlockStore, rng: random.Random, segments: int, record) -> list:
    """Puts of 4 blocks (and ``record()``) until there are ``segments`` segments, each put
    checked: the head's file is its appends and zeros, never past SEGMENT_BYTES."""
    puts = []
    while len(_segments(tmp_path)) < segments:
        puts.append(_blocks(4, rng))
        s.put(puts[-1], record())
        assert (tmp_path / "blocks" / s.head.name).stat().st_size == s.head.filled >= s.head.size
        assert s.head.filled <= max(s.head.size, blocklog.SEGMENT_BYTES)
    return puts


def test_the_head_is_cut_to_its_appends_when_the_next_segment_starts(tmp_path, monkeypatch):
    """Only the head carries zeros: at the roll (and after a failed append) the segment left is cut
    to its appends' end; the zeros never go past SEGMENT_BYTES; an older segment found with zeros
    after its appends anyway is read whole and left as it is."""
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", 6000)
    monkeypatch.setattr(blocklog, "PREFILL_BYTES", 2500)
    rng = random.Random(23)
    s = BlockStore(tmp_path)
    puts = _puts_until(tmp_path, s, rng, 4, lambda: None)
    for name in _segments(tmp_path)[:-1]:
        data = (tmp_path / "blocks" / name).read_bytes()
        assert len(data) == s.sizes[name] and data[-1] != 0  # cut at the roll
        assert not [e for e in blocklog.scan(data, name, False) if isinstance(e, blocklog.Bad)]
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", 1 << 20)  # (zeros past the size a segment rolls at:
    s.put(_blocks(2, rng))  # not written, but a head left with zeros is cut all the same)
    assert s.head.filled > s.head.size
    name, size = s.head.name, s.head.size
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", size)
    s.put(_blocks(2, rng))
    assert s.head.name != name and (tmp_path / "blocks" / name).stat().st_size == size == s.sizes[name]
    older = tmp_path / "blocks" / _segments(tmp_path)[0]
    with open(older, "ab") as f:  # zeros left after its appends (a cut that failed)
        f.write(bytes(100))
    again = BlockStore(tmp_path)
    assert older.stat().st_size == again.sizes[older.name] + 100
    assert again.missing(_digests(*puts)) == []


def test_compaction_into_a_pre_filled_head_counts_appends_not_zeros(tmp_path, monkeypatch):
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", 5000)
    monkeypatch.setattr(blocklog, "PREFILL_BYTES", 3000)
    rng = random.Random(24)
    s = BlockStore(tmp_path)
    first = _puts_until(tmp_path, s, rng, 2, lambda: _record(f"r{len(s.records)}", rng.randbytes(100)))
    old = _segments(tmp_path)[0]
    assert s.head.size < s.head.filled  # zeros ahead in the head the compaction appends to
    in_old = [dg for dg, (name, _o, _l) in s.index.items() if name == old]
    s.delete(in_old[1:])
    for rid in [rid for rid, r in s.records.items() if r.name == old][1:]:
        s.delete_record(rid)
    assert old not in _segments(tmp_path) and s.index[in_old[0]][0] == s.head.name  # moved
    head = tmp_path / "blocks" / s.head.name
    assert s.sizes[s.head.name] == s.head.size < head.stat().st_size  # its appends, the zeros after them
    assert s.wanted[s.head.name] <= s.head.size
    want = {dg: z for p in first for dg, z in p if dg in s.index}
    recs = {rid: s.read_record(rid) for rid in s.records}
    again = BlockStore(tmp_path)
    assert dict(again.get(list(want))) == want and {rid: again.read_record(rid) for rid in again.records} == recs
    assert again.check_records(1000) == []
    assert all(again.sizes[n] == (tmp_path / "blocks" / n).stat().st_size for n in _segments(tmp_path))


# ---------------------------------------------------------------------------------- records


def _record(rid: str, body: bytes) -> LogRecord:
    return LogRecord(rid, hashlib.sha256(body).hexdigest(), body)


def test_a_record_is_never_there_without_its_blocks_wherever_a_crash_cuts_their_append(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # (the cut's syncs: not what is tested here)
    monkeypatch.setattr(blocklog, "PREFILL_BYTES", 4096)  # (zeros ahead: fewer bytes to write at every cut)
    rng = random.Random(9)
    a, b = _blocks(3, rng), _blocks(4, rng)
    s = BlockStore(tmp_path)
    s.put(a)
    s.put(b, _record("r1", b"the record" * 40))
    seg = tmp_path / "blocks" / s.head.name
    filled = seg.stat().st_size
    data = seg.read_bytes()[:s.head.size]  # the appends (the pre-filled zeros after them)
    assert filled > len(data)
    start = max(off for _n, off, _l in (s.index[dg] for dg, _ in a)) + 1  # inside a's entry's last block...
    start = next(e.end for e in blocklog.scan(data) if e.at < start <= e.end)  # ...so the second append starts here
    for cut in range(start, len(data) + 1):
        for tail in (b"", bytes(len(data) - cut), bytes(filled - cut)):  # the file ends there, or zeros
            seg.write_bytes(data[:cut] + tail)
            again = BlockStore(tmp_path)
            if "r1" in again.records:
                assert again.missing([dg for dg, _ in b]) == [] and cut == len(data)
            assert again.missing([dg for dg, _ in a]) == []
    lost = bytearray(data)  # the record's page on disk, a page of the blocks before it not
    lost[start:start + 100] = bytes(100)
    seg.write_bytes(bytes(lost))
    again = BlockStore(tmp_path)
    assert "r1" not in again.records and again.missing([b[0][0]]) == [b[0][0]]


def test_rot_in_a_record_or_its_blocks_keeps_every_later_append_and_reports_the_damaged_ones(tmp_path):
    """Snapshots (blocks and record, one append each) in the newest segment; a byte of the
    middle one rots; at the restart everything after it is still served, verified, and the
    damaged part is reported as a scrub would report it (the record as corrupt, a block as
    dropped); the chunkserver takes the damaged record as one of its corrupt ones."""
    from kubegfs.chunkserver.server import Chunkserver
    from kubegfs.topology import Location

    rng = random.Random(14)
    s, puts, seg = _snapshots(tmp_path, rng, 3, 400)
    data = seg.read_bytes()
    r1 = s.records["r1"]
    b1 = puts[1][0][1][0]
    _n, blk_off, _ln = s.index[b1]
    for damage, at, corrupt, dropped in [("r1's bytes", r1.off + 200, {"r1"}, set()),
                                         ("r1's sha256", r1.off - 5, {"r1"}, set()),
                                         ("a block r1 reaches", blk_off + 2, set(), {b1})]:
        seg.write_bytes(_flip(data, at, 0x10))
        again = ChunkStore(tmp_path, 1 << 20)
        log = again.log
        assert seg.read_bytes() == _flip(data, at, 0x10)[:s.head.size], damage  # nothing cut but the zeros after
        assert log.damaged_records == corrupt and log.dropped == dropped, damage
        assert sorted(log.records) == sorted({"r0", "r1", "r2"} - corrupt), damage
        for rid in log.records:
            assert again.verify_record(rid), (damage, rid)
        held = [it for blocks, _rec in puts for it in blocks if it[0] not in dropped]
        assert log.get([dg for dg, _ in held]) == held  # each verified
        assert again.record("r2") == (puts[2][1].data, puts[2][1].sha256)
        cs = Chunkserver(tmp_path, "http://127.0.0.1:9", "t", "127.0.0.1:1", Location(), chunk_size=1 << 20)
        assert cs.corrupt_records == corrupt and cs.blocks.dropped == dropped
        cs.blocks.head.close()
    seg.write_bytes(data)


def test_the_records_check_goes_over_the_log_in_turn_and_names_the_rotted_ones(tmp_path):
    """What a heartbeat's records pass adds (server.RECORD_CHECK_COUNT a pass): a few records
    read and checked each time, in turn, so that rot is reported before the next scrub."""
    s = BlockStore(tmp_path)
    recs = [_record(f"r{i}", f"record {i} ".encode() * 30) for i in range(10)]
    for r in recs:
        s.put_record(r)
    assert [s.check_records(4) for _ in range(3)] == [[], [], []]  # 4 + 4 + 2: a cycle
    seg = tmp_path / "blocks" / s.head.name
    seg.write_bytes(_flip(seg.read_bytes(), s.records["r6"].off + 7))
    s.put_record(_record("r10", b"stored since" * 30))
    got = [s.check_records(4) for _ in range(4)]
    assert got == [[], ["r6"], [], []]  # r0-r3, r4-r7, r8-r10 (a new cycle: r10 too), r0-r3
    assert [s.check_records(100, {"r6"})] == [[]]  # (already reported: not read again)
    assert s.check_records(100) == ["r6"] and "r6" in s.records  # kept: the caller reports it


def test_a_deleted_record_stays_deleted_after_a_restart_and_one_stored_again_stays(tmp_path):
    s = BlockStore(tmp_path)
    one, two = _record("r1", b"first" * 50), _record("r1", b"second" * 50)
    s.put_record(one)
    s.put_record(_record("r2", b"other" * 50))
    assert s.delete_record("r1") and not s.delete_record("r1")
    assert "r1" not in BlockStore(tmp_path).records  # the tombstone, read back
    s = BlockStore(tmp_path)
    s.put_record(two)
    again = BlockStore(tmp_path)
    assert again.read_record("r1") == (two.data, two.sha256)  # the tombstone deletes only the copy it names
    assert again.read_record("r2")[0] == b"other" * 50


def test_compaction_moves_records_and_tombstones_and_unlinks_what_nothing_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", 1)  # a segment per append
    rng = random.Random(10)
    s = BlockStore(tmp_path)
    a, b = _blocks(3, rng), _blocks(20, rng)
    s.put(a, _record("r0", b"zero" * 10))  # segment 1
    s.put(b, _record("r2", b"two" * 10))  # segment 2
    s.delete_record("r0")  # segment 3: its tombstone, wanted while segment 1 is there
    assert _segments(tmp_path) == [blocklog.segment_name(n) for n in (1, 2, 3)]
    s.delete([dg for dg, _ in b])  # segment 2 under a quarter wanted: r2 moved to a new head
    assert blocklog.segment_name(2) not in _segments(tmp_path)
    assert s.read_record("r2")[0] == b"two" * 10
    again = BlockStore(tmp_path)
    assert set(again.records) == {"r2"} and again.read_record("r2")[0] == b"two" * 10
    s.delete([dg for dg, _ in a])  # segment 1 unwanted: unlinked, and with it the tombstone's need
    segs = _segments(tmp_path)
    assert blocklog.segment_name(1) not in segs and blocklog.segment_name(3) not in segs
    again = BlockStore(tmp_path)
    assert set(again.records) == {"r2"} and again.missing([dg for dg, _ in a + b]) == [dg for dg, _ in a + b]


def test_records_of_both_formats_side_by_side(tmp_path):
    old, new = b"old record" * 30, b"new record" * 30
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "old.rec").write_bytes(old)
    (tmp_path / "records" / "old.sha256").write_text(hashlib.sha256(old).hexdigest())
    s = ChunkStore(tmp_path, 1 << 20)
    s.put_record("new", iter([new]), hashlib.sha256(new).hexdigest())
    assert s.list_records() == ["new", "old"]
    assert s.record_digests() == {"old": [len(old), hashlib.sha256(old).hexdigest()],
                                  "new": [len(new), hashlib.sha256(new).hexdigest()]}
    src, sha = s.record("old")
    assert src == tmp_path / "records" / "old.rec" and sha == hashlib.sha256(old).hexdigest()
    assert s.record("new") == (new, hashlib.sha256(new).hexdigest())
    assert s.verify_record("old") and s.verify_record("new")
    with pytest.raises(NotFound):
        s.record("none")
    s.put_record("old", iter([old]), hashlib.sha256(old).hexdigest())  # stored again: into the log, the files go
    assert not (tmp_path / "records" / "old.rec").exists() and s.record("old")[0] == old
    s.delete_record("new")
    again = ChunkStore(tmp_path, 1 << 20)
    assert again.list_records() == ["old"] and again.record_sizes == {"old": len(old)}
