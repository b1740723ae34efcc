"""Heartbeats report a chunkserver's records in full or as what changed since the report the
master took last (kubegfs/recordreport.py): the master's view after any sequence of reports is
the chunkserver's records, changes that do not follow the report it took are refused (and a full
one asked for), and anything unanswered makes the next report a full one."""

import random

import pytest

from kubegfs import recordreport as rr
from kubegfs.errors import InvalidArgument

OK = {"records_delta": True}


def test_changes_name_what_is_new_different_or_gone():
    base = {"a": [1, "x"], "b": [2, "y"], "c": [3, "z"]}
    now = {"a": [1, "x"], "b": [2, "w"], "d": [4, "v"]}
    assert rr.changes(base, now) == ({"b": [2, "w"], "d": [4, "v"]}, ["c"])
    assert rr.changes(now, now) == ({}, [])


def test_the_first_report_is_full_then_changes_once_the_master_takes_them():
    r, v = rr.Reporter(), rr.RecordView()
    now = {"a": [1, "x"]}
    b1 = r.report(now)
    assert b1 == {"records": ["a"], "record_digests": now, "records_seq": 1}
    assert v.fold(b1) == ("full", {"a"})
    r.answered(b1, now, OK)
    now2 = {"a": [1, "x"], "b": [2, "y"]}
    b2 = r.report(now2)
    assert b2 == {"records_seq": 2, "records_base": 1, "records_changed": {"b": [2, "y"]}, "records_gone": []}
    assert v.fold(b2) == ("changes", {"b"}) and v.digests == now2
    r.answered(b2, now2, OK)
    b3 = r.report(now2)  # nothing changed: an empty report of changes
    assert (b3["records_changed"], b3["records_gone"]) == ({}, [])
    assert v.fold(b3) == ("changes", set()) and v.digests == now2


def test_a_master_that_does_not_take_changes_always_gets_full_reports():
    r = rr.Reporter()
    now = {"a": [1, "x"]}
    for _ in range(3):
        b = r.report(now)
        assert "records" in b and "records_changed" not in b
        r.answered(b, now, {})  # an older master: no records_delta in its reply


def test_an_unanswered_heartbeat_makes_the_next_report_full():
    r = rr.Reporter()
    now = {"a": [1, "x"]}
    r.answered(r.report(now), now, OK)
    assert "records_changed" in r.report(now)  # sent, never answered (the master may have taken it)
    assert "records" in r.report(now)


def test_a_registration_and_every_full_every_th_report_are_full():
    r = rr.Reporter()
    now = {"a": [1, "x"]}
    r.answered(r.report(now), now, OK)
    b = r.report(now, full=True)
    assert "records" in b
    r.answered(b, now, OK)
    kinds = []
    for _ in range(2 * rr.FULL_EVERY):
        b = r.report(now)
        kinds.append("records" in b)
        r.answered(b, now, OK)
    assert sum(kinds) == 2  # one in every FULL_EVERY


def test_changes_that_do_not_follow_the_report_taken_are_refused_and_a_full_one_asked_for():
    r, v = rr.Reporter(), rr.RecordView()
    now = {"a": [1, "x"]}
    b1 = r.report(now)
    v.fold(b1)
    r.answered(b1, now, OK)
    lost = r.report({"a": [1, "x"], "b": [2, "y"]})  # the master took it; its answer was lost
    assert v.fold(lost)[0] == "changes"
    r.answered(lost, {"a": [1, "x"], "b": [2, "y"]}, OK)
    v2 = rr.RecordView()  # a restarted master knows no report: changes are stale
    b = r.report({"a": [1, "x"]})
    assert v2.fold(b) == ("stale", set()) and v2.digests == {}
    r.answered(b, {"a": [1, "x"]}, {**OK, "records_full": True})
    assert "records" in r.report({"a": [1, "x"]})
    # changes built on a report the master did not take last
    v3 = rr.RecordView(seq=5, digests={"a": [1, "x"]})
    assert v3.fold({"records_seq": 7, "records_base": 4, "records_changed": {}, "records_gone": ["a"]}) == ("stale", set())
    assert v3.digests == {"a": [1, "x"]} and v3.seq == 5


def test_the_masters_view_follows_any_sequence_of_changes():
    rng = random.Random(13)
    r, v = rr.Reporter(), rr.RecordView()
    now: rr.Digests = {}
    for step in range(500):
        now = dict(now)
        for _ in range(rng.randrange(4)):
            rid = f"s-{rng.randrange(40)}"
            if rng.random() < 0.3:
                now.pop(rid, None)
            else:
                now[rid] = [rng.randrange(3), rng.choice(["", "x", "y"])]
        b = r.report(now, full=rng.random() < 0.02)
        lost_answer = rng.random() < 0.1
        dropped = rng.random() < 0.05  # never reached the master
        kind = "stale" if dropped else v.fold(b)[0]
        if kind != "stale":
            assert v.digests == now, step
        if not lost_answer and not dropped:
            r.answered(b, now, {**OK, **({"records_full": True} if kind == "stale" else {})})


@pytest.mark.parametrize("body", [
    {"records": "a"}, {"records": [], "record_digests": ["x"]}, {"records_seq": "1"},
    {"records_seq": 1, "records_base": 0, "records_changed": [], "records_gone": []},
    {"records_seq": 1, "records_base": 0, "records_changed": {}, "records_gone": {"a": 1}},
    {"records_base": 0, "records_changed": {}, "records_gone": []}])
def test_a_malformed_report_is_invalid(body):
    with pytest.raises(InvalidArgument):
        rr.RecordView(seq=0).fold(body)


def test_an_old_chunkservers_report_is_full_and_a_malformed_digest_is_not_checked():
    v = rr.RecordView()
    assert v.fold({"records": ["a", "b", 3], "record_digests": {"a": [1, "x"], "b": "junk"}}) == ("full", {"a", "b"})
    assert v.digests == {"a": [1, "x"], "b": []} and v.seq is None
