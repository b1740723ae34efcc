"""A TCP proxy whose link can be cut and healed: a network partition between two processes on
loopback, in both directions, without iptables or root. Tests point a process at the proxy's
address instead of the real one and call ``cut()`` / ``heal()``."""

from __future__ import annotations

import selectors
import socket
import threading
from contextlib import suppress


class FaultyLink:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._srv = socket.create_server((listen_host, 0), reuse_port=False)
        self._srv.settimeout(0.2)
        self.host, self.port = self._srv.getsockname()[:2]
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="faulty-link")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def cut(self) -> None:
        """Drop every open connection and refuse new ones (they are accepted and closed)."""
        self._up.clear()
        with self._lock:
            for s in list(self._conns):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with suppress(OSError):
                    s.close()
            self._conns.clear()

    def heal(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        with suppress(OSError):
            self._srv.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                with suppress(OSError):
                    client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                with suppress(OSError):
                    client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            a.setblocking(False)  # (a cut may have closed them before this thread started)
            b.setblocking(False)
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while self._up.is_set() and not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst: socket.socket = key.data
                    try:
                        data = src.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    dst.setblocking(True)
                    dst.sendall(data)
                    dst.setblocking(False)
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                with suppress(OSError):
                    s.close()
            with self._lock:
                self._conns -= {a, b}
