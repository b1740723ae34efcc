"""The metadata directory layout, shared by the master's data dir and the copies of it that
chunkservers keep (``chunkserver/metastore.py``):

  ``log-<first seq, 20 digits>.wal``   framed msgpack op records (see formats.frame)
  ``checkpoint-<seq, 20 digits>.ckpt`` encoded MasterState as of op ``seq``
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

# the op-log stream from the master to a copy (``/internal/meta/stream``, a WebSocket): each
# binary message is one group-committed batch, ``_STREAM_HEAD`` (first seq, last seq, sha256 of
# the records) then the framed records; the copy answers, in order, with a JSON text message
# ``{"last_seq": n}`` once the batch is fdatasynced, or with an error object and closes.
_STREAM_HEAD = struct.Struct(">QQ32s")

# The same stream on a chunkserver's data port (``POST /internal/meta/stream``, plain TCP once
# its head is answered 200): each message is ``_LEAN_LEN`` (its length) then the WebSocket's
# binary message; each answer is ``_LEAN_SEQ`` (the copy's last seq), or ``LEAN_REFUSED`` then
# ``_LEAN_LEN`` and the error object as JSON, after which the copy closes the connection.
_LEAN_LEN = struct.Struct(">I")
_LEAN_SEQ = struct.Struct(">Q")
LEAN_REFUSED = (1 << 64) - 1
LEAN_MAX_MESSAGE = 1 << 30  # one group-committed batch of the master's log
LEAN_MAX_REFUSAL = 1 << 16  # a copy's error object (the master buffers it whole)


def lean_message(msg: bytes) -> bytes:
    return _LEAN_LEN.pack(len(msg)) + msg


def take_lean_messages(buf: bytearray) -> list[bytes]:
    """Pop the whole messages at the front of ``buf`` (a partial one stays); ValueError for a
    length over ``LEAN_MAX_MESSAGE``."""
    out: list[bytes] = []
    at = 0
    while len(buf) - at >= _LEAN_LEN.size:
        (n,) = _LEAN_LEN.unpack_from(buf, at)
        if n > LEAN_MAX_MESSAGE:
            raise ValueError(f"op-log stream message of {n} bytes (at most {LEAN_MAX_MESSAGE})")
        if len(buf) - at - _LEAN_LEN.size < n:
            break
        at += _LEAN_LEN.size
        out.append(bytes(buf[at:at + n]))
        at += n
    del buf[:at]
    return out


def lean_answer(last_seq: int) -> bytes:
    return _LEAN_SEQ.pack(last_seq)


def lean_refusal(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return _LEAN_SEQ.pack(LEAN_REFUSED) + _LEAN_LEN.pack(len(raw)) + raw


def take_lean_answers(buf: bytearray) -> tuple[list[int], dict[str, Any] | None]:
    """Pop the whole answers at the front of ``buf``: the seqs, then the refusal's error object
    if one came whole (nothing follows a refusal). ValueError for a refusal that is not a JSON
    object or says it is longer than ``LEAN_MAX_REFUSAL`` (it is not waited for)."""
    seqs: list[int] = []
    at = 0
    refusal: dict[str, Any] | None = None
    while len(buf) - at >= _LEAN_SEQ.size:
        (seq,) = _LEAN_SEQ.unpack_from(buf, at)
        if seq != LEAN_REFUSED:
            seqs.append(seq)
            at += _LEAN_SEQ.size
            continue
        start = at + _LEAN_SEQ.size
        if len(buf) - start < _LEAN_LEN.size:
            break
        (n,) = _LEAN_LEN.unpack_from(buf, start)
        if n > LEAN_MAX_REFUSAL:
            raise ValueError(f"op-log stream refusal of {n} bytes (at most {LEAN_MAX_REFUSAL})")
        if len(buf) - start - _LEAN_LEN.size < n:
            break
        body = json.loads(bytes(buf[start + _LEAN_LEN.size:start + _LEAN_LEN.size + n]))
        if not isinstance(body, dict):
            raise ValueError("op-log stream refusal is not a JSON object")
        refusal = body
        at = start + _LEAN_LEN.size + n
        break
    del buf[:at]
    return seqs, refusal


def seq_of(p: Path) -> int:
    return int(p.stem.split("-", 1)[1])


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:020d}.ckpt"


def segment_name(first_seq: int) -> str:
    return f"log-{first_seq:020d}.wal"


def write_over_zeros(fd: int, data: bytes, end: int, filled: int, ahead: int) -> int:
    """Write ``data`` at ``end`` (the records' end) of a pre-filled log segment; when it would pass
    ``filled`` (where the zeros end) zeros follow it, ``ahead`` bytes past it, in the same write.
    Returns the new ``filled``. The caller's fdatasync then flushes the data and, only when the
    zeros were extended, a new size and new blocks: later batches just overwrite zeros, so their
    fdatasync needs no journal commit (on ext4 those commits queue behind each other, and the
    master's log and two copies' logs share one disk in a small cluster)."""
    stop = end + len(data)
    if stop > filled:
        filled = stop + ahead
        data += bytes(filled - stop)
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, end)
        view, end = view[n:], end + n
    return filled


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
