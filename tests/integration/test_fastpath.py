"""The metadata fast path: msgpack negotiated by content type (JSON kept for curl), one-call
empty-file creates, batched stats, cached ls pages, and the token on the new routes."""

import json
import os
import signal
import socket
import threading

import msgpack
import pytest
import requests

from kubegfs.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from kubegfs.local import LocalCluster
from kubegfs.wire import SMALL_FILE

MSGPACK = "application/x-msgpack"
NEW_ROUTES = [("POST", "/api/v1/fs/create"), ("POST", "/api/v1/fs/stat_many")]


def _h(cluster, **extra):
    return {"Authorization": f"Bearer {cluster.token}", **extra}


@pytest.mark.parametrize("method,path", NEW_ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer "])
def test_new_routes_check_the_token(shared_cluster, method, path, auth):
    h = {"Authorization": auth} if auth else {}
    r = requests.request(method, shared_cluster.master_url + path, headers=h, json={"paths": []}, timeout=5)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"


def test_json_stays_the_default_and_msgpack_is_negotiated(shared_cluster, client):
    client.mkdir("/neg")
    url = shared_cluster.master_url + "/api/v1/fs/stat?path=/neg"
    r = requests.get(url, headers=_h(shared_cluster), timeout=5)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["type"] == "dir"
    r = requests.get(url, headers=_h(shared_cluster, Accept=MSGPACK), timeout=5)
    assert r.headers["Content-Type"].startswith(MSGPACK)
    assert msgpack.unpackb(r.content)["type"] == "dir"
    # a msgpack body, and its errors answered in msgpack
    r = requests.post(shared_cluster.master_url + "/api/v1/fs/mkdir", data=msgpack.packb({"path": "/neg/a"}),
                      headers=_h(shared_cluster, **{"Content-Type": MSGPACK}), timeout=5)
    assert r.status_code == 201 and msgpack.unpackb(r.content) == {"path": "/neg/a"}
    r = requests.post(shared_cluster.master_url + "/api/v1/fs/mkdir", data=msgpack.packb({"path": "/neg/a"}),
                      headers=_h(shared_cluster, **{"Content-Type": MSGPACK}), timeout=5)
    assert r.status_code == 409 and msgpack.unpackb(r.content)["error"] == "already_exists"


@pytest.mark.parametrize("body", [
    b"\x92\x01",  # truncated
    b"\xc1",  # never used byte
    b"\x81\x01\x02",  # integer map key
    b"\x93\x01\x02\x03",  # not a map
    msgpack.packb({"path": "/x"}) + b"\x00",  # trailing data
    msgpack.packb({"path": 5}),
])
def test_malformed_msgpack_is_400_and_changes_nothing(shared_cluster, client, body):
    before = client.dump()
    r = requests.post(shared_cluster.master_url + "/api/v1/fs/mkdir", data=body,
                      headers=_h(shared_cluster, **{"Content-Type": MSGPACK}), timeout=5)
    assert r.status_code == 400, r.content
    assert msgpack.unpackb(r.content)["error"] == "invalid_argument"  # answered in the body's encoding
    assert client.dump() == before


def test_empty_file_in_one_call_is_durable(make_cluster):
    cl = make_cluster()
    c = cl.client()
    c.mkdir("/e")
    out = c.create_empty("/e/one")
    assert out == {"path": "/e/one", "size": 0, "chunks": 0}
    c.put("/e/two", b"", overwrite=False)  # put of nothing takes the same call
    with pytest.raises(AlreadyExists):
        c.create_empty("/e/one")
    c.put("/e/one", b"data")
    assert c.create_empty("/e/one", overwrite=True)["size"] == 0
    with pytest.raises(NotFound):
        c.create_empty("/nowhere/x")
    cl.kill(cl.master)  # SIGKILL: only what reached the op log survives
    cl.start_master()
    c2 = cl.client()
    assert {e["path"]: e["size"] for e in c2.ls("/e")} == {"/e/one": 0, "/e/two": 0}
    assert c2.get("/e/one") == b""


def test_small_file_takes_open_with_placement_then_commit(client):
    client.mkdir("/small")
    client.put("/small/f", iter([b"x" * 1000]))  # a stream: open (placing its chunk), the chain, commit
    assert client.get("/small/f") == b"x" * 1000
    client.put("/small/f", iter([]))  # nothing to write: the placed chunk is abandoned
    assert client.stat("/small/f")["size"] == 0


def test_stat_many_keeps_order_and_reports_missing(client):
    client.mkdir("/sm")
    client.put("/sm/f", b"abc")
    got = client.stat_many(["/sm/f", "/sm/none", "/sm", "bad\x00path"])
    assert got[0]["type"] == "file" and got[0]["size"] == 3
    assert got[1]["error"] == "not_found" and got[1]["path"] == "/sm/none"
    assert got[2]["type"] == "dir" and got[2]["entries"] == 1
    assert got[3]["error"] == "invalid_argument"


@pytest.mark.parametrize("body", [{"paths": "/a"}, {"paths": [1]}, {"paths": ["/"] * 10_001}, {}])
def test_stat_many_bad_input_is_400(shared_cluster, body):
    r = requests.post(shared_cluster.master_url + "/api/v1/fs/stat_many", data=json.dumps(body),
                      headers=_h(shared_cluster), timeout=5)
    assert r.status_code == 400 and r.json()["error"] == "invalid_argument"


def test_ls_pages_follow_every_change(client):
    """ls answers of an unchanged directory come from a cache; every change must show."""
    client.mkdir("/lc")
    for i in range(5):
        client.put(f"/lc/f{i}", b"")
    first = client.ls("/lc")
    assert client.ls("/lc") == first and len(first) == 5
    client.put("/lc/f1", b"12345")
    assert {e["path"]: e["size"] for e in client.ls("/lc")}["/lc/f1"] == 5
    client.rm("/lc/f0")
    client.mkdir("/lc/d")
    assert [e["path"] for e in client.ls("/lc")] == ["/lc/d", "/lc/f1", "/lc/f2", "/lc/f3", "/lc/f4"]
    client.mv("/lc", "/lc2")
    assert [e["path"] for e in client.ls("/lc2")][0] == "/lc2/d"
    with pytest.raises(NotFound):
        client.ls("/lc")


# ---------------------------------------------------------------------- the lean listener


def _fast(cluster):
    return f"http://{cluster.master.host}:{cluster.fast_port}"


def test_the_lean_listener_answers_as_the_main_port_does(shared_cluster, client):
    client.mkdir("/lean")
    for i in range(3):
        client.create_empty(f"/lean/f{i}")
    for q, hdrs in [("/api/v1/fs/stat?path=%2Flean%2Ff1", {}), ("/api/v1/fs/stat?path=/lean", {"Accept": MSGPACK}),
                    ("/api/v1/fs/ls?path=/lean&limit=2", {}), ("/api/v1/fs/ls?path=/lean&after=f0", {"Accept": MSGPACK})]:
        main = requests.get(shared_cluster.master_url + q, headers=_h(shared_cluster, **hdrs), timeout=5)
        lean = requests.get(_fast(shared_cluster) + q, headers=_h(shared_cluster, **hdrs), timeout=5)
        assert (lean.status_code, lean.headers["Content-Type"], lean.content) == \
            (main.status_code, main.headers["Content-Type"].split(";")[0], main.content)
        assert main.headers["X-Kubegfs-Fastpath"] == str(shared_cluster.fast_port)
    body = {"paths": ["/lean/f2", "/nope"]}
    main = requests.post(shared_cluster.master_url + "/api/v1/fs/stat_many", json=body, headers=_h(shared_cluster), timeout=5)
    lean = requests.post(_fast(shared_cluster) + "/api/v1/fs/stat_many", json=body, headers=_h(shared_cluster), timeout=5)
    assert lean.json() == main.json() and lean.json()["stats"][1]["error"] == "not_found"
    r = requests.post(_fast(shared_cluster) + "/api/v1/fs/stat_many", data=msgpack.packb(body),
                      headers=_h(shared_cluster, **{"Content-Type": MSGPACK}), timeout=5)
    assert msgpack.unpackb(r.content) == main.json()


@pytest.mark.parametrize("auth,status", [(None, 401), ("Bearer wrong", 401), ("Bearer ", 401), ("Basic x", 401)])
def test_the_lean_listener_checks_the_token(shared_cluster, auth, status):
    h = {"Authorization": auth} if auth else {}
    for method, path in [("GET", "/api/v1/fs/stat?path=/"), ("GET", "/api/v1/fs/ls?path=/"),
                         ("POST", "/api/v1/fs/stat_many")]:
        r = requests.request(method, _fast(shared_cluster) + path, headers=h, json={"paths": ["/"]}, timeout=5)
        assert (r.status_code, r.json()["error"]) == (status, "unauthorized")


def test_the_lean_listener_refuses_a_token_whose_role_may_not_read(shared_cluster):
    h = {"Authorization": f"Bearer {shared_cluster.metrics_token}"}
    r = requests.get(_fast(shared_cluster) + "/api/v1/fs/stat?path=/", headers=h, timeout=5)
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")


def test_the_lean_listener_answers_errors_as_json(shared_cluster):
    r = requests.get(_fast(shared_cluster) + "/api/v1/fs/stat?path=/no/such", headers=_h(shared_cluster), timeout=5)
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = requests.post(_fast(shared_cluster) + "/api/v1/fs/rm", json={"path": "/x"}, headers=_h(shared_cluster), timeout=5)
    assert r.status_code == 404 and "main port" in r.json()["message"]  # only the hot routes here
    r = requests.post(_fast(shared_cluster) + "/api/v1/fs/mkdir", json={"path": "/no/such/x"},
                      headers=_h(shared_cluster), timeout=5)
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = requests.get(_fast(shared_cluster) + "/api/v1/fs/ls?path=/&limit=x", headers=_h(shared_cluster), timeout=5)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_argument")
    r = requests.post(_fast(shared_cluster) + "/api/v1/fs/stat_many", data=b"\xc1", timeout=5,
                      headers=_h(shared_cluster, **{"Content-Type": MSGPACK}))
    assert (r.status_code, msgpack.unpackb(r.content)["error"]) == (400, "invalid_argument")  # as it was asked


def test_the_lean_listener_closes_on_a_head_it_cannot_read(shared_cluster):
    for bad in [b"NONSENSE\r\n\r\n", b"GET /api/v1/fs/stat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"]:
        s = socket.create_connection((shared_cluster.master.host, shared_cluster.fast_port), timeout=5)
        s.sendall(bad)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        s.close()
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"] == "invalid_argument"


def test_the_lean_listener_answers_pipelined_requests_in_order(shared_cluster, client):
    client.mkdir("/piped")
    client.create_empty("/piped/a")
    reqs = [f"GET /api/v1/fs/stat?path={p} HTTP/1.1\r\nAuthorization: Bearer {shared_cluster.token}\r\n\r\n"
            for p in ("/piped/a", "/piped/none", "/piped")]
    s = socket.create_connection((shared_cluster.master.host, shared_cluster.fast_port), timeout=5)
    s.sendall("".join(reqs).encode())  # three requests in one write: three answers, in order
    got = b""
    while got.count(b"HTTP/1.1 ") < 3 or not got.endswith(b"}"):
        got += s.recv(65536)
    s.close()
    answers = [json.loads(a.partition(b"\r\n\r\n")[2].split(b"HTTP/1.1 ")[0]) for a in got.split(b"HTTP/1.1 ")[1:]]
    assert [a.get("path", a.get("error")) for a in answers] == ["/piped/a", "not_found", "/piped"]


def test_the_client_finds_the_lean_listener_and_falls_back_without_it(shared_cluster, client):
    client.mkdir("/found")
    assert client.stat("/found")["type"] == "dir"
    assert client._fast == _fast(shared_cluster)  # named by the main port's answer
    calls = []
    real, real_shared = client._req, client._shared_req

    def spy(method, url, **kw):
        calls.append(url)
        return real(method, url, **kw)

    def spy_shared(method, base, path, **kw):
        calls.append(base + path)
        return real_shared(method, base, path, **kw)

    client._req, client._shared_req = spy, spy_shared
    assert client.stat("/found")["type"] == "dir" and client.ls("/found") == []
    assert len(calls) == 2 and all(u.startswith(_fast(shared_cluster)) for u in calls)
    client._fast = "http://127.0.0.1:1"  # unreachable: asked again on the main port, from then on
    calls.clear()
    assert client.stat("/found")["type"] == "dir"
    assert calls[-1].startswith(shared_cluster.master_url) and client._fast is None
    client.stat("/found")
    assert client._fast is None


def test_mkdir_and_create_on_the_lean_listener_are_durable_and_checked(make_cluster):
    cl = make_cluster()
    c = cl.client()
    main = c.mkdir("/w")  # the main port's answer names the listener for these calls
    assert c._fast_writes == _fast(cl)
    calls = _spy(c)
    assert c.mkdir("/w/d") == {"path": "/w/d"} and c.create_empty("/w/e")["size"] == 0
    assert c.put("/w/s", b"small", overwrite=False)["size"] == 5
    assert calls == [_fast(cl) + "/api/v1/fs/" + k for k in ("mkdir", "create", "create")]
    with pytest.raises(AlreadyExists):  # errors as on the main port
        c.mkdir("/w/d")
    with pytest.raises(NotFound):
        c.create_empty("/nope/e")
    for auth, status in [(None, 401), ("Bearer wrong", 401), (f"Bearer {cl.metrics_token}", 403)]:
        h = {"Authorization": auth} if auth else {}
        r = requests.post(_fast(cl) + "/api/v1/fs/mkdir", json={"path": "/w/no"}, headers=h, timeout=5)
        assert r.status_code == status
    r = requests.post(_fast(cl) + "/api/v1/fs/mkdir", json={"path": "/w/j"}, headers=_h(cl), timeout=5)
    assert (r.status_code, r.json()) == (201, {"path": "/w/j"}) and main == {"path": "/w"}
    assert not c.exists("/w/no")
    cl.kill(cl.master)  # SIGKILL: whatever was answered was durable
    cl.start_master()
    cl.wait_registered(3)
    c2 = cl.client()
    assert sorted(e["path"] for e in c2.ls("/w")) == ["/w/d", "/w/e", "/w/j", "/w/s"]
    assert c2.get("/w/s") == b"small"


def test_a_create_goes_to_the_main_port_only_if_the_listener_refused_the_connection(shared_cluster, client):
    client.mkdir("/fb")
    calls = _spy(client)
    client._fast_writes = "http://127.0.0.1:1"  # refused: nothing was sent, so the main port gets it
    client.create_empty("/fb/a")
    assert calls == ["http://127.0.0.1:1/api/v1/fs/create", shared_cluster.master_url + "/api/v1/fs/create"]
    assert client._fast_writes is None and client.exists("/fb/a")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()  # accepts, then closes without an answer: the create may have happened, so no resend
    client._fast_writes = f"http://127.0.0.1:{s.getsockname()[1]}"
    calls.clear()

    def drop() -> None:
        conn, _ = s.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=drop)
    t.start()
    with pytest.raises(Unavailable):
        client.create_empty("/fb/b")
    t.join()
    s.close()
    assert len(calls) == 1 and not client.exists("/fb/b")


