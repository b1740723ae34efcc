"""Cluster identity decisions and the safe-mode state machine, without a server."""

import pytest

from kubegfs.errors import ClusterMismatch
from kubegfs.master import identity as idn
from kubegfs.master.guard import Guard
from kubegfs.master.recovery import parse_rfc3339
from kubegfs.master.safemode import SafeMode, SafeModeConfig
from kubegfs.master.state import rfc3339


def test_empty_dir_is_formatted_provisionally_and_kept(tmp_path):
    ident = idn.open_identity(tmp_path)
    assert ident.provisional and ident.cluster_id.startswith("kgfs-")
    assert idn.open_identity(tmp_path) == ident  # a restart keeps the id


def test_dir_with_a_namespace_but_no_identity_is_confirmed(tmp_path):
    (tmp_path / "log-00000000000000000001.wal").write_bytes(b"")
    assert not idn.open_identity(tmp_path).provisional


def test_format_confirms_a_refusing_dir_with_a_new_id_and_leaves_a_confirmed_one_alone(tmp_path):
    ident = idn.open_identity(tmp_path)
    ident.refusing = idn.Refusal("kgfs-old", "cs-1", 1)
    idn.save(tmp_path, ident)
    formatted = idn.open_identity(tmp_path, format_now=True)
    assert formatted.cluster_id != ident.cluster_id and not formatted.refusing and not formatted.provisional
    assert idn.open_identity(tmp_path, format_now=True) == formatted


@pytest.mark.parametrize("provisional,refusing,theirs,want", [
    (False, False, "kgfs-a", idn.Verdict.ACCEPT),
    (False, False, "", idn.Verdict.ASSIGN),
    (False, False, "kgfs-b", idn.Verdict.REFUSE),
    (True, False, "kgfs-b", idn.Verdict.HOLD),
    (True, False, "", idn.Verdict.ASSIGN),
    (True, True, "kgfs-a", idn.Verdict.REFUSE),
])
def test_judge(provisional, refusing, theirs, want):
    ident = idn.ClusterIdentity("kgfs-a", 0, provisional, idn.Refusal("kgfs-b", "cs", 0) if refusing else None)
    assert idn.judge(ident, theirs) is want


def _guard(tmp_path, grace=30.0):
    return Guard(tmp_path, idn.open_identity(tmp_path), SafeModeConfig(0.5, grace))


def test_provisional_master_meeting_a_chunkserver_with_data_refuses_persistently(tmp_path):
    g = _guard(tmp_path)
    body = {"cluster_id": "kgfs-old", "full": True, "chunks": [["0000000300000001", 1]], "records": ["s-1"]}
    with pytest.raises(ClusterMismatch, match="kubegfs master recover"):
        g.admit("cs-1", "http://127.0.0.1:1", body)
    assert g.refusing and g.holds()
    f = g.foreign["cs-1"]
    assert (f.cluster_id, f.chunks, f.records, f.max_incarnation) == ("kgfs-old", 1, 1, 3)
    # a restart keeps refusing, and now refuses even a brand-new chunkserver
    g2 = _guard(tmp_path)
    assert g2.refusing
    with pytest.raises(ClusterMismatch):
        g2.admit("cs-new", "http://127.0.0.1:2", {"full": True, "chunks": []})
    assert g2.conditions()[0]["reason"] == "LostMetadataSuspected"


def test_id_less_chunkserver_with_data_also_stops_a_provisional_master(tmp_path):
    g = _guard(tmp_path)
    with pytest.raises(ClusterMismatch):
        g.admit("cs-1", "http://127.0.0.1:1", {"full": True, "chunks": [["01", 1]]})
    assert g.refusing


def test_new_chunkserver_confirms_a_provisional_master_then_strangers_are_only_refused(tmp_path):
    g = _guard(tmp_path)
    g.admit("cs-1", "http://127.0.0.1:1", {"full": True, "chunks": []})
    assert not idn.load(tmp_path).provisional
    with pytest.raises(ClusterMismatch, match="belongs to cluster kgfs-other"):
        g.admit("cs-2", "http://127.0.0.1:2", {"cluster_id": "kgfs-other", "full": True, "chunks": [["01", 1]]})
    assert not g.refusing and "cs-2" in g.foreign
    g.admit("cs-1", "http://127.0.0.1:1", {"cluster_id": g.cluster_id})


