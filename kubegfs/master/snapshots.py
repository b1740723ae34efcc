"""Snapshots (HDFS's SnapshotManager): capture, build and ship the SnapObj record, delete,
restore, and keeping each record's copies whole.

Capture is one logged op that pins the current immutable root (O(1)); the record is built from
that pinned view off the event loop (in a forked child by default) and shipped to the nearest
chunkservers by the topology, then committed to the catalog. A restore reads the nearest good
copy and applies it as one op. Every copy is checked against the catalog (size, sha256, presence)
at each heartbeat and on every read; a bad one is dropped from the catalog, deleted through the
deletion gate and re-made from a good one by ``repair_records``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import merkle, paths, snapdiff
from .. import metrics as M
from .. import namespace as ns
from ..errors import (
    AlreadyExists,
    Conflict,
    CorruptData,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_json,
)
from ..snapobj import ParsedRecord, build_record, build_record_in_child, parse_record
from ..topology import Location, diversify, find_nearest
from ..web import PEER_ERRORS
from .chunkmap import ChunkserverInfo
from .state import now_ns

if TYPE_CHECKING:
    from .server import Master

log = logging.getLogger("kubegfs.master")


def diff_nodes(a: merkle.DirRef, va: merkle.VersionOf, b: merkle.DirRef, vb: merkle.VersionOf
               ) -> list[snapdiff.Change]:
    """Diff two trees held in memory (every reference carries its node)."""
    def load(refs: list[merkle.DirRef]) -> list[merkle.Block]:
        out = []
        for i, r in enumerate(refs):  # the walk asks for (a, b) pairs
            assert r.node is not None
            out.append(merkle.block_of(r.node, va if i % 2 == 0 else vb))
        return out

    return snapdiff.run(snapdiff.diff_steps(a, b), load)


class Snapshots:
    def __init__(self, m: Master) -> None:
        self.m = m
        self.builders: dict[str, asyncio.Task[Any]] = {}
        self._bad_record_copies: dict[str, set[str]] = {}  # snapshot id -> servers whose copy rotted
        self._record_missing: dict[tuple[str, str], int] = {}  # (server, snapshot id) -> heartbeats without it
        # soft: each path's newest snapshot tree this master built (digests memoised), so the next
        # snapshot of that path reports what changed since without reading anything back
        self.latest: dict[str, tuple[str, ns.Dir]] = {}

    def snap_json(self, e: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in e.items() if k not in ("handles_z", "created_ns")}
        out["live_copies"] = self.live_copies(e)
        return out

    def live_copies(self, e: dict[str, Any]) -> int:
        """Holders of a record copy that are alive (each copy is checked against the catalog at
        every heartbeat, see _check_record_copies)."""
        return sum(1 for h in e["holders"] if h["id"] in self.m.chunkmap.cs and self.m.chunkmap.cs[h["id"]].alive)

    def under_copied(self) -> int:
        n = sum(1 for e in self.m.state.snapshots.values()
                if e["state"] == "ready" and self.live_copies(e) < e["copies"])
        M.M_SNAP_UNDER_COPIED.set(n)
        return n

    async def create(self, sid: str, name: str, path: str, copies: int, targets: list[str],
                     near: dict[str, Any], labels: dict[str, str], wait: float) -> dict[str, Any]:
        """Capture a snapshot (O(1), logged), build and ship its record in the background; wait
        up to ``wait`` seconds for it. An existing ``sid`` with the same name and path is a retry."""
        st = self.m.state
        if sid in st.snapshots:
            e = st.snapshots[sid]
            if e["name"] != name or e["path"] != path:
                raise Conflict(f"snapshot id {sid} already exists with another name or path")
            await self.wait_built(sid, wait)
            e = st.snapshots[sid]
            return e
        if name in st.snapshot_names:
            raise AlreadyExists(f"a snapshot named {name!r} already exists")
        st.lookup(path)  # must exist
        op = {"op": "snap_capture", "id": sid, "name": name, "path": path, "created": now_ns(),
              "copies": copies, "targets": targets, "near": Location.from_json(near).to_json(),
              "labels": labels}
        await self.m.mutate(op, apply_seconds=M.M_SNAP_CAPTURE)  # O(1): pins the current immutable root
        self.start_builder(sid)
        await self.wait_built(sid, wait)
        e = st.snapshots[sid]
        return e

    async def wait_built(self, sid: str, wait: float) -> None:
        """Long poll: give a small snapshot the chance to be ready in the same request."""
        task = self.builders.get(sid)
        if wait > 0 and task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), wait)

    def start_builder(self, sid: str) -> None:
        if sid not in self.builders or self.builders[sid].done():
            self.builders[sid] = asyncio.create_task(self.build(sid))

    def rank_holders(self, entry: dict[str, Any]) -> list[tuple[ChunkserverInfo, str]]:
        ref = Location.from_json(entry.get("near")) if entry.get("near") else self.m.location
        if not (ref.node or ref.zone or ref.region or ref.ip):
            ref = self.m.location
        alive = {c.id: c for c in self.m.chunkmap.alive()}
        ranked = find_nearest(ref, [c.candidate() for c in alive.values()])
        targets = entry.get("targets") or []
        if targets:
            by_addr = {c.address: c.id for c in alive.values()}
            by_addr.update({urlsplit(c.address).hostname or "": c.id for c in alive.values()})
            order = [by_addr.get(t, t) for t in targets]
            pos = {cid: i for i, cid in enumerate(order)}
            ranked.sort(key=lambda r: pos.get(r.candidate.id, len(order)))
        ranked = diversify(ranked, entry["copies"]) if not targets else ranked
        return [(alive[r.candidate.id], r.reason) for r in ranked]

    async def build(self, sid: str) -> None:
        st = self.m.state
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.m.opts.snapshot_retry_seconds
        loop = asyncio.get_running_loop()
        try:
            entry = st.snapshots[sid]
            pin = st.pins[sid]
            meta = {k: entry[k] for k in ("id", "name", "path", "created", "epoch")}
            meta["chunk_size"] = st.chunk_size
            if self.m.opts.fork_builds:
                rec = await loop.run_in_executor(None, build_record_in_child, meta, pin.node,
                                                 st.version.__getitem__, self.m.data_dir / "scratch")
            else:
                rec = await loop.run_in_executor(None, build_record, meta, pin.node, st.version.__getitem__)
            root_hex, changes = await self.since_previous(entry, pin.node)
            t_built = time.perf_counter()
            holders: list[dict[str, Any]] = []
            last_err = "no live chunkserver"
            delay = 0.5
            headers = {"X-Kubegfs-Sha256": rec.sha256, "X-Kubegfs-Snapshot-Name": entry["name"],
                       "X-Kubegfs-Created": entry["created"]}

            async def ship(cs: ChunkserverInfo, reason: str) -> dict[str, Any] | None:
                nonlocal last_err
                try:
                    await self.m.call_cs(cs, "PUT", f"/internal/records/{sid}", data=rec.data, headers=headers)
                except PEER_ERRORS as exc:
                    last_err = f"{cs.id}: {exc}"
                    log.warning("snapshot %s: shipping to %s failed: %s", sid, cs.id, exc)
                    return None
                cs.records.add(sid)
                self.m.outbox.cancel(cs.id, "record", sid)
                return {"id": cs.id, "address": cs.address, **cs.location.to_json(), "reason": reason}

            while True:
                # ship to the nearest candidates at once; fall back down the ranking for failures
                tried: set[str] = set()
                while len(holders) < entry["copies"]:
                    todo = [(cs, why) for cs, why in self.rank_holders(entry)
                            if cs.id not in tried and all(h["id"] != cs.id for h in holders)]
                    todo = todo[: entry["copies"] - len(holders)]
                    if not todo:
                        break
                    tried |= {cs.id for cs, _ in todo}
                    done = await asyncio.gather(*(ship(cs, why) for cs, why in todo))
                    holders += [h for h in done if h is not None]
                if holders or time.monotonic() > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            # keep the ranking's order (nearest first) whatever order the copies finished in
            rank = {cs.id: i for i, (cs, _why) in enumerate(self.rank_holders(entry))}
            holders.sort(key=lambda h: rank.get(h["id"], len(rank)))
            if not holders:
                await self.m.mutate({"op": "snap_fail", "id": sid, "error": f"no chunkserver took the record: {last_err}"})
                M.M_SNAP_RESULT.labels("failed").inc()
                return
            dur = time.perf_counter() - t0
            t_shipped = time.perf_counter()
            # count the snapshot's chunk references in slices so writers never wait long; the
            # snapshot is still pending, so every chunk in it is treated as shared meanwhile
            for i in range(0, len(rec.handles), 20_000):
                st.count_snapshot_refs(rec.handles[i : i + 20_000])
                await asyncio.sleep(0)
            await self.m.mutate({
                "op": "snap_commit", "id": sid, "sha256": rec.sha256, "record_bytes": len(rec.data),
                "holders": holders, "files": rec.counts["files"], "dirs": rec.counts["dirs"],
                "chunks": rec.counts["chunks"], "logical_bytes": rec.counts["bytes"],
                "duration_seconds": round(dur, 6), "handles_z": rec.handles_z,
                "location_reason": holders[0]["reason"], "_precounted": True,
                "root": root_hex, "changes": changes,
            })
            if isinstance(pin.node, ns.Dir):
                self.latest[entry["path"]] = (sid, pin.node)
            M.M_SNAP_BUILD.observe(dur)
            M.M_SNAP_RECORD.observe(len(rec.data))
            M.M_SNAP_RESULT.labels("success").inc()
            log.info("snapshot %s (%s) of %s ready: %d files, %d record bytes on %s in %.3fs "
                     "(built %.3fs, shipped %.3fs, committed %.3fs)",
                     entry["name"], sid, entry["path"], rec.counts["files"], len(rec.data),
                     ",".join(h["id"] for h in holders), time.perf_counter() - t0, t_built - t0,
                     t_shipped - t_built, time.perf_counter() - t_shipped)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("snapshot %s failed", sid)
            if sid in st.pins:
                await self.m.mutate({"op": "snap_fail", "id": sid, "error": str(exc)})
                M.M_SNAP_RESULT.labels("failed").inc()
        finally:
            self.builders.pop(sid, None)

    def _live_version(self, h: int) -> int:
        return self.m.state.version.get(h, 0)

    async def tree_ref(self, e: dict[str, Any]) -> tuple[merkle.DirRef, merkle.VersionOf]:
        """Snapshot ``e``'s root directory (digest memoised on its nodes) and its chunk versions."""
        loop = asyncio.get_running_loop()
        if e["state"] != "ready":
            raise Conflict(f"snapshot {e['name']} is {e['state']}, not ready")
        cached = self.latest.get(e["path"])
        if cached is not None and cached[0] == e["id"]:
            root: ns.Node = cached[1]
            version_of: merkle.VersionOf = self._live_version
        else:
            parsed, _blob, _src = await self.fetch_record(e)
            versions = dict(parsed.chunks)
            root, version_of = parsed.root, versions.__getitem__
        if not isinstance(root, ns.Dir):
            raise InvalidArgument(f"snapshot {e['name']} is of a file; diff compares directories")
        dg = await loop.run_in_executor(None, merkle.digest, root, version_of)
        return merkle.DirRef(dg, root), version_of

    async def diff(self, ref: str, to: str | None) -> dict[str, Any]:
        """The changes from snapshot ``ref`` to snapshot ``to`` (or to the live tree at ``ref``'s
        path): only directories whose digests differ are read."""
        t0 = time.perf_counter()
        st = self.m.state
        a = st.snapshot_by_ref(ref)
        b = st.snapshot_by_ref(to) if to is not None else None
        ref_a, va = await self.tree_ref(a)
        if b is not None:
            ref_b, vb = await self.tree_ref(b)
        else:
            node = ns.must_get(st.root, paths.split(a["path"]))
            if not isinstance(node, ns.Dir):
                raise InvalidArgument(f"{a['path']} is not a directory now")
            vb = self._live_version
            ref_b = merkle.DirRef(await asyncio.get_running_loop().run_in_executor(None, merkle.digest, node, vb), node)
        changes = await asyncio.get_running_loop().run_in_executor(None, diff_nodes, ref_a, va, ref_b, vb)
        return {"from": a["name"], "to": b["name"] if b is not None else "", "path": a["path"],
                "to_path": b["path"] if b is not None else a["path"],
                "changes": [c.to_json() for c in changes], "summary": snapdiff.summarize(changes).to_json(),
                "seconds": round(time.perf_counter() - t0, 6)}

    def previous_of(self, e: dict[str, Any]) -> tuple[str, ns.Dir] | None:
        """The newest snapshot tree of ``e``'s path this master built, if still in the catalog."""
        prev = self.latest.get(e["path"])
        if prev is None or prev[0] == e["id"]:
            return None
        pe = self.m.state.snapshots.get(prev[0])
        return prev if pe is not None and pe["state"] == "ready" else None

    async def since_previous(self, entry: dict[str, Any], node: ns.Node) -> tuple[str, dict[str, Any]]:
        """The pinned tree's root digest (hex) and what changed since the previous snapshot of
        the same path (counts of the diff report; empty when that tree is not in memory)."""
        if not isinstance(node, ns.Dir):
            return "", {}
        loop = asyncio.get_running_loop()
        version_of = self.m.state.version.__getitem__  # the pin protects every chunk it reaches
        dg = await loop.run_in_executor(None, merkle.digest, node, version_of)
        prev = self.previous_of(entry)
        if prev is None:
            return dg.hex(), {}
        pe = self.m.state.snapshots[prev[0]]
        pa = merkle.DirRef(merkle.digest(prev[1], self._live_version), prev[1])
        changes = await loop.run_in_executor(None, diff_nodes, pa, self._live_version,
                                             merkle.DirRef(dg, node), version_of)
        return dg.hex(), {"since": pe["name"], "since_id": pe["id"], **snapdiff.summarize(changes).to_json()}

    async def delete(self, ref: str) -> dict[str, Any]:
        e = self.m.state.snapshot_by_ref(ref)
        if e["state"] == "pending":
            raise Conflict(f"snapshot {e['name']} is still being taken; delete it when it is ready")
        await self.m.mutate({"op": "snap_delete", "id": e["id"]})
        if self.latest.get(e["path"], ("",))[0] == e["id"]:
            del self.latest[e["path"]]
        for h in e.get("holders", []):  # the copies go with the holders' next heartbeats
            if h["id"] in self.m.chunkmap.cs:
                self.m.outbox.order(h["id"], "record", e["id"])
        return {"deleted": e["name"], "id": e["id"]}

    async def fetch_record(self, e: dict[str, Any]) -> tuple[ParsedRecord, bytes, dict[str, Any]]:
        """The record from the nearest healthy holder; fall back on error or bad checksum."""
        holders = []
        for h in e.get("holders", []):
            cs = self.m.chunkmap.cs.get(h["id"])
            if cs and cs.alive:
                holders.append(cs)
        ranked = find_nearest(self.m.location, [c.candidate() for c in holders])
        errors = []
        bad = 0
        assert self.m._session is not None
        loop = asyncio.get_running_loop()
        for r in ranked:
            cs = self.m.chunkmap.cs[r.candidate.id]
            try:
                async with self.m._session.get(f"{cs.address}/internal/records/{e['id']}") as resp:
                    if resp.status != 200:
                        raise from_json(resp.status, await resp.json(content_type=None))
                    data = await resp.read()
                parsed = await loop.run_in_executor(None, parse_record, data, e["sha256"])
                return parsed, data, {"id": cs.id, "address": cs.address, **cs.location.to_json()}
            except (NotFound, CorruptData, ValueError) as exc:  # the copy itself is bad: heal the catalog
                errors.append(f"{cs.id}: {exc}")
                bad += 1
                why = "missing" if isinstance(exc, NotFound) else "not the catalog's bytes"
                await self.drop_record_copy(e["id"], cs.id, why)
                if why != "missing":
                    self.m.outbox.order(cs.id, "record", e["id"])
            except PEER_ERRORS as exc:
                log.warning("snapshot %s: copy on %s unusable: %s", e["id"], cs.id, exc)
                errors.append(f"{cs.id}: {exc}")
        if (ranked and bad == len(ranked)) or (not e.get("holders") and self._bad_record_copies.get(e["id"])):
            raise Unavailable(f"every record copy of snapshot {e['name']} is missing or damaged"
                              + (": " + "; ".join(errors) if errors else ""))
        raise Unavailable(f"no usable copy of snapshot {e['name']}: " + ("; ".join(errors) or "no live holder"))

    async def restore(self, ref: str, rid: str, to: str | None) -> dict[str, Any]:
        """Restore snapshot ``ref`` in place (``to`` None) or to the new path ``to``; ``rid``
        names the request so a retry answers with the first result instead of restoring again."""
        t0 = time.perf_counter()
        if rid and rid in self.m.state.restores:
            return self.repeated_restore(rid, ref, to)
        e = self.m.state.snapshot_by_ref(ref)
        if e["state"] != "ready":
            raise Conflict(f"snapshot {e['name']} is {e['state']}, not ready")
        if to is not None:
            parts = paths.split(to)
            mode = "new"
        else:
            parts = paths.split(e["path"])
            mode = "inplace"
        self.check_target(parts, mode)
        parsed, blob, source = await self.fetch_record(e)
        self.check_target(parts, mode)  # re-check: the namespace may have moved on meanwhile
        st = self.m.state
        missing = [h for h, _v in parsed.chunks if h not in st.version]
        if missing:
            raise CorruptData(f"snapshot references {len(missing)} chunks the master no longer has")
        if mode == "inplace":
            self.m.leases.check_none_below(paths.join(parts))
        if rid and rid in self.m.state.restores:  # a concurrent twin finished first
            return self.repeated_restore(rid, ref, to)
        summary = {"snapshot": e["name"], "snapshot_id": e["id"], "path": paths.join(parts), "mode": mode,
                   "source": source, "duration_seconds": round(time.perf_counter() - t0, 6)}
        result = await self.m.mutate({"op": "restore", "id": e["id"], "path": paths.join(parts), "mode": mode,
                                    "blob": blob, "mtime": now_ns(), "_parsed": parsed, "rid": rid,
                                    "summary": summary})
        return {**summary, **result}

    def repeated_restore(self, rid: str, ref: str, to: str | None) -> dict[str, Any]:
        """The stored result of restore ``rid``, if this request asks for the same thing."""
        done = self.m.state.restores[rid]
        same = ref in (done.get("snapshot"), done.get("snapshot_id")) and (
            done.get("mode") == "inplace" if to is None else (done.get("mode") == "new" and done.get("path") == to))
        if not same:
            raise Conflict(f"restore id {rid} was already used to restore {done.get('snapshot')} to {done.get('path')}")
        return {**done, "repeated": True}

    def check_target(self, parts: tuple[str, ...], mode: str) -> None:
        st = self.m.state
        if not parts:
            if mode == "new":
                raise InvalidArgument("cannot restore to /")
            return
        ns.must_dir(st.root, parts[:-1])
        if mode == "new" and ns.get(st.root, parts) is not None:
            raise AlreadyExists(f"restore target {paths.join(parts)} already exists")

    async def check_record_copies(self, cs: ChunkserverInfo, digests: dict[str, Any]) -> set[str]:
        """Compare the records a holder reports with the catalog: a copy missing from two
        heartbeats in a row (one may predate a copy just shipped), of the wrong size or with
        another sha256 is dropped and re-made elsewhere. Returns the ids whose bad copy to delete."""
        bad: set[str] = set()
        for e in list(self.m.state.snapshots.values()):
            if e["state"] != "ready" or all(h["id"] != cs.id for h in e["holders"]):
                continue
            key = (cs.id, e["id"])
            if e["id"] not in cs.records:
                self._record_missing[key] = self._record_missing.get(key, 0) + 1
                if self._record_missing[key] >= 2:
                    await self.drop_record_copy(e["id"], cs.id, "missing")
                continue
            self._record_missing.pop(key, None)
            d = digests.get(e["id"])
            if not (isinstance(d, list) and len(d) == 2):
                continue
            if d[0] != e["record_bytes"]:
                why = "truncated" if isinstance(d[0], int) and d[0] < e["record_bytes"] else "wrong size"
            elif d[1] and d[1] != e["sha256"]:
                why = "not the catalog's bytes"
            else:
                continue
            await self.drop_record_copy(e["id"], cs.id, why)
            bad.add(e["id"])
        return bad

    async def drop_record_copy(self, sid: str, cid: str, why: str) -> None:
        """Take ``cid`` out of snapshot ``sid``'s holders (logged); record repair re-makes the copy."""
        e = self.m.state.snapshots.get(sid)
        if e is None or all(h["id"] != cid for h in e["holders"]):
            return
        log.error("snapshot %s: the record copy on %s is %s; dropped, re-copying from a good one",
                  e["name"], cid, why)
        M.M_RECORD_DROPPED.labels(why).inc()
        self._record_missing.pop((cid, sid), None)
        self._bad_record_copies.setdefault(sid, set()).add(cid)
        self.m.chunkmap.dirty = True
        await self.m.mutate({"op": "snap_holders", "id": sid,
                           "holders": [h for h in e["holders"] if h["id"] != cid]})

    async def repair_records(self) -> int:
        """Bring every ready snapshot back to its number of record copies (e.g. after a holder
        died, lost its disk or reported its copy corrupt), each new copy in a new zone if any."""
        made = 0
        for e in list(self.m.state.snapshots.values()):
            if e["state"] != "ready":
                continue
            live = [h for h in e["holders"] if h["id"] in self.m.chunkmap.cs and self.m.chunkmap.cs[h["id"]].alive]
            if len(live) >= e["copies"] or not live:
                if not live and e["holders"]:
                    log.error("snapshot %s has no live record copy", e["name"])
                continue
            held = {h["id"] for h in e["holders"]}
            zones = {(h.get("region", ""), h.get("zone", "")) for h in live}
            options = [(cs, why) for cs, why in self.rank_holders({**e, "targets": []})
                       if cs.id not in held and not self.m.outbox.pending(cs.id, "record", e["id"])]
            rotted = self._bad_record_copies.get(e["id"], set())
            # prefer a new zone, and a disk that did not just corrupt this record
            options.sort(key=lambda o: (o[0].id in rotted, (o[0].location.region, o[0].location.zone) in zones))
            if not options:
                self.m.chunkmap.dirty = True
                continue
            target, why = options[0]
            try:
                _parsed, data, _src = await self.fetch_record(e)
                await self.m.call_cs(target, "PUT", f"/internal/records/{e['id']}", data=data,
                                   headers={"X-Kubegfs-Sha256": e["sha256"]})
            except PEER_ERRORS as exc:
                M.M_RECORD_REPAIRS.labels("failed").inc()
                log.warning("re-copying snapshot %s to %s failed: %s", e["name"], target.id, exc)
                self.m.chunkmap.dirty = True
                continue
            self.m.outbox.cancel(target.id, "record", e["id"])
            cur = self.m.state.snapshots.get(e["id"])
            if cur is None:
                continue
            holder = {"id": target.id, "address": target.address, **target.location.to_json(), "reason": why}
            await self.m.mutate({"op": "snap_holders", "id": e["id"], "holders": cur["holders"] + [holder]})
            target.records.add(e["id"])
            M.M_RECORD_REPAIRS.labels("success").inc()
            log.info("snapshot %s: record re-copied to %s (%s)", e["name"], target.id, target.location.zone)
            made += 1
        return made
