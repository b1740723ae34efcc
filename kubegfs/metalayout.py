"""The metadata directory layout, shared by the master's data dir and the copies of it that
chunkservers keep (``chunkserver/metastore.py``):

  ``log-<first seq, 20 digits>.wal``   framed msgpack op records (see formats.frame)
  ``checkpoint-<seq, 20 digits>.ckpt`` encoded MasterState as of op ``seq``
"""

from __future__ import annotations

from pathlib import Path


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
