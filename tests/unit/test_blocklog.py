"""The block log (kubegfs/chunkserver/blocklog.py) and the block store on it: framing, a torn last
entry cut at every byte, a damaged entry mid-file, segments rolled, unlinked and compacted, the
older pack files read beside the log."""

from __future__ import annotations

import logging
import os
import random

import pytest

from kubegfs import merkle
from kubegfs.chunkserver import blocklog
from kubegfs.chunkserver.blocks import PACK_MAGIC, BlockStore


def _blocks(n: int, rng: random.Random) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(n):
        data = rng.randbytes(rng.randrange(1, 300))
        out.append((merkle.block_digest(data), merkle.compress(data)))
    return out


def _segment(*puts: list[tuple[bytes, bytes]]) -> tuple[bytes, list[int]]:
    """A segment holding one entry per put, and where each entry starts."""
    data = bytearray(blocklog.SEGMENT_MAGIC)
    starts = []
    for items in puts:
        starts.append(len(data))
        data += b"".join(blocklog.entry(blocklog.frames(items)[0]))
    return bytes(data), starts


def _segments(tmp_path):
    return sorted(p.name for p in (tmp_path / "blocks").glob("*.log"))


def test_an_entry_frames_its_blocks_and_the_scan_finds_each_where_it_is():
    rng = random.Random(1)
    a, b = _blocks(3, rng), _blocks(4, rng)
    data, starts = _segment(a, b)
    got = list(blocklog.scan(data))
    assert [at for at, _n, _b in got] == starts
    assert [at + n for at, n, _b in got] == [*starts[1:], len(data)]
    blocks = [blk for _at, _n, bl in got for blk in bl]
    assert [(dg, data[off:off + ln]) for dg, off, ln in blocks] == a + b


def test_a_torn_last_entry_is_dropped_at_every_byte_it_can_be_cut_at(tmp_path, caplog):
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
            assert s.get([dg for dg, _ in a]) == a
    assert "nothing after it is read" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # in the newest segment: a warning
    seg.write_bytes(data)
    assert sorted(BlockStore(tmp_path).digests()) == sorted(dg for dg, _ in a + b)


def test_a_damaged_entry_stops_the_scan_and_nothing_after_it_is_taken(tmp_path, caplog):
    """Also the crash order the log relies on: a later entry whose pages reached the disk while an
    earlier one's did not is never taken (a record is stored only after its blocks' entry)."""
    rng = random.Random(3)
    a, b, c = _blocks(2, rng), _blocks(2, rng), _blocks(2, rng)
    data, starts = _segment(a, b, c)
    (tmp_path / "blocks").mkdir()
    seg = tmp_path / "blocks" / blocklog.segment_name(1)
    bad = bytearray(data)
    bad[starts[1] + blocklog.ENTRY_HEAD + 40] ^= 0x01  # a bit of b's first block
    seg.write_bytes(bytes(bad))
    (tmp_path / "blocks" / blocklog.segment_name(2)).write_bytes(blocklog.SEGMENT_MAGIC)  # seg: not the newest
    with caplog.at_level(logging.ERROR):
        s = BlockStore(tmp_path)
    assert sorted(s.digests()) == sorted(dg for dg, _ in a)
    assert "fails its checksum" in caplog.text and caplog.records[-1].levelno == logging.ERROR
    lost = bytearray(data)
    lost[starts[1]:starts[2]] = bytes(starts[2] - starts[1])  # b's pages lost, c's on disk
    seg.write_bytes(bytes(lost))
    assert sorted(BlockStore(tmp_path).digests()) == sorted(dg for dg, _ in a)


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
    real = os.fdatasync

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(OSError):
        s.put(b)
    monkeypatch.setattr(os, "fdatasync", real)
    assert s.missing([dg for dg, _ in b]) == [dg for dg, _ in b]  # not acknowledged, not indexed
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
