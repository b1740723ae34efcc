"""The deletion gate on its own: orders wait for durability, holds and re-checks."""

from kubegfs.master.outbox import Outbox


class Seqs:
    applied = 0
    durable = 0


def make(wanted=lambda cs, kind, key: True):
    s = Seqs()
    return s, Outbox(lambda: s.applied, lambda: s.durable, wanted)


def test_an_order_waits_until_every_op_applied_before_it_is_durable():
    s, ob = make()
    s.applied, s.durable = 7, 6
    ob.order("cs1", "chunk", 0xA)
    ob.order("cs1", "record", "snap")
    assert ob.take("cs1") == ([], [])
    assert ob.waiting() == 2
    s.durable = 7
    assert ob.take("cs1") == ([0xA], ["snap"])
    assert ob.take("cs1") == ([], []) and ob.waiting() == 0


def test_an_explicit_seq_and_the_newest_tag_win():
    s, ob = make()
    s.applied = 9
    ob.order("cs1", "chunk", 1, seq=3)
    s.durable = 3
    assert ob.take("cs1") == ([1], [])
    ob.order("cs1", "chunk", 2, seq=3)
    ob.order("cs1", "chunk", 2)  # decided again later: rests on op 9 now
    assert ob.take("cs1") == ([], [])
    s.durable = 9
    assert ob.take("cs1") == ([2], [])


def test_a_hold_condition_keeps_everything_queued():
    s, ob = make()
    held = ["safe mode: 10 of 100 chunks reported"]
    ob.hold_deletions(lambda: held[0] if held else None)
    ob.order("cs1", "chunk", 1)
    assert ob.held() == held[0]
    assert ob.take("cs1") == ([], []) and ob.pending("cs1", "chunk", 1)
    held.clear()
    assert ob.take("cs1") == ([1], [])


def test_an_order_gone_stale_while_waiting_is_dropped_not_sent():
    good = {("cs1", 1)}
    s, ob = make(lambda cs, kind, key: (cs, key) not in good)
    ob.order("cs1", "chunk", 1)
    ob.order("cs1", "chunk", 2)
    ob.order("cs2", "chunk", 1)
    assert ob.pending_on("chunk", 1) == {"cs1", "cs2"}
    assert ob.take("cs1") == ([2], []) and ob.dropped == 1
    ob.forget("cs2")
    assert ob.take("cs2") == ([], [])
    ob.order("cs3", "record", "r")
    ob.cancel("cs3", "record", "r")
    assert ob.take("cs3") == ([], [])


def test_not_now_keeps_an_order_queued():
    busy = {1}
    s, ob = make(lambda cs, kind, key: None if key in busy else True)
    ob.order("cs1", "chunk", 1)
    assert ob.take("cs1") == ([], []) and ob.pending("cs1", "chunk", 1)
    busy.clear()
    assert ob.take("cs1") == ([1], [])
