"""``Client.snapshot_create`` returns the long poll's answer when the snapshot is ready in it,
and asks again only while it is not."""

from kubegfs.client import Client


def client_answering(answers):
    calls = []
    c = Client.__new__(Client)

    def api(method, path, **kw):
        calls.append((method, path))
        return answers.pop(0)

    c.api = api  # type: ignore[method-assign]
    return c, calls


def test_a_snapshot_ready_in_the_long_poll_costs_one_call():
    c, calls = client_answering([{"id": "s-1", "name": "a", "state": "ready"}])
    assert c.snapshot_create("/d", "a")["state"] == "ready"
    assert calls == [("POST", "/snapshots")]


def test_a_pending_snapshot_is_polled_until_ready():
    c, calls = client_answering([{"id": "s-1", "name": "a", "state": "pending"},
                                 {"id": "s-1", "name": "a", "state": "ready"}])
    assert c.snapshot_create("/d", "a")["state"] == "ready"
    assert calls == [("POST", "/snapshots"), ("GET", "/snapshots/s-1")]
