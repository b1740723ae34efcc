"""The small helpers every harness, benchmark and test needs: a free loopback port, polling for a
condition, waiting for an HTTP endpoint to answer, finding a chunkserver's copy of a snapshot record
on its disk. Standard library only (plus kubegfs)."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubegfs.chunkserver import blocklog

# One implementation of the port checks: the product's own, which `kubegfs local up` uses.
from kubegfs.local import free_port, port_free

__all__ = ["answered", "bearer", "free_port", "port_free", "wait_for", "wait_http"]


def bearer(token: str) -> dict[str, str]:
    """The headers that authenticate a request to a kubegfs server (for tests that call one
    directly, e.g. a chunkserver's /internal API)."""
    return {"Authorization": f"Bearer {token}"}


def wait_for(predicate: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError otherwise.

    The timeout is a safety net against hangs, not an assertion about speed: pick it generously.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def answered(status: int, body: str) -> bool:
    """The default readiness test of :func:`wait_http`: the server answered, and not with a 5xx."""
    return status < 500


def wait_http(url: str, *, timeout: float = 30.0, ok: Callable[[int, str], bool] = answered,
              context: ssl.SSLContext | None = None, alive: Callable[[], object] | None = None,
              interval: float = 0.1) -> str:
    """Poll ``GET url`` until ``ok(status, body)`` holds; return the body.

    ``alive`` is called before every try and should raise when the process that is meant to
    answer has exited, so a crash fails at once with its own message instead of at the timeout.
    Raises TimeoutError (with the last answer or connection error) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if alive is not None:
            alive()
        try:
            status, body = _get(url, context)
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        else:
            if ok(status, body):
                return body
            last = f"HTTP {status}: {body[:300]}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.0f}s (last: {last})")
        time.sleep(interval)


def _get(url: str, context: ssl.SSLContext | None) -> tuple[int, str]:
    """One GET: (status, body), error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def block_copies(chunkserver_urls: list[str], token: str, digest_hex: str) -> int:
    """How many of the chunkservers hold the directory block ``digest_hex`` (each answers 200
    with the verified block or 404)."""
    n = 0
    for url in chunkserver_urls:
        req = urllib.request.Request(f"{url}/internal/blocks/get", method="POST",
                                     data=json.dumps({"digests": [digest_hex]}).encode(),
                                     headers={**bearer(token), "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                n += resp.status == 200
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
    return n


def stored_records(data_dir: Path) -> dict[str, tuple[Path, int, int]]:
    """Every snapshot record a chunkserver keeps on disk, read without changing anything: its id
    -> (file, offset, length) of its copy in the log (``blocks/*.log``: the last one no tombstone
    deletes) or of the file an earlier version stored it in (``records/<id>.rec``)."""
    found: dict[str, tuple[Path, int, int]] = {}
    segs = sorted(data_dir.glob("blocks/*.log"))
    for p in segs:
        for e in blocklog.scan(p.read_bytes(), p.name, p == segs[-1]):
            if isinstance(e, blocklog.Bad):
                continue
            if e.kind == blocklog.RECORD:
                found[e.rid] = (p, e.off, e.length)
            elif e.kind == blocklog.TOMBSTONE and e.rid in found \
                    and (found[e.rid][0].name, found[e.rid][1]) == (e.target, e.off):
                del found[e.rid]
    for f in data_dir.glob("records/*.rec"):
        found.setdefault(f.stem, (f, 0, f.stat().st_size))
    return found


def stored_record(data_dir: Path, rid: str) -> tuple[Path, int, int] | None:
    """``stored_records``' place of record ``rid``, or None if the chunkserver has none."""
    return stored_records(data_dir).get(rid)


def stored_record_bytes(data_dir: Path, rid: str) -> bytes | None:
    """The bytes of ``stored_record``'s copy, or None."""
    where = stored_record(data_dir, rid)
    if where is None:
        return None
    with open(where[0], "rb") as f:
        f.seek(where[1])
        return f.read(where[2])


def damage_record(data_dir: Path, rid: str, at: int, mask: int = 0xFF) -> None:
    """Flip the bits ``mask`` of byte ``at`` (from the end if negative) of a chunkserver's copy of
    record ``rid``, in place, as if it had rotted."""
    where = stored_record(data_dir, rid)
    assert where is not None, f"no record {rid} in {data_dir}"
    path, off, n = where
    pos = off + (at % n)
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def damage_block(data_dir: Path, digest: bytes) -> int:
    """Flip a byte of directory block ``digest`` wherever a chunkserver's log (or a pack of an
    earlier version) holds it, in place, as if it had rotted; how many copies were hit."""
    hit = 0
    for f in [*data_dir.glob("blocks/*.log"), *data_dir.glob("blocks/*.pack")]:
        raw = bytearray(f.read_bytes())
        pos = raw.find(digest)
        if pos >= 0:
            ln = int.from_bytes(raw[pos + 32:pos + 36], "little")
            raw[pos + 36 + ln // 2] ^= 0xFF
            f.write_bytes(bytes(raw))
            hit += 1
    return hit
