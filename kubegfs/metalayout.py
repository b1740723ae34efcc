"""The metadata directory layout, shared by the master's data dir and the copies of it that
chunkservers keep (``chunkserver/metastore.py``):

  ``log-<first seq, 20 digits>.wal``   framed msgpack op records (see formats.frame)
  ``checkpoint-<seq, 20 digits>.ckpt`` encoded MasterState as of op ``seq``
"""

from __future__ import annotations

import struct
from pathlib import Path

# the op-log stream from the master to a copy (``/internal/meta/stream``, a WebSocket): each
# binary message is one group-committed batch, ``_STREAM_HEAD`` (first seq, last seq, sha256 of
# the records) then the framed records; the copy answers, in order, with a JSON text message
# ``{"last_seq": n}`` once the batch is fdatasynced, or with an error object and closes.
_STREAM_HEAD = struct.Struct(">QQ32s")


def seq_of(p: Path) -> int:
    return int(p.stem.split("-", 1)[1])


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:020d}.ckpt"


def segment_name(first_seq: int) -> str:
    return f"log-{first_seq:020d}.wal"


def prune_superseded(data_dir: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` checkpoints and the log segments they still need."""
    cks = sorted(data_dir.glob("checkpoint-*.ckpt"))
    for old in cks[:-keep]:
        old.unlink(missing_ok=True)
    kept = sorted(data_dir.glob("checkpoint-*.ckpt"))
    if len(kept) < 2:
        return  # keep the whole log until there is an older checkpoint to fall back on
    oldest_kept = seq_of(kept[0])
    segs = sorted(data_dir.glob("log-*.wal"))
    # a segment can go when the next one starts at or before the oldest kept checkpoint: if the
    # newest checkpoint is ever unreadable, the older one plus the log after it still recover all
    for seg, nxt in zip(segs, segs[1:], strict=False):
        if seq_of(nxt) <= oldest_kept + 1:
            seg.unlink(missing_ok=True)


def pack_stream_batch(first: int, last: int, sha256: str, data: bytes) -> bytes:
    return _STREAM_HEAD.pack(first, last, bytes.fromhex(sha256)) + data


def unpack_stream_batch(msg: bytes) -> tuple[int, int, str, bytes]:
    """(first, last, sha256 hex, records); ValueError when the message is too short or the
    range is empty."""
    if len(msg) < _STREAM_HEAD.size:
        raise ValueError("op-log stream message shorter than its header")
    first, last, sha = _STREAM_HEAD.unpack_from(msg)
    if first < 1 or last < first:
        raise ValueError(f"op-log stream batch has a bad range {first}..{last}")
    return first, last, sha.hex(), msg[_STREAM_HEAD.size:]
