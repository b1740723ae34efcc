"""Big and hostile request bodies: whole bodies however they arrive, 413 above the limit, 400 for
JSON nested too deeply; nothing changes on a refused request."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests


def post_in_segments(url: str, path: str, token: str, body: bytes, seg: int = 1400) -> tuple[int, dict]:
    """POST ``body`` as many small TCP segments with pauses, the way a slow or busy peer sends."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                   "Connection: close\r\n\r\n").encode())
        for i in range(0, len(body), seg):
            s.sendall(body[i : i + seg])
            if i % (seg * 128) == 0:
                time.sleep(0.002)
        resp = b""
        while chunk := s.recv(65536):
            resp += chunk
    head, _, payload = resp.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_a_valid_multi_megabyte_body_in_small_segments_is_read_whole(shared_cluster, client):
    body = json.dumps({"path": "/big-body-dir", "comment": "x" * (3 << 20)}).encode()
    status, answer = post_in_segments(shared_cluster.master_url, "/api/v1/fs/mkdir", shared_cluster.token, body)
    assert status == 201, answer
    assert client.stat("/big-body-dir")["type"] == "dir"


def test_a_chunked_body_over_the_limit_is_413_and_changes_nothing(shared_cluster, client):
    before = client.dump()

    def gen():
        yield b'{"path": "/never", "pad": "'
        for _ in range(10 * 16):
            yield b"y" * 65536
        yield b'"}'

    r = requests.post(shared_cluster.master_url + "/api/v1/fs/mkdir", data=gen(), timeout=60,
                      headers={"Authorization": f"Bearer {shared_cluster.token}"})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    assert client.dump() == before


DEEP = b'{"path": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
MASTER_POSTS = ["/api/v1/fs/mkdir", "/api/v1/fs/rm", "/api/v1/fs/mv", "/api/v1/fs/open", "/api/v1/fs/alloc",
                "/api/v1/fs/commit", "/api/v1/fs/abort", "/api/v1/snapshots", "/api/v1/snapshots/x/restore",
                "/internal/heartbeat"]
CS_POSTS = ["/internal/chunks/0000000000000001/clone", "/internal/chunks/0000000000000001/replicate",
            "/internal/chunks/0000000000000001/version"]


@pytest.mark.parametrize("path", MASTER_POSTS + CS_POSTS)
def test_deeply_nested_json_is_400(shared_cluster, client, path):
    base = shared_cluster.chunkservers[0].url if path in CS_POSTS else shared_cluster.master_url
    before = client.dump()
    r = requests.post(base + path, data=DEEP, timeout=30,
                      headers={"Authorization": f"Bearer {shared_cluster.internal_token if path.startswith('/internal/') else shared_cluster.token}",
                               "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["message"]
    assert client.dump() == before


def test_a_chunkserver_with_100k_chunks_registers(make_cluster):
    cl = make_cluster(n=1)
    chunks = [[f"{(7 << 40) | i:016x}", 1] for i in range(100_000)]
    body = json.dumps({"id": "cs-many", "address": "http://127.0.0.1:9", "full": True, "chunks": chunks,
                       "records": [], "capacity_bytes": 1 << 40, "used_bytes": 0, "free_bytes": 1 << 40}).encode()
    assert len(body) > 2 << 20
    status, answer = post_in_segments(cl.master_url, "/internal/heartbeat", cl.internal_token, body)
    assert status == 200, answer
    # none of those chunks is known: every one is to be deleted (the log is durable: no op pending)
    assert len(answer["delete_chunks"]) == 100_000
