"""HTTP routes of a chunkserver's metadata copy (``metastore``), used by the master's
``metareplica`` to ship checkpoints and op-log batches and by ``recover`` to read them back.

The master's group-committed batches arrive on one persistent WebSocket per copy
(``/internal/meta/stream``, the format in ``metalayout``): the event loop hands each batch to the
stream's writer thread (``StreamWriter``) as it arrives, the thread writes what queued up
meanwhile with one fdatasync, and each write is answered in order with the copy's ``last_seq``.
A bad batch is answered with its error and the stream closed (the master drops the copy out of
sync and rebuilds it).

The same stream is served on the chunkserver's data port (``dataport.py``, plain TCP), which the
inventory names (``stream_port``): after its head (token, cluster and ``history`` checked as on
the main port) the connection belongs to one thread (``serve_lean_stream``) that reads a batch
from the socket, writes what has arrived with one fdatasync and sends the answer itself, with no
event loop, task or thread hand-off per batch (the framing is ``metalayout``'s ``lean_*``)."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import InvalidArgument, KubegfsError, PayloadTooLarge
from ..metalayout import lean_answer, lean_refusal, take_lean_messages, unpack_stream_batch
from ..web import json_response, query_int
from .metastore import LogBatch, MetaStore

log = logging.getLogger("kubegfs.chunkserver.metaapi")

MAX_META_BODY = 1 << 34  # a checkpoint of a very large namespace
MAX_STREAM_MESSAGE = 1 << 30  # one group-committed batch of the master's log


def add_routes(app: web.Application, store: MetaStore, stream_port: Callable[[], int | None] = lambda: None) -> None:
    """``stream_port``: the data port that serves the stream too (``serve_lean_stream``), if any."""
    api = _Api(store, stream_port)
    app.on_shutdown.append(api.close_streams)  # an open stream would hold a graceful stop
    router = app.router
    router.add_get("/internal/meta", api.inventory)
    router.add_post("/internal/meta/reset", api.reset)
    router.add_post("/internal/meta/log", api.append)
    router.add_get("/internal/meta/stream", api.stream)
    router.add_put("/internal/meta/checkpoints/{seq}", api.put_checkpoint)
    router.add_get("/internal/meta/checkpoints/{seq}", api.get_checkpoint)
    router.add_get("/internal/meta/log", api.get_log)


class _Api:
    def __init__(self, store: MetaStore, stream_port: Callable[[], int | None]) -> None:
        self.store = store
        self.stream_port = stream_port
        self.streams: set[web.WebSocketResponse] = set()

    async def close_streams(self, _app: web.Application) -> None:
        for ws in list(self.streams):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"chunkserver stopping")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @staticmethod
    def _history(request: web.Request) -> str:
        return check_history(request.query.get("history", ""))

    @staticmethod
    def _sha(request: web.Request) -> str:
        sha = request.headers.get("X-Kubegfs-Sha256", "")
        if len(sha) != 64:
            raise InvalidArgument("missing or malformed X-Kubegfs-Sha256 header")
        return sha

    async def inventory(self, request: web.Request) -> web.Response:
        inv = await self._run(self.store.inventory)
        port = self.stream_port()
        if port is not None:
            inv["stream_port"] = port
        return json_response(inv)

    async def reset(self, request: web.Request) -> web.Response:
        base = query_int(request, "base", None, 0)
        await self._run(self.store.reset, self._history(request), base)
        return json_response({"history": self.store.history, "last_seq": self.store.last_seq})

    async def append(self, request: web.Request) -> web.Response:
        first = query_int(request, "first", None, 1)
        last = query_int(request, "last", None, 1)
        if last < first:
            raise InvalidArgument("last must not be below first")
        data = await _body(request)
        got = await self._run(self.store.append, self._history(request), first, last, data, self._sha(request))
        return json_response({"last_seq": got})

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        history = self._history(request)
        ws = web.WebSocketResponse(max_msg_size=MAX_STREAM_MESSAGE, autoping=True)
        await ws.prepare(request)
        self.streams.add(ws)
        writer = StreamWriter(self.store, history, asyncio.get_running_loop())
        answering = asyncio.create_task(_answer(ws, writer.answers))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    break
                try:
                    first, last, sha, data = unpack_stream_batch(msg.data)
                except ValueError as exc:
                    await _refuse(ws, InvalidArgument(str(exc)))
                    break
                writer.put(LogBatch(first, last, data, sha))
        finally:
            writer.close()
            try:
                await answering
            finally:
                self.streams.discard(ws)
                await ws.close()
        return ws

    async def put_checkpoint(self, request: web.Request) -> web.Response:
        seq = _seq(request)
        data = await _body(request)
        await self._run(self.store.put_checkpoint, self._history(request), seq, data, self._sha(request))
        return json_response({"checkpoint": seq}, status=201)

    async def get_checkpoint(self, request: web.Request) -> web.StreamResponse:
        path = self.store.checkpoint_path(_seq(request))
        return await _send_files(request, [(path, path.stat().st_size)])

    async def get_log(self, request: web.Request) -> web.StreamResponse:
        return await _send_files(request, self.store.log_extent())


def check_history(h: str) -> str:
    if not h or len(h) > 128:
        raise InvalidArgument("history is required (at most 128 characters)")
    return h


def _batch(msg: bytes) -> LogBatch:
    first, last, sha, data = unpack_stream_batch(msg)
    return LogBatch(first, last, data, sha)


def serve_lean_stream(store: MetaStore, sock: socket.socket, history: str, early: bytes) -> None:
    """The stream on the data port, in a thread of its own that owns ``sock`` (blocking) until
    the master closes it or a batch is refused: each turn reads at least one whole message
    (``early``: bytes that came with the head), takes whatever else has arrived, verifies and
    writes them with one ``append_many`` (one fdatasync) and answers the copy's last seq; a bad
    message or a refused write is answered with its error, and the stream ends."""
    sock.setblocking(True)
    buf = bytearray(early)
    while True:
        got: int | KubegfsError
        try:
            msgs = take_lean_messages(buf)
            while not msgs:
                data = sock.recv(1 << 20)
                if not data:
                    return
                buf += data
                msgs = take_lean_messages(buf)
            while True:  # what else is already here shares the write (the master sends more only after an answer in sync)
                try:
                    data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    break
                buf += data
                msgs += take_lean_messages(buf)
            batches = [_batch(m) for m in msgs]
        except ValueError as exc:
            got = InvalidArgument(str(exc))
        except OSError:
            return  # the master went away
        else:
            try:
                got = store.append_many(history, batches)
            except KubegfsError as exc:
                got = exc
            except OSError as exc:
                got = KubegfsError(f"metadata copy write failed: {exc}")
        try:
            if isinstance(got, KubegfsError):
                log.warning("metadata stream from the master refused: %s", got.message)
                body = got.to_json()
                body["status"] = got.status
                sock.sendall(lean_refusal(body))
                return
            sock.sendall(lean_answer(got))
        except OSError:
            return


class StreamWriter:
    """The writer thread of one stream: it writes what queued up since its last write with one
    ``append_many`` (one fdatasync) and puts each result on ``answers`` (the event loop's), in
    order: the new ``last_seq``, or the error that refused the write, after which it stops; None
    once ``close`` was reached. The event loop only hands batches over (no task or executor
    future per write) and never waits for the disk."""

    def __init__(self, store: MetaStore, history: str, loop: asyncio.AbstractEventLoop) -> None:
        self.answers: asyncio.Queue[int | KubegfsError | None] = asyncio.Queue()
        self._store = store
        self._history = history
        self._loop = loop
        self._inbox: queue.SimpleQueue[LogBatch | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="meta-stream-writer", daemon=True).start()

    def put(self, b: LogBatch) -> None:
        self._inbox.put(b)

    def close(self) -> None:
        """Write what was put, then stop."""
        self._inbox.put(None)

    def _take(self) -> tuple[list[LogBatch], bool]:
        """Everything queued up (waiting for the first), and False once ``close`` was reached."""
        first = self._inbox.get()
        if first is None:
            return [], False
        batches = [first]
        while True:
            try:
                b = self._inbox.get_nowait()
            except queue.Empty:
                return batches, True
            if b is None:
                return batches, False
            batches.append(b)

    def _run(self) -> None:
        more = True
        while more:
            batches, more = self._take()
            if not batches:
                break
            got: int | KubegfsError
            try:
                got = self._store.append_many(self._history, batches)
            except KubegfsError as exc:
                got, more = exc, False
            except OSError as exc:
                got, more = KubegfsError(f"metadata copy write failed: {exc}"), False
            self._answer(got)
        self._answer(None)

    def _answer(self, got: int | KubegfsError | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.answers.put_nowait, got)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody to answer
            pass


async def _answer(ws: web.WebSocketResponse, answers: asyncio.Queue[int | KubegfsError | None]) -> None:
    """Send the writer's answers in order; a refusal closes the stream."""
    while (got := await answers.get()) is not None:
        if isinstance(got, KubegfsError):
            await _refuse(ws, got)
            return
        try:
            await ws.send_str(json.dumps({"last_seq": got}))
        except (ConnectionError, RuntimeError):  # the master went away: nothing to answer
            return


async def _refuse(ws: web.WebSocketResponse, exc: KubegfsError) -> None:
    log.warning("metadata stream from the master refused: %s", exc.message)
    if not ws.closed:
        body = exc.to_json()
        body["status"] = exc.status
        await ws.send_str(json.dumps(body))
        await ws.close()


async def _body(request: web.Request) -> bytes:
    """The whole body, streamed (the app's client_max_size is sized for chunk pieces)."""
    if request.content_length is not None and request.content_length > MAX_META_BODY:
        raise PayloadTooLarge(f"body larger than {MAX_META_BODY} bytes")
    pieces = []
    n = 0
    async for piece in request.content.iter_chunked(1 << 20):
        n += len(piece)
        if n > MAX_META_BODY:
            raise PayloadTooLarge(f"body larger than {MAX_META_BODY} bytes")
        pieces.append(piece)
    return b"".join(pieces)


def _seq(request: web.Request) -> int:
    raw = request.match_info["seq"]
    if not raw.isdigit() or len(raw) > 20:
        raise InvalidArgument("seq must be a non-negative integer")
    return int(raw)


async def _send_files(request: web.Request, files: list[tuple[Path, int]]) -> web.StreamResponse:
    """The first ``n`` bytes of each file, one after the other (the records of the log segments
    concatenate into one valid log; the open segment's pre-filled zeros are left out)."""
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await resp.prepare(request)
    for path, n in files:
        with open(path, "rb") as f:
            while n > 0 and (piece := f.read(min(n, 1 << 20))):
                n -= len(piece)
                await resp.write(piece)
    await resp.write_eof()
    return resp
