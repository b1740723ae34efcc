"""What every kubegfs HTTP server shares: token auth by role, JSON errors, body limits, metrics, the
request-head parsing of the lean listeners (master/fastpath.py, chunkserver/dataport.py), and
the body encoding: JSON (curl, and the default), or msgpack when the request's ``Content-Type``
or ``Accept`` names ``application/x-msgpack`` (the Python client's choice: cheaper to encode and
decode than JSON on the hot metadata calls). msgpack bodies decode to plain maps, lists, strings
and numbers only (no extension types), so nothing crossing the wire can build an object."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import msgpack
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .auth import ANY, Policy, Tokens
from .errors import Forbidden, InvalidArgument, KubegfsError, PayloadTooLarge, Unauthorized
from .metrics import HttpMetrics
from .tls import ClientTLS

log = logging.getLogger("kubegfs.web")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # kubelet probes: no credentials
# what a call to another kubegfs server can raise: its JSON error, a timeout, a refused or cut connection
PEER_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, KubegfsError, aiohttp.ClientError, OSError)
MAX_JSON_BODY = 8 * 1024 * 1024
TOKEN_HEADER = "Authorization"
CHAIN_HEADER = "X-Kubegfs-Chain"  # a piece's PUT: the replicas after this one (chunkserver/server.py)
MAX_CHAIN = 8  # replicas a piece's chain may name
CLUSTER_HEADER = "X-Kubegfs-Cluster"  # master -> chunkserver calls name their cluster (master/identity.py)

MSGPACK = "application/x-msgpack"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Whether the request being handled asked for msgpack answers (set per request by the
# middleware; every request runs in its own task, so its own context).
_WANT_MSGPACK: contextvars.ContextVar[bool] = contextvars.ContextVar("kubegfs_want_msgpack", default=False)


def encode_body(data: Any, as_msgpack: bool) -> tuple[bytes, str]:
    if as_msgpack:
        return msgpack.packb(data, use_bin_type=True), MSGPACK
    return json.dumps(data, separators=(",", ":")).encode(), "application/json"


def decode_body(raw: bytes, content_type: str) -> Any:
    """A request or answer body in the encoding its content type names (JSON unless msgpack)."""
    if content_type.startswith(MSGPACK):
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    return json.loads(raw)


def peer_session(token: str, timeout: aiohttp.ClientTimeout, headers: dict[str, str] | None = None
                 ) -> aiohttp.ClientSession:
    """A session for calls to other kubegfs servers: ``token`` as bearer, https peers verified
    (kubegfs/tls.py: KUBEGFS_CACERT, KUBEGFS_TLS_SERVER_NAME)."""
    return aiohttp.ClientSession(
        headers={TOKEN_HEADER: f"Bearer {token}", **(headers or {})},
        connector=aiohttp.TCPConnector(ssl=ClientTLS.from_env().context()),
        timeout=timeout,
    )


def json_response(data: Any, status: int = 200) -> web.Response:
    """The answer ``data``, as msgpack if the request asked for it, else JSON."""
    body, ctype = encode_body(data, _WANT_MSGPACK.get())
    return web.Response(body=body, status=status, content_type=ctype)


def encoded_response(body: bytes, content_type: str, status: int = 200) -> web.Response:
    """An answer already encoded (e.g. a cached page) in ``content_type``."""
    return web.Response(body=body, status=status, content_type=content_type)


def wants_msgpack() -> bool:
    return _WANT_MSGPACK.get()


def error_response(err: KubegfsError) -> web.Response:
    return json_response(err.to_json(), status=err.status)


def check_token(request: web.Request, tokens: Tokens, policy: Policy) -> None:
    check_auth(request.headers.get(TOKEN_HEADER, ""), request.method, request.path, tokens, policy)


def check_auth(got: str, method: str, path: str, tokens: Tokens, policy: Policy) -> None:
    """401 without a known token (``Authorization`` header ``got``); 403 if its role may not
    call this route (auth.py)."""
    if not got.startswith("Bearer "):
        raise Unauthorized("missing bearer token")
    roles = tokens.roles_of(got[7:])
    if not roles:
        raise Unauthorized("wrong token")
    allowed = policy(method, path)
    if not roles & allowed:
        raise Forbidden(f"a {'/'.join(sorted(roles))} token may not {method} {path} "
                        f"(needs the {' or '.join(sorted(allowed))} token)")


def msgpack_wanted(accept: str, ctype: str) -> bool:
    """Whether a request (its ``Accept`` and ``Content-Type``) is answered in msgpack."""
    return accept.startswith(MSGPACK) or ctype.startswith(MSGPACK)


class RequestMetrics:
    """The request counter and latency histogram children, looked up once per label set
    (``labels()`` on every request was a measurable part of a stat's cost)."""

    def __init__(self, http: HttpMetrics) -> None:
        self.http = http
        self.counters: dict[tuple[str, str, int], Any] = {}
        self.timers: dict[tuple[str, str], Any] = {}

    def observe(self, route: str, method: str, code: int, seconds: float) -> None:
        c = self.counters.get((route, method, code))
        if c is None:
            c = self.counters[(route, method, code)] = self.http.requests.labels(
                self.http.component, route, method, str(code))
        t = self.timers.get((route, method))
        if t is None:
            t = self.timers[(route, method)] = self.http.latency.labels(self.http.component, route, method)
        c.inc()
        t.observe(seconds)


def make_middlewares(token: str | Tokens, http: HttpMetrics, policy: Policy = lambda m, p: ANY) -> list[Any]:
    tokens = token if isinstance(token, Tokens) else Tokens(token)
    metrics = RequestMetrics(http)

    @web.middleware
    async def mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource else "unmatched"
        code = 500
        h = request.headers
        _WANT_MSGPACK.set(msgpack_wanted(h.get("Accept", ""), h.get("Content-Type", "")))
        try:
            if request.path not in OPEN_PATHS:
                check_token(request, tokens, policy)
            resp = await handler(request)
            code = resp.status
            return resp
        except KubegfsError as err:
            code = err.status
            return error_response(err)
        except web.HTTPException as exc:
            code = exc.status
            if exc.status >= 400:
                return json_response({"error": "http", "message": exc.reason}, status=exc.status)
            raise
        except Exception as exc:  # noqa: BLE001 - answer JSON, log the trace
            log.exception("unhandled error on %s %s", request.method, request.path)
            return json_response({"error": "internal", "message": f"internal error: {exc}"}, 500)
        finally:
            metrics.observe(route, request.method, code, time.perf_counter() - t0)

    return [mw]


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body (however many segments it arrives in), or 413 once it passes ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body larger than {limit} bytes")
    parts: list[bytes] = []
    n = 0
    async for data in request.content.iter_any():
        n += len(data)
        if n > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        parts.append(data)
    return b"".join(parts)


async def read_json(request: web.Request, limit: int = MAX_JSON_BODY) -> dict[str, Any]:
    return decode_object(await read_body(request, limit), request.headers.get("Content-Type", ""))


def decode_object(raw: bytes, ctype: str) -> dict[str, Any]:
    """A request body that must be an object (empty: ``{}``); malformed is InvalidArgument."""
    if not raw:
        return {}
    kind = "msgpack" if ctype.startswith(MSGPACK) else "JSON"
    try:
        body = decode_body(raw, ctype)
    except (ValueError, UnicodeDecodeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidArgument(f"malformed {kind}: {exc}") from exc
    except RecursionError as exc:
        raise InvalidArgument(f"malformed {kind}: nested too deeply") from exc
    if not isinstance(body, dict):
        raise InvalidArgument(f"{kind} body must be an object")
    return body


def run_app(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve ``app`` until a signal, on uvloop where it is installed (C transports: less of a
    small request's time in the event loop), else, or with ``KUBEGFS_EVENT_LOOP=asyncio``, on
    asyncio's own loop."""
    try:
        if os.environ.get("KUBEGFS_EVENT_LOOP", "uvloop") == "asyncio":
            raise ImportError("asyncio's loop asked for")
        import uvloop
    except ImportError:
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True, loop=loop,
                ssl_context=ssl_context)


class Request:
    """One parsed request head (names of headers lowercased)."""

    __slots__ = ("method", "path", "query", "headers", "length", "keep_alive")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], length: int,
                 keep_alive: bool) -> None:
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.length, self.keep_alive = length, keep_alive


def parse_head(head: bytes) -> Request:
    """A request line and headers (without the blank line); InvalidArgument if malformed,
    PayloadTooLarge if its body may not be read here."""
    try:
        text = head.decode("latin-1")
        line, *lines = text.split("\r\n")
        method, target, version = line.split(" ")
    except ValueError as exc:
        raise InvalidArgument("malformed request line") from exc
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise InvalidArgument("malformed request line")
    headers: dict[str, str] = {}
    for h in lines:
        name, sep, value = h.partition(":")
        if not sep or not name or name != name.strip():
            raise InvalidArgument("malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise InvalidArgument("chunked bodies are not read on this port")
    raw_len = headers.get("content-length", "0")
    if not raw_len.isdigit():
        raise InvalidArgument("bad Content-Length")
    length = int(raw_len)
    if length > MAX_JSON_BODY:
        raise PayloadTooLarge(f"body larger than {MAX_JSON_BODY} bytes")
    conn = headers.get("connection", "").lower()
    keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
    path, _, query = target.partition("?")
    return Request(method, path, query, headers, length, keep)


_PHRASES = {s.value: s.phrase for s in HTTPStatus}


def answer_head(status: int, ctype: str, length: int, keep_alive: bool, extra: str = "") -> bytes:
    """A lean listener's response head (``extra``: more header lines, each ending in CRLF)."""
    close = "" if keep_alive else "Connection: close\r\n"
    return (f"HTTP/1.1 {status} {_PHRASES.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n{extra}{close}\r\n").encode("latin-1")


def parse_query(query: str) -> dict[str, str]:
    """``a=1&b=%2Fx`` -> {"a": "1", "b": "/x"}; a repeated name keeps its first value (as the
    main port's ``request.query.get`` does)."""
    out: dict[str, str] = {}
    if not query:
        return out
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        k = unquote_plus(k) if "%" in k or "+" in k else k
        out.setdefault(k, unquote_plus(v) if "%" in v or "+" in v else v)
    return out


def parse_chain(raw: str) -> list[str]:
    """The replicas a piece is forwarded to: up to MAX_CHAIN distinct http(s) base URLs."""
    if not raw:
        return []
    chain = [u.strip().rstrip("/") for u in raw.split(",")]
    if len(chain) > MAX_CHAIN or len(set(chain)) != len(chain):
        raise InvalidArgument(f"{CHAIN_HEADER}: at most {MAX_CHAIN} distinct replicas")
    for u in chain:
        if not u.startswith(("http://", "https://")) or len(u) > 300 or any(c in u for c in " ?#\r\n"):
            raise InvalidArgument(f"{CHAIN_HEADER}: {u[:60]!r} is not an http(s) base URL")
    return chain


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) of a ``--listen`` option."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def metrics_handler(registry: CollectorRegistry) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler


# ---- typed field access for validated wire bodies --------------------------------------------


def field_str(body: dict[str, Any], key: str, default: str | None = None, max_len: int = 4096) -> str:
    v = body.get(key, default)
    if v is None:
        raise InvalidArgument(f"missing field {key!r}")
    if not isinstance(v, str):
        raise InvalidArgument(f"field {key!r} must be a string")
    if len(v) > max_len:
        raise InvalidArgument(f"field {key!r} longer than {max_len}")
    return v


def field_int(body: dict[str, Any], key: str, default: int | None = None, lo: int = 0, hi: int = 1 << 62) -> int:
    v = body.get(key, default)
    if v is None:
        raise InvalidArgument(f"missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidArgument(f"field {key!r} must be an integer")
    if not lo <= v <= hi:
        raise InvalidArgument(f"field {key!r} must be between {lo} and {hi}")
    return v


def field_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise InvalidArgument(f"field {key!r} must be a boolean")
    return v


def query_int(request: web.Request, key: str, default: int | None = None, lo: int = 0, hi: int = 1 << 62) -> int:
    return int_param(request.query, key, default, lo, hi)


def int_param(query: Mapping[str, str], key: str, default: int | None = None, lo: int = 0, hi: int = 1 << 62) -> int:
    """An integer query parameter in [lo, hi] (``default`` if absent); InvalidArgument otherwise."""
    raw = query.get(key)
    if raw is None:
        if default is None:
            raise InvalidArgument(f"missing query parameter {key!r}")
        return default
    try:
        v = int(raw)
    except ValueError as exc:
        raise InvalidArgument(f"query parameter {key!r} must be an integer") from exc
    if not lo <= v <= hi:
        raise InvalidArgument(f"query parameter {key!r} must be between {lo} and {hi}")
    return v


def handle_hex(s: str) -> int:
    if len(s) != 16 or any(c not in "0123456789abcdef" for c in s):
        raise InvalidArgument(f"bad chunk handle {s[:40]!r}: 16 lowercase hex digits expected")
    return int(s, 16)


def hexh(h: int) -> str:
    return f"{h:016x}"


def record_id(s: str) -> str:
    import re

    if not isinstance(s, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,127}", s):
        raise InvalidArgument("bad snapshot id: lowercase letters, digits, '.', '_' and '-' only")
    return s