# ---------------------------------------------------------------------- small files in one call


def _spy(c):
    calls = []
    real = c._req

    def spy(method, url, **kw):
        calls.append(url.split("?")[0])
        return real(method, url, **kw)

    c._req = spy
    return calls


def test_a_small_file_is_one_call_and_on_every_replica_when_it_returns(make_cluster):
    cl = make_cluster()
    c = cl.client()
    data = os.urandom(SMALL_FILE)
    calls = _spy(c)
    out = c.put("/s", data, overwrite=False)
    assert out == {"path": "/s", "size": SMALL_FILE, "chunks": 1}
    assert calls == [cl.master_url + "/api/v1/fs/create"]  # one round trip, no chunkserver call
    lay = c.layout("/s")
    (ch,) = lay["chunks"]
    assert len(ch["replicas"]) == 3
    for r in ch["replicas"]:  # each replica holds the bytes (they were synced before the answer)
        assert bytes(c._req("GET", f"{r['address']}/internal/chunks/{ch['handle']}",
                            params={"offset": 0, "length": SMALL_FILE, "version": ch["version"]})) == data
    with pytest.raises(AlreadyExists):
        c.put("/s", b"again", overwrite=False)
    c.put("/s", b"shorter")  # overwrite: the same one call
    cl.kill(cl.master)  # SIGKILL: only what reached the op log survives
    cl.start_master()
    cl.wait_registered(3)  # the chunkservers report their chunks again
    assert cl.client().get("/s") == b"shorter"


