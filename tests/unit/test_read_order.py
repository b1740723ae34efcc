"""Which replica a client asks for each piece of a chunk (kubegfs/client.py read_order)."""

from kubegfs.client import read_order


def _reps(*near: bool) -> list[dict]:
    return [{"id": f"cs{i}", "address": f"http://h{i}", "near": n} for i, n in enumerate(near)]


def test_pieces_rotate_over_the_equally_near_replicas_then_the_rest():
    reps = _reps(True, True, True, False)
    firsts = [read_order(reps, k)[0]["id"] for k in range(6)]
    assert firsts == ["cs0", "cs1", "cs2", "cs0", "cs1", "cs2"]
    assert [r["id"] for r in read_order(reps, 1)] == ["cs1", "cs2", "cs0", "cs3"]


def test_a_single_nearest_replica_or_an_old_master_keeps_the_masters_order():
    reps = _reps(True, False, False)
    assert [r["id"] for r in read_order(reps, 5)] == ["cs0", "cs1", "cs2"]
    old = [{"id": "a", "address": "x"}, {"id": "b", "address": "y"}]  # no "near": as ranked
    assert read_order(old, 1) == old
