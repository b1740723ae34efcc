"""Write leases without a server: one writer per path, expiry, abandoned chunks."""

import pytest

from kubegfs import namespace as ns
from kubegfs.errors import Conflict
from kubegfs.master.leases import LeaseTable


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def table():
    clock = Clock()
    abandoned = []
    return clock, abandoned, LeaseTable(on_abandon=lambda h, ids: abandoned.append((h, ids)), seconds=60, clock=clock)


def test_one_writer_per_path_until_the_lease_ends():
    clock, _ab, t = table()
    a = t.grant("/f", "create", 0o644, None)
    with pytest.raises(Conflict):
        t.grant("/f", "overwrite", 0o644, None)
    t.grant("/g", "create", 0o644, None)
    t.drop(a.id)
    t.grant("/f", "create", 0o644, None)


def test_a_lease_expires_without_renewal_and_abandons_its_chunks():
    clock, ab, t = table()
    a = t.grant("/f", "create", 0o600, None)
    a.allocated[7] = ["cs1", "cs2"]
    clock.t += 59
    assert t.renew(a.id) is a and t.allocated(7)
    clock.t += 61
    with pytest.raises(Conflict):
        t.renew(a.id)
    assert ab == [(7, ["cs1", "cs2"])] and not t.allocated(7)
    t.grant("/f", "create", 0o600, None)  # the path is free again


def test_commit_adopts_its_chunks_and_abandons_the_rest():
    _c, ab, t = table()
    a = t.grant("/f", "create", 0o600, None)
    a.allocated = {1: ["cs1"], 2: ["cs2"]}
    t.drop(a.id, committed=frozenset({1}))
    assert ab == [(2, ["cs2"])]


def test_an_append_starts_from_the_files_chunks_and_blocks_rm_above_it():
    _c, _ab, t = table()
    f = ns.File(10, 1, 0o640, (5, 6))
    a = t.grant("/d/f", "append", 0o600, f)
    assert a.base == (5, 6) and a.file_mode == 0o640
    a.inplace = 6
    assert t.being_written(6) and t.allocated(6) and not t.being_written(5)
    with pytest.raises(Conflict):
        t.check_none_below("/d")
    t.check_none_below("/e")
    assert t.grant("/d/g", "overwrite", 0o600, f).base == ()