def test_adopt_takes_the_old_id_and_restarts_safe_mode(tmp_path):
    g = _guard(tmp_path)
    with pytest.raises(ClusterMismatch):
        g.admit("cs-1", "http://127.0.0.1:1", {"cluster_id": "kgfs-old", "full": True, "chunks": [["01", 1]]})
    g.safemode.leave("test", 0.0)
    g.adopt("kgfs-old", "history-1")
    assert idn.load(tmp_path) == idn.ClusterIdentity("kgfs-old", g.ident.created_ns, history="history-1")
    assert g.safemode.on and not g.refusing and not g.foreign
    g.admit("cs-1", "http://127.0.0.1:1", {"cluster_id": "kgfs-old"})


def test_safe_mode_leaves_on_threshold():
    sm = SafeMode(SafeModeConfig(threshold=0.9, grace_seconds=100), now=0.0)
    assert not sm.update(reported=5, known=10, now=1.0) and sm.holds()
    assert sm.status(1.0)["reported_ratio"] == 0.5
    assert sm.update(reported=9, known=10, now=2.0) and not sm.holds()
    assert not sm.update(reported=0, known=10, now=3.0)  # sticky: never re-entered
    assert sm.condition()["status"] == "False" and sm.status(9.0)["seconds"] == 2.0


def test_safe_mode_leaves_after_grace_even_if_chunks_are_missing():
    sm = SafeMode(SafeModeConfig(threshold=1.0, grace_seconds=5), now=10.0)
    assert not sm.update(0, 4, now=14.9)
    assert sm.update(0, 4, now=15.0) and "grace" in sm.reason


def test_safe_mode_with_nothing_known_leaves_at_once():
    sm = SafeMode(SafeModeConfig(), now=0.0)
    assert sm.update(0, 0, now=0.0)


def test_guard_holds_deletions_in_the_gate_until_safe_mode_ends(tmp_path):
    from kubegfs.master.outbox import Outbox

    g = _guard(tmp_path)
    gate = Outbox(lambda: 5, lambda: 5)
    gate.holds.append(g.hold_reason)
    g.waiting = gate.waiting
    gate.order("cs-1", "chunk", 7)
    assert g.hold_reason().startswith("safe mode: ") and gate.take("cs-1") == ([], [])
    assert g.held() == 1
    g.tick([1, 2, 3], {1: {"cs-1"}})  # a third reported, threshold 0.5: still holding
    assert gate.take("cs-1") == ([], [])
    g.tick([1, 2], {1: {"cs-1"}})  # half reported
    assert g.hold_reason() is None and g.held() == 0
    assert gate.take("cs-1") == ([7], [])


def test_safe_mode_counts_only_known_chunks_with_a_replica_whichever_side_it_walks(tmp_path):
    g = _guard(tmp_path)
    known = dict.fromkeys(range(1, 9), 1)
    # few reports (walks the reports): an unknown handle and an empty entry do not count
    g.tick(known, {1: {"cs-1"}, 2: set(), 100: {"cs-1"}, 101: {"cs-2"}, 102: {"cs-2"}})
    assert (g.safemode.reported, g.safemode.known) == (1, 8) and g.holds()
    # more entries than known chunks (walks the chunk table): the same rule
    locs: dict[int, set[str]] = {h: set() for h in range(1, 9)}
    locs.update({1: {"cs-1"}, 2: {"cs-1"}, 3: {"cs-2"}, 200: {"cs-1"}, 201: {"cs-1"}})
    g.tick(known, locs)
    assert (g.safemode.reported, g.safemode.known) == (3, 8) and g.holds()
    locs[4] = {"cs-3"}
    g.tick(known, locs)  # half reported, threshold 0.5
    assert not g.holds()


def test_rfc3339_round_trip():
    ns = 1_764_553_200_123_456_789
    assert rfc3339(parse_rfc3339(rfc3339(ns))) == rfc3339(ns)
    assert parse_rfc3339("garbage") == 0
