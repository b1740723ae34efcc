"""``kubegfs master recover``: rebuild a master that lost its data directory from the chunkservers.

Only a refusing master (or a provisional one with nothing in it) can be recovered; the cluster
to adopt is the one whose chunkservers it refused (``Guard.foreign``). Two sources, best first:

1. the metadata copies (``metareplica``): the newest complete checkpoint + op log found on the
   chunkservers, verified, replayed exactly as a local restart would;
2. otherwise the snapshot records: each record whose sha256 verifies becomes a catalog entry again
   (name, path, creation time, its chunks kept at the record's versions), so ``snapshot restore``
   brings its directory back. Files outside every snapshot cannot be rebuilt.

Crash safety: the old (empty) namespace is moved aside, the new one written through the op log
and a checkpoint, and only then is the identity switched to the adopted cluster. A master killed
before that still refuses after its restart, and ``recover`` can simply be run again. The new
namespace starts in safe mode with a fresh handle incarnation above every handle seen, so nothing
on the chunkservers is deleted or reused before they have reported.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
import uuid
from array import array
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .. import merkle, paths
from ..errors import Conflict, CorruptData, InvalidArgument, KubegfsError, from_json
from ..formats import pack_handles, sha256_hex
from ..snapobj import MANIFEST_VERSION, parse_manifest, parse_record, record_format
from ..web import CLUSTER_HEADER, field_str, json_response, peer_session, read_json, record_id
from . import metareplica, ops
from .identity import ForeignChunkserver
from .oplog import OpLog, RecoveryReport
from .state import MasterState, encode_block_infos

if TYPE_CHECKING:
    from .server import Master

log = logging.getLogger("kubegfs.master.recovery")

SOURCES = ("auto", "metadata", "records")


@dataclass
class Adopted:
    """One snapshot record that verified, and the chunkservers holding a good copy."""

    id: str
    header: dict[str, Any]
    sha256: str
    size: int
    handles: list[int]
    versions: list[int]
    files: int
    dirs: int
    holders: list[dict[str, Any]] = field(default_factory=list)
    root: bytes = b""  # format 3: the root block, and every block it reaches
    blocks: dict[bytes, merkle.BlockInfo] = field(default_factory=dict)


async def h_recover(m: Master, request: web.Request) -> web.Response:
    b = await read_json(request)
    want = field_str(b, "cluster_id", "", max_len=128)
    source = field_str(b, "from", "auto")
    if source not in SOURCES:
        raise InvalidArgument(f"from must be one of {', '.join(SOURCES)}")
    if m.guard.recovering:
        raise Conflict("a recovery is already running")
    st = m.state
    blank = m.guard.ident.provisional and st.n_files == 0 and not st.snapshots
    if not (m.guard.refusing or blank):
        raise Conflict(f"this master holds the namespace of cluster {m.guard.cluster_id}; recover only "
                       f"replaces an empty or refusing master")
    found = [f for f in m.guard.foreign.values() if not want or f.cluster_id == want]
    clusters = sorted({f.cluster_id for f in found})
    if not clusters:
        raise Conflict("no chunkserver of another cluster has contacted this master: nothing to recover "
                       "from yet (are the chunkservers running and pointed at this master?)")
    if len(clusters) > 1:
        raise InvalidArgument(f"chunkservers of several clusters reported ({', '.join(clusters)}): "
                              f"choose one with --cluster-id")
    m.guard.recovering = True
    try:
        result = await recover_from(m, clusters[0], found, source)
    finally:
        m.guard.recovering = False
    return json_response(result)


async def recover_from(m: Master, cluster: str, found: list[ForeignChunkserver], source: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    problems: list[str] = []
    async with peer_session(m.token, aiohttp.ClientTimeout(total=600, connect=5), {CLUSTER_HEADER: cluster}) as session:
        copy = None
        if source in ("auto", "metadata"):
            copy = await metareplica.fetch_newest(session, [f.address for f in found], m.data_dir, problems)
            if copy is None and source == "metadata":
                raise Conflict("no complete metadata copy on the chunkservers: " + ("; ".join(problems) or "none"))
        if copy is not None:
            summary = await _install_metadata(m, copy, found)
            history = copy.history
        else:
            adopted = await _collect_records(session, found, problems)
            summary = await _install_records(m, adopted, found)
            history = uuid.uuid4().hex  # a new log: the old copies are started over
    m.guard.adopt(cluster, history)
    await m.reset_session()
    seconds = time.perf_counter() - t0
    for p in problems:
        log.warning("recover: %s", p)
    log.info("recovered cluster %s from %s in %.3fs: %s", cluster, summary["source"], seconds, summary)
    return {"cluster_id": cluster, **summary, "problems": problems, "seconds": round(seconds, 3)}


def _move_aside(data_dir: Path) -> Path:
    """The namespace a refusing master made for itself goes to ``replaced-<time>/`` (kept)."""
    from ..fsutil import fsync_dir

    dst = data_dir / f"replaced-{time.time_ns()}"
    dst.mkdir()
    for p in [*data_dir.glob("log-*.wal*"), *data_dir.glob("checkpoint-*.ckpt*")]:
        p.rename(dst / p.name)
    fsync_dir(data_dir)
    return dst


async def _swap(m: Master, write: Any) -> None:
    """Close the log, move the old namespace aside, let ``write`` put the new files in place."""
    await m.oplog.drain()
    m.oplog.close()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _move_aside, m.data_dir)
    await loop.run_in_executor(None, write, m.data_dir)


async def _install_metadata(m: Master, copy: metareplica.MetaCopy, found: list[ForeignChunkserver]) -> dict[str, Any]:
    await _swap(m, copy.move_into)
    state, rep = copy.state, copy.report
    _reopen(m, state, rep)
    top = max([state.incarnation] + [f.max_incarnation for f in found])
    await m.mutate({"op": "incarnation", "n": top + 1})
    return {"source": "metadata", "from_chunkserver": copy.address, "seq": state.seq,
            "checkpoint_seq": rep.checkpoint_seq, "replayed": rep.replayed, "replay_seconds": round(rep.seconds, 3),
            "files": state.n_files, "snapshots": len(state.snapshots)}


def _reopen(m: Master, state: MasterState, rep: RecoveryReport) -> None:
    m.state = state
    m.recovery = rep
    m.oplog = OpLog(m.data_dir, state.seq + 1, fsync=m.opts.fsync, sync=m.oplog.sync)
    m.meta.attach(m.oplog)
    m.meta.targets.clear()
    m._ops_since_checkpoint = rep.replayed
    m.chunkmap.state = state
    m.chunkmap.locations.clear()
    m.chunkmap.dirty = True


async def _collect_records(session: aiohttp.ClientSession, found: list[ForeignChunkserver],
                           problems: list[str]) -> list[Adopted]:
    """Every record on the chunkservers whose copy verifies (sha256 and decode)."""
    listed: dict[str, list[ForeignChunkserver]] = {}
    for f in found:
        try:
            body = await _get_json(session, f"{f.address}/internal/records")
        except (TimeoutError, KubegfsError, aiohttp.ClientError, OSError) as exc:
            problems.append(f"{f.id}: cannot list records: {exc}")
            continue
        for rid in body.get("records") or []:
            listed.setdefault(record_id(str(rid)), []).append(f)
    loop = asyncio.get_running_loop()
    out: list[Adopted] = []
    for rid, fs in sorted(listed.items()):
        adopted: Adopted | None = None
        for f in fs:
            try:
                async with session.get(f"{f.address}/internal/records/{rid}") as resp:
                    if resp.status != 200:
                        raise from_json(resp.status, await resp.json(content_type=None))
                    data = await resp.read()
                    stored = resp.headers.get("X-Kubegfs-Sha256", "")
                sha = await loop.run_in_executor(None, sha256_hex, data)
                if sha != stored:
                    raise CorruptData(f"sha256 {sha[:12]}… differs from the stored {stored[:12]}…")
                if adopted is None and record_format(data) == MANIFEST_VERSION:
                    adopted = await _adopt_manifest(session, f, rid, data, sha)
                elif adopted is None:
                    parsed = await loop.run_in_executor(None, parse_record, data, sha)
                    hdr = parsed.header
                    if hdr.get("id") != rid or not isinstance(hdr.get("name"), str):
                        raise CorruptData("record header does not name this snapshot")
                    adopted = Adopted(rid, hdr, sha, len(data), [h for h, _ in parsed.chunks],
                                      [v for _, v in parsed.chunks], parsed.files, parsed.dirs)
                elif sha != adopted.sha256:
                    raise CorruptData("differs from another copy of the same snapshot")
                adopted.holders.append({"id": f.id, "address": f.address, "ip": "", "node": "", "zone": "",
                                        "region": "", **f.location, "reason": "adopted"})
            except (TimeoutError, KubegfsError, aiohttp.ClientError, OSError, ValueError) as exc:
                problems.append(f"snapshot record {rid} on {f.id} unusable: {exc}")
        if adopted is not None:
            out.append(adopted)
    return out


async def _adopt_manifest(session: aiohttp.ClientSession, f: ForeignChunkserver, rid: str, data: bytes,
                          sha: str) -> Adopted:
    """A format-3 record and the closure of its root, read from the same chunkserver level by
    level (each block verified against its digest)."""
    man = parse_manifest(data, sha)
    hdr = man.header
    if hdr.get("id") != rid or not isinstance(hdr.get("name"), str):
        raise CorruptData("record header does not name this snapshot")
    blocks: dict[bytes, merkle.BlockInfo] = {}
    handles: list[int] = []
    versions: list[int] = []
    level = [man.root]
    while level:
        need = [d for d in dict.fromkeys(level) if d not in blocks]
        level = []
        for i in range(0, len(need), 4096):
            part = need[i:i + 4096]
            async with session.post(f"{f.address}/internal/blocks/get",
                                    json={"digests": [d.hex() for d in part]}) as resp:
                if resp.status != 200:
                    raise from_json(resp.status, await resp.json(content_type=None))
                body = await resp.read()
            got = dict(merkle.unpack_frames(body))
            for d in part:
                if d not in got:
                    raise CorruptData(f"block {d.hex()[:16]}… missing from the answer")
                blk = merkle.decode_block(got[d], d)
                blocks[d] = merkle.block_info(got[d])
                for e in blk.entries.values():
                    if isinstance(e, merkle.FileEntry):
                        handles.extend(e.chunks)
                        versions.extend(e.versions)
                level.extend(blocks[d].children)
    return Adopted(rid, hdr, sha, len(data), handles, versions, int(hdr.get("files", 0)),
                   int(hdr.get("dirs", 0)), root=man.root, blocks=blocks)


async def _install_records(m: Master, adopted: list[Adopted], found: list[ForeignChunkserver]) -> dict[str, Any]:
    sizes = {int(a.header.get("chunk_size", 0)) for a in adopted} - {0}
    chunk_size = sizes.pop() if len(sizes) == 1 else m.state.chunk_size
    replication = m.state.replication
    await _swap(m, lambda _d: None)
    _reopen(m, MasterState(chunk_size, replication), RecoveryReport())
    await m.mutate({"op": "init", "chunk_size": chunk_size, "replication": replication})
    top = max(chain((f.max_incarnation for f in found), (h >> 32 for a in adopted for h in a.handles)), default=0)
    await m.mutate({"op": "incarnation", "n": top + 1})
    names: set[str] = set()
    skipped = []
    for a in sorted(adopted, key=lambda a: str(a.header.get("created", ""))):
        hdr = a.header
        name = str(hdr["name"])
        if name in names:
            skipped.append(a.id)
            continue
        names.add(name)
        parts = paths.split(str(hdr.get("path", "/")))
        if len(parts) > 1:
            await m.mutate({"op": "mkdir", "path": paths.join(parts[:-1]), "parents": True, "mode": 0o755,
                            "mtime": time.time_ns()})
        op = ops.SnapAdopt(
            op="snap_adopt", id=a.id, name=name, path=paths.join(parts),
            created=parse_rfc3339(str(hdr.get("created", ""))), epoch=int(hdr.get("epoch", 0)),
            sha256=a.sha256, record_bytes=a.size, holders=a.holders, files=a.files,
            dirs=a.dirs, logical_bytes=int(hdr.get("bytes", 0)),
            handles_z=pack_handles(a.handles), versions=array("q", a.versions).tobytes(),
        )
        if a.root:
            op["root"] = a.root.hex()
            op["blocks"] = encode_block_infos(a.blocks)
        await m.mutate(op)
    await m.checkpoint()
    return {"source": "records", "snapshots": len(names), "skipped_duplicate_names": skipped,
            "chunks": len(m.state.version), "chunk_size": chunk_size}


def parse_rfc3339(text: str) -> int:
    """``state.rfc3339``'s text back to nanoseconds (millisecond precision); 0 if unreadable."""
    try:
        base, _, frac = text.rstrip("Z").partition(".")
        secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0
    ms = int(frac[:3].ljust(3, "0")) if frac[:3].isdigit() else 0
    return secs * 1_000_000_000 + ms * 1_000_000


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200:
            raise from_json(resp.status, body)
        return body
