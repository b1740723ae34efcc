"""Property-based pass over the master's JSON API: any body either works or gets a 4xx JSON
answer; a rejected request never changes the namespace."""

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUTES = ["/api/v1/fs/mkdir", "/api/v1/fs/rm", "/api/v1/fs/mv", "/api/v1/fs/open", "/api/v1/fs/alloc",
          "/api/v1/fs/commit", "/api/v1/fs/abort", "/api/v1/snapshots", "/api/v1/snapshots/x/restore",
          "/internal/heartbeat"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=40), st.sampled_from(["/", "/a", "/a/../b", "//x/./y", "\x00", "a" * 300]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
keys = st.sampled_from(["path", "src", "dst", "parents", "mode", "recursive", "lease", "size", "chunks",
                        "name", "copies", "id", "targets", "near", "to", "address", "full", "location"])
bodies = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_any_body_gets_a_clear_answer(shared_cluster, client, route, body):
    before = client.dump()
    tok = shared_cluster.internal_token if route.startswith("/internal/") else shared_cluster.token
    r = requests.post(shared_cluster.master_url + route, json=body,
                      headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code < 500, (route, body, r.text)
    if r.status_code >= 400:
        j = r.json()
        assert isinstance(j["message"], str) and j["message"]
        if route != "/internal/heartbeat":
            assert client.dump()["tree"] == before["tree"], (route, body)
