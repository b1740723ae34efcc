"""The data port hands a piece's body on in parts of at least PART bytes, whatever the sizes the
socket delivers, and a body cut short is an error (kubegfs/chunkserver/dataport.py; a local
socket pair, no server)."""

import asyncio
import os
import socket

import pytest

from kubegfs.chunkserver import dataport
from kubegfs.chunkserver.dataport import BufferPool, receive


async def _parts(body: bytes, early: bytes, part: int, cut: bool = False) -> tuple[list[bytes], bytearray]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    n = len(early) + len(body)

    async def send() -> None:
        for i in range(0, len(body), 1000):  # in small pieces, with pauses
            await loop.sock_sendall(b, body[i : i + 1000])
            await asyncio.sleep(0)
        if cut:
            b.close()

    left = bytearray(early)
    buf = bytearray(n + 10)
    sender = asyncio.ensure_future(send())
    try:
        got = [bytes(p) async for p in receive(loop, a, memoryview(buf)[: n + (5 if cut else 0)], left, part)]
    finally:
        await sender
        a.close()
        if not cut:
            b.close()
    return got, left


def test_parts_are_at_least_part_bytes_and_make_up_the_body():
    body = os.urandom(50_000)
    got, left = asyncio.run(_parts(body, b"early", 8192))
    assert b"".join(got) == b"early" + body
    assert all(len(p) >= 8192 for p in got[:-1]) and len(got) > 1
    assert left == bytearray()


def test_bytes_of_the_next_request_that_came_early_stay_for_it():
    buf = bytearray(4)

    async def run() -> tuple[list[bytes], bytearray]:
        a, b = socket.socketpair()
        a.setblocking(False)
        early = bytearray(b"bodyPUT /next")
        try:
            parts = [bytes(p) async for p in receive(asyncio.get_running_loop(), a, memoryview(buf), early)]
        finally:
            a.close()
            b.close()
        return parts, early

    parts, early = asyncio.run(run())
    assert parts == [b"body"] and early == bytearray(b"PUT /next")


def test_a_body_cut_short_is_a_connection_error():
    with pytest.raises(ConnectionError):
        asyncio.run(_parts(os.urandom(20_000), b"", 4096, cut=True))


def test_the_buffer_pool_reuses_and_bounds_what_it_keeps():
    pool = BufferPool(16, keep=1)
    a, b = pool.take(), pool.take()
    pool.give(a)
    pool.give(b)  # beyond ``keep``: dropped
    assert pool.take() is a and len(pool.free) == 0


def test_a_connection_that_never_finishes_a_head_is_closed(monkeypatch):
    """Nothing has authenticated a connection before its head: one that trickles or idles is
    dropped after HEAD_TIMEOUT rather than held (and its socket kept) for ever."""
    monkeypatch.setattr(dataport, "HEAD_TIMEOUT", 0.2)

    async def scenario() -> bytes:
        async def accept(*args: object) -> dict[str, object]:
            raise AssertionError("no piece may be accepted")

        async def open_read(*args: object) -> object:
            raise AssertionError("nothing may be read")

        listener = dataport.DataListener(accept, {}, lambda cid: None, 1 << 20, BufferPool(1 << 20), open_read)
        port = await listener.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setblocking(False)
        try:
            await loop.sock_connect(s, ("127.0.0.1", port))
            await loop.sock_sendall(s, b"PUT /internal/chunks/00 HTTP/1.1\r\nHost: x\r\n")  # no blank line
            return await asyncio.wait_for(loop.sock_recv(s, 100), 5)  # b"": the server closed it
        finally:
            s.close()
            await listener.stop()

    assert asyncio.run(scenario()) == b""
