"""The checkpoint codec: a ``MasterState`` as of one op, encoded for the data directory, and
``dump``, the deterministic comparable form the tests and ``/admin/dump`` use.

A checkpoint is a formats container (``CKPT_MAGIC``) with a CRC trailer: header (seq, epoch,
incarnation, handle counter, chunk size, replication, clone count), the tree in breadth-first
columns, the chunk table as four parallel int64 columns (handle, version, birth epoch, snapshot
references), the snapshot catalog, the remembered restores and the directory blocks snapshots
reach (digest, child digests, the chunk handles of its own files, reference count). Live references are not stored:
they are recounted from the tree on decode.
"""

from __future__ import annotations

import zlib
from array import array
from collections import Counter
from typing import Any

from .. import namespace as ns
from ..errors import CorruptData
from ..formats import (
    CKPT_MAGIC,
    check_crc_trailer,
    decode_tree,
    encode_tree,
    read_container,
    with_crc_trailer,
    write_container,
)
from .state import BlockCount, MasterState, decode_block_infos

CHECKPOINT_VERSION = 2  # 2: breadth-first tree columns


def encode_checkpoint(view: dict[str, Any]) -> bytes:
    version = view["version"]
    cols, _ = encode_tree(view["root"], lambda h: version.get(h, 0))
    handles = sorted(version)
    chunk_cols = {
        "handles": array("q", handles).tobytes(),
        "version": array("q", [version[h] for h in handles]).tobytes(),
        "born": array("q", [view["born"].get(h, 0) for h in handles]).tobytes(),
        "snap": array("q", [view["snap"].get(h, 0) for h in handles]).tobytes(),
    }
    header = {k: view[k] for k in ("seq", "epoch", "incarnation", "next_counter", "chunk_size", "replication", "cow_clones")}
    body = {"tree": cols, "chunks": chunk_cols, "snapshots": view["snapshots"],
            "restores": view.get("restores", {}), "blocks": view.get("blocks", []),
            "block_refs": view.get("block_refs", [])}
    return with_crc_trailer(write_container(CKPT_MAGIC, CHECKPOINT_VERSION, header, body))


def decode_checkpoint(data: bytes) -> MasterState:
    version, header, body = read_container(CKPT_MAGIC, check_crc_trailer(data))
    if version != CHECKPOINT_VERSION:
        raise CorruptData(f"unsupported checkpoint version {version}")
    st = MasterState(header["chunk_size"], header["replication"])
    for k in ("seq", "epoch", "incarnation", "next_counter", "cow_clones"):
        setattr(st, k, header[k])
    dec = decode_tree(body["tree"], long_lived=True)
    if not isinstance(dec.root, ns.Dir):
        raise CorruptData("checkpoint root is not a directory")
    st.root = dec.root
    cc = body["chunks"]
    cols = {}
    for k in ("handles", "version", "born", "snap"):
        a = array("q")
        a.frombytes(cc[k])
        cols[k] = a
    n = len(cols["handles"])
    if not len(cols["version"]) == len(cols["born"]) == len(cols["snap"]) == n:
        raise CorruptData("checkpoint chunk columns disagree in length")
    # whole columns at once (C loops): the chunk table of 1M files in ~0.1 s. Every table is
    # keyed by the int objects the tree's files already hold (one object per handle, not three:
    # 64 B a chunk), a handle no file holds (only snapshots do) by one of its own
    hl = dec.handles
    st.live = dict(Counter(hl))
    same = dict(zip(hl, hl, strict=True))
    handles = list(map(same.get, cols["handles"], cols["handles"]))
    del same
    st.version = dict(zip(handles, cols["version"], strict=True))
    # a chunk's birth epoch is only ever compared with the epoch of a pending capture (is it
    # older: shared, so written copy-on-write / not freed yet); every capture from now on gets
    # an epoch above the current one, so each birth epoch up to it answers as "older" just as
    # a missing entry (0) does: none is kept (a whole table: ~40 MiB per million chunks)
    st.born = {h: b for h, b in zip(handles, cols["born"], strict=True) if b > st.epoch}
    st.snap = {h: s for h, s in zip(handles, cols["snap"], strict=True) if s}
    st.restores = dict(body.get("restores") or {})
    infos = decode_block_infos(body.get("blocks") or [])
    refs = body.get("block_refs") or []
    if len(refs) != len(infos):
        raise CorruptData("checkpoint block table and its counts disagree")
    for (dg, info), n in zip(sorted(infos.items()), refs, strict=True):
        st.blocks[dg] = BlockCount(n, info)
    st.n_files, st.n_dirs, st.n_bytes = dec.files, dec.dirs, dec.size  # what recount() would walk
    for e in body["snapshots"]:
        st.snapshots[e["id"]] = e
        st.snapshot_names[e["name"]] = e["id"]
    st.catalog_gen += 1
    return st


def dump(state: MasterState) -> dict[str, Any]:
    """A deterministic, comparable dump of the durable state (tests compare these)."""
    tree = []
    for parts, node in ns.walk(state.root):
        if isinstance(node, ns.File):
            tree.append(["/" + "/".join(parts), "f", node.size, node.mode, node.mtime, list(node.chunks)])
        else:
            tree.append(["/" + "/".join(parts), "d", node.mode])
    snaps = sorted(
        ({k: v for k, v in e.items() if k != "handles_z"} for e in state.snapshots.values()),
        key=lambda e: str(e["id"]),
    )
    return {
        "tree": tree,
        "version": sorted(state.version.items()),
        "live": sorted(state.live.items()),
        "snap": sorted(state.snap.items()),
        "snapshots": snaps,
        "epoch": state.epoch,
        "restores": sorted(state.restores),
        "blocks": sorted((d.hex(), b.refs) for d, b in state.blocks.items()),
        "counts": [state.n_files, state.n_dirs, state.n_bytes],
        "crc": zlib.crc32(repr(tree).encode()),
    }