def test_a_larger_file_is_written_by_the_client(client, shared_cluster):
    calls = _spy(client)
    client.put("/big1", b"y" * (SMALL_FILE + 1))
    assert any("/internal/chunks/" in u for u in calls) and calls[-1].endswith("/fs/commit")
    assert client.get("/big1") == b"y" * (SMALL_FILE + 1)
    with pytest.raises(InvalidArgument):
        client.api("POST", "/fs/create", json={"path": "/big2", "data": b"z" * (SMALL_FILE + 1)})
    r = requests.post(shared_cluster.master_url + "/api/v1/fs/create", json={"path": "/big3", "data": "text"},
                      headers=_h(shared_cluster), timeout=5)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_argument")
    assert not client.exists("/big2") and not client.exists("/big3")


def test_a_small_file_goes_around_a_dead_replica(make_cluster):
    cl = make_cluster(dead_after=30)  # the master keeps placing on the dead one
    c = cl.client()
    for victim in cl.chunkservers[:1]:
        cl.kill(victim, signal.SIGKILL)
    for i in range(4):  # the dead one is the chain's head for some of them
        c.put(f"/d{i}", b"%d" % i * 100)
        assert c.get(f"/d{i}") == b"%d" % i * 100
        assert len(c.layout(f"/d{i}")["chunks"][0]["replicas"]) == 2


def test_the_lean_listener_speaks_tls_when_the_master_does(tmp_path):
    cl = LocalCluster(tmp_path / "tls", 3, chunk_size=256 * 1024, heartbeat=0.2, dead_after=1.5, tls=True)
    cl.start()
    try:
        c = cl.client()
        c.mkdir("/t")
        c.put("/t/a", b"hello")
        assert c.stat("/t")["type"] == "dir"
        assert c._fast == f"https://{cl.master.host}:{cl.fast_port}"
        assert c.stat("/t/a")["size"] == 5 and [e["path"] for e in c.ls("/t")] == ["/t/a"]
        assert c._fast is not None and not c._fast_off  # answered there, verified, no fallback
        with pytest.raises(requests.exceptions.ConnectionError):  # no plain http beside it
            requests.get(f"http://{cl.master.host}:{cl.fast_port}/api/v1/fs/stat?path=/", timeout=5)
    finally:
        cl.stop()
