"""The lean listener's request-head and query parsing (kubegfs/master/fastpath.py)."""

import pytest

from kubegfs.errors import InvalidArgument, PayloadTooLarge
from kubegfs.master.fastpath import parse_head, parse_query
from kubegfs.web import MAX_JSON_BODY


def test_a_plain_head():
    r = parse_head(b"GET /api/v1/fs/stat?path=%2Fa HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nAccept: y")
    assert (r.method, r.path, r.query, r.length, r.keep_alive) == ("GET", "/api/v1/fs/stat", "path=%2Fa", 0, True)
    assert r.headers == {"host": "x", "authorization": "Bearer t", "accept": "y"}


@pytest.mark.parametrize("head,keep", [
    (b"GET / HTTP/1.1\r\nConnection: close", False), (b"GET / HTTP/1.0", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive", True), (b"GET / HTTP/1.1\r\nConnection: Keep-Alive", True)])
def test_keep_alive_follows_the_version_and_connection_header(head, keep):
    assert parse_head(head).keep_alive is keep


@pytest.mark.parametrize("head", [
    b"GET", b"GET /x", b"GET x HTTP/1.1", b"GET /x HTTP/2", b"GET  /x HTTP/1.1", b"GET /x HTTP/1.1\r\nnocolon",
    b"GET /x HTTP/1.1\r\n Folded: x", b"POST /x HTTP/1.1\r\nContent-Length: -1", b"POST /x HTTP/1.1\r\nContent-Length: 1e3",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked"])
def test_malformed_heads_are_invalid(head):
    with pytest.raises(InvalidArgument):
        parse_head(head)


def test_a_body_past_the_limit_is_refused_before_it_is_read():
    with pytest.raises(PayloadTooLarge):
        parse_head(b"POST /x HTTP/1.1\r\nContent-Length: %d" % (MAX_JSON_BODY + 1))


@pytest.mark.parametrize("query,want", [
    ("", {}), ("path=/a", {"path": "/a"}), ("path=%2Fa%20b&after=", {"path": "/a b", "after": ""}),
    ("a=1&a=2", {"a": "1"}), ("x+y=1+2", {"x y": "1 2"}), ("&&k", {"k": ""}), ("p=%E2%82%AC", {"p": "€"})])
def test_queries_decode_as_the_main_port_reads_them(query, want):
    assert parse_query(query) == want


@pytest.mark.parametrize("params", [
    {"path": "/st/f17"}, {"path": "/st", "after": "", "limit": 5000}, {"path": "/a b/ü&x=1", "after": None},
    {"path": "/x", "recursive": True}, {"path": "~a_b.c-d/e", "n": -3}, {"a+b": "c"}, {"path": "/%41"}, {},
])
def test_the_clients_query_string_is_urlencodes(params):
    from urllib.parse import urlencode

    from kubegfs.client import _query

    assert _query(params) == urlencode({k: v for k, v in params.items() if v is not None}, safe="/")
