"""Short-circuit local reads (HDFS's ``dfs.client.read.shortcircuit``): the wire format of a
chunkserver's Unix domain socket, and the host identity that tells a client it shares a host
with a chunkserver. The chunkserver's side is kubegfs/chunkserver/shortcircuit.py, the client's
kubegfs/localread.py.

A client on the same host as a chunkserver holding a chunk asks that chunkserver, over a
``SOCK_SEQPACKET`` Unix socket, for the chunk file's descriptor; the answer carries it
(``SCM_RIGHTS``) with the chunk's version, its durable length and its stored block CRCs, and the
client then reads the file itself with ``os.preadv`` and checks every 64 KiB block's CRC before
a byte is handed out, as it checks a block received over TCP (kubegfs/rangecrc.py). No byte goes
through the chunkserver or a TCP socket.

One request per connection. A request is one msgpack map, ``{"token": str, "handle": int,
"version": int}`` (``version``: the one the master named; the chunkserver's must be ≥ it); an
answer is one msgpack map: ``{"ok": true, "id": <chunkserver id>, "handle", "version",
"length", "crcs": <4 bytes big-endian per block>}`` with exactly one descriptor attached, or
``{"ok": false, "status": <HTTP status>, "error": <code>, "message": str}`` with none. Never
pickle; the maps are checked field by field (``parse_request``, ``parse_grant``).

How a client knows it is local: the chunkserver's main-port read answers name the socket
(``X-Kubegfs-Local-Socket``) and the host (``X-Kubegfs-Host``: ``host_id()``); a client uses the
socket only if its own ``host_id()`` is the same and the answer over the socket names the
replica the master named (``id``).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack

from .errors import CorruptData, InvalidArgument, KubegfsError, from_json

SOCKET_HEADER = "X-Kubegfs-Local-Socket"  # a main-port read answer: the chunkserver's Unix socket
HOST_HEADER = "X-Kubegfs-Host"  # ... and the host it runs on (host_id())
MAX_REQUEST = 4096  # a request is a token and two integers
MAX_ANSWER = 1 << 20  # 4 bytes per 64 KiB block: a 16 GiB chunk's CRCs
HOST_ENV = "KUBEGFS_HOST_ID"  # overrides host_id() (e.g. the Kubernetes node name where pods share a socket)


def host_id() -> str:
    """This host's identity: the kernel's boot id (unique per boot of a machine) and the host
    name, or ``$KUBEGFS_HOST_ID``. Two processes with the same one can share a file
    descriptor's file system; a container with its own UTS namespace has another host name, so
    it is not taken for local unless the environment says so."""
    if env := os.environ.get(HOST_ENV, "").strip():
        return env
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot}/{socket.gethostname()}" if boot else ""


@dataclass(frozen=True)
class Request:
    token: str
    handle: int
    version: int


@dataclass(frozen=True)
class Grant:
    """What a descriptor comes with: the bytes ``[0, length)`` of the chunk at ``version`` and
    the CRC of each of their blocks (the last one may be short)."""

    cs_id: str
    handle: int
    version: int
    length: int
    crcs: array  # array("I"), host byte order


def encode_request(r: Request) -> bytes:
    return bytes(msgpack.packb({"token": r.token, "handle": r.handle, "version": r.version}))


def parse_request(raw: bytes) -> Request:
    """InvalidArgument unless ``raw`` is exactly the request's map."""
    if len(raw) > MAX_REQUEST:
        raise InvalidArgument("short-circuit request too large")
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise InvalidArgument("a short-circuit request is one msgpack map") from None
    if not isinstance(m, dict) or set(m) != {"token", "handle", "version"}:
        raise InvalidArgument("a short-circuit request is {token, handle, version}")
    tok, h, v = m["token"], m["handle"], m["version"]
    if not isinstance(tok, str) or not _uint(h, 64) or not _uint(v, 63):
        raise InvalidArgument("token must be a string, handle and version non-negative integers")
    return Request(tok, h, v)


def encode_grant(g: Grant) -> bytes:
    crcs = array("I", g.crcs)
    if sys.byteorder == "little":
        crcs.byteswap()
    return bytes(msgpack.packb({"ok": True, "id": g.cs_id, "handle": g.handle, "version": g.version,
                                "length": g.length, "crcs": crcs.tobytes()}, use_bin_type=True))


def encode_refusal(err: KubegfsError) -> bytes:
    return bytes(msgpack.packb({"ok": False, "status": err.status, **err.to_json()}, use_bin_type=True))


def parse_answer(raw: bytes) -> Grant:
    """The grant in an answer; the refusal it carries as its KubegfsError; CorruptData for
    anything else."""
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise CorruptData("a short-circuit answer is one msgpack map") from None
    if not isinstance(m, dict):
        raise CorruptData("a short-circuit answer is one msgpack map")
    if m.get("ok") is False:
        status = m.get("status")
        raise from_json(status if isinstance(status, int) and 400 <= status < 600 else 500,
                        {k: v for k, v in m.items() if k in ("error", "message")})
    cid, h, v, n, raw_crcs = (m.get(k) for k in ("id", "handle", "version", "length", "crcs"))
    if (m.get("ok") is not True or not isinstance(cid, str) or not _uint(h, 64) or not _uint(v, 63)
            or not _uint(n, 63) or not isinstance(raw_crcs, bytes) or len(raw_crcs) % 4):
        raise CorruptData("malformed short-circuit answer")
    crcs = array("I")
    if crcs.itemsize != 4:  # pragma: no cover - every platform CPython runs on has 4-byte unsigned ints
        crcs = array("I", struct.unpack(f">{len(raw_crcs) // 4}I", raw_crcs))
    else:
        crcs.frombytes(raw_crcs)
        if sys.byteorder == "little":
            crcs.byteswap()
    return Grant(cid, h, v, n, crcs)


def _uint(x: Any, bits: int) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < (1 << bits)
