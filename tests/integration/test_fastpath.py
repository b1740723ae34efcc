"""The metadata fast path: msgpack negotiated by content type (JSON kept for curl), one-call
empty-file creates, batched stats, cached ls pages, and the token on the new routes."""

import json

import msgpack
import pytest
import requests

from kubegfs.errors import AlreadyExists, NotFound

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
    client.put("/small/f", b"x" * 1000)
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
