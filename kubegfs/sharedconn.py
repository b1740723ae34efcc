"""One pipelined keep-alive connection per process to a master's lean listener, shared by every
thread and every ``Client`` of the process, for the read-only calls it serves (stat, ls,
stat_many), as every HDFS client of one JVM shares one RPC connection to the NameNode.

On loopback and on a busy node, a small call's cost is mostly the two sides' socket calls and
wake-ups, not their Python. So the calls of concurrent threads are batched: the thread that
finds the connection idle becomes its *leader*; it sends every queued request in one write and
reads the answers in order, handing each to its caller (which sleeps on a lock meanwhile); the
master answers a batch from one read with one write (kubegfs/master/fastpath.py). When the
leader's own answer is in, it passes the lead to the oldest waiting caller, or leaves the
connection idle. A lone thread is its own leader every time: one write and one read per call,
as on a connection of its own.

A broken connection fails every call sent or queued on it with ``ConnectionError``; they are
read-only, so the caller may ask again (a new connection is made for the next call). After a
fork the child starts with no connections (the parent's socket is not shared).
"""

from __future__ import annotations

import os
import threading
from collections import deque

from . import httpconn

SPIN = 200e-6  # a lone caller polls this long for its answer before sleeping (httpconn._poll)


class _Call:
    __slots__ = ("request", "wake", "answer", "error", "lead")

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.wake = threading.Lock()
        self.wake.acquire()  # released once: answered, failed, or made the leader
        self.answer: httpconn.Response | None = None
        self.error: str | None = None  # why the connection broke before the answer came
        self.lead = False


class SharedConnection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self._mu = threading.Lock()
        self._conn: httpconn.Connection | None = None  # touched by the leader only
        self._unsent: list[bytes] = []
        self._calls: deque[_Call] = deque()  # sent or queued, in the order of their requests
        self._led = False
        self._tails: dict[tuple[tuple[str, str], ...], bytes] = {}  # httpconn.head_fields, by headers

    def call(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> httpconn.Response:
        """One request's answer (any status); ConnectionError if the connection broke."""
        key = tuple(headers.items())
        tail = self._tails.get(key)
        if tail is None:
            if len(self._tails) >= 8:
                self._tails.clear()
            tail = self._tails[key] = httpconn.head_fields(self.host_header, headers)
        head = httpconn.head_with(tail, method, target, len(body) if body else 0)
        me = _Call(head + body if body else head)
        with self._mu:
            self._unsent.append(me.request)
            self._calls.append(me)
            lead = not self._led
            self._led = True
        if not lead:
            me.wake.acquire()  # the leader's socket calls time out, so this ends
            if not me.lead:
                return self._outcome(me)
        self._lead(me)
        return self._outcome(me)

    def _outcome(self, me: _Call) -> httpconn.Response:
        if me.answer is None:
            raise ConnectionError(f"shared connection to {self.host_header}: {me.error}")
        return me.answer

    def _lead(self, me: _Call) -> None:
        """Send and read until ``me`` is answered, then hand the connection on."""
        try:
            while me.answer is None and me.error is None:
                with self._mu:
                    batch, self._unsent = self._unsent, []
                conn = self._conn
                if conn is None:
                    conn = self._conn = httpconn.Connection(self.host, self.port, self.timeout)
                if batch:
                    conn.send_raw(b"".join(batch))
                with self._mu:
                    alone = len(self._calls) == 1  # others waiting: leave them the CPU
                answer = conn.response("GET", SPIN if alone else 0.0)  # never HEAD here: every answer has its body
                with self._mu:
                    call = self._calls.popleft()
                call.answer = answer
                if call is not me:
                    call.wake.release()
                if answer.will_close:  # the requests behind it will not be answered
                    self._fail("the server closed the connection", me)
        except BaseException as exc:  # noqa: BLE001 - every caller on the connection gets it
            self._fail(f"{exc.__class__.__name__}: {exc}", me)
            if not isinstance(exc, Exception):
                raise  # Ctrl-C, SystemExit: the others fail, this caller stops (never a retried ConnectionError)
        finally:
            with self._mu:
                nxt = self._calls[0] if self._calls else None
                self._led = nxt is not None
            if nxt is not None:
                nxt.lead = True
                nxt.wake.release()

    def _fail(self, err: str, me: _Call) -> None:
        """Close the connection and fail every call still on it (``me`` is not woken)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        with self._mu:
            calls = list(self._calls)
            self._calls.clear()
            self._unsent.clear()
        for c in calls:
            c.error = err
            if c is not me:
                c.wake.release()


KEEP = 32  # listeners remembered; an older one is forgotten (its Clients keep their reference)
_shared: dict[tuple[str, int], SharedConnection] = {}
_shared_lock = threading.Lock()


def shared(host: str, port: int, timeout: float) -> SharedConnection:
    """The process's shared connection to ``host:port``. A process that talks to many masters
    over its life (a test suite) keeps the last KEEP: a forgotten one is closed once no Client
    holds it any more."""
    key = (host, port)
    conn = _shared.get(key)
    if conn is None:
        with _shared_lock:
            conn = _shared.get(key)
            if conn is None:
                conn = _shared[key] = SharedConnection(host, port, timeout)
                while len(_shared) > KEEP:
                    del _shared[next(iter(_shared))]
    return conn


def _forget_after_fork() -> None:
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
