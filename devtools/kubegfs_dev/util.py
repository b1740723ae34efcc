"""The small helpers every harness, benchmark and test needs: a free loopback port, polling for a
condition, and waiting for an HTTP endpoint to answer. Standard library only (plus kubegfs)."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

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
