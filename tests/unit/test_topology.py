from kubegfs.topology import (
    IP_PROXIMITY,
    NO_AFFINITY,
    SAME_NODE,
    SAME_REGION,
    SAME_ZONE,
    Candidate,
    Location,
    common_prefix_bits,
    find_nearest,
    pick_record_holders,
    place_replicas,
)


def cs(i, node="", zone="", region="", ip="", used=0, cap=100):
    return Candidate(f"cs{i}", Location(node, zone, region, ip), used, cap)


REF = Location("n1", "z1", "r1", "10.0.1.5")


def test_same_node_wins_over_everything():
    c = [cs(1, "n9", "z1", "r1", "10.0.1.6"), cs(2, "n1", "z7", "r9", "192.168.0.1")]
    r = find_nearest(REF, c)
    assert [x.candidate.id for x in r] == ["cs2", "cs1"]
    assert r[0].reason == SAME_NODE and r[1].reason == SAME_ZONE


def test_zone_then_region_then_ip_then_none():
    c = [
        cs(1, "a", "", "", "172.16.0.1"),
        cs(2, "b", "z2", "r1", "10.9.0.1"),
        cs(3, "c", "z1", "r1", "10.200.0.1"),
        cs(4, "d", "", "", "10.0.1.77"),
    ]
    r = find_nearest(REF, c)
    assert [x.candidate.id for x in r] == ["cs3", "cs2", "cs4", "cs1"]
    assert [x.reason for x in r] == [SAME_ZONE, SAME_REGION, IP_PROXIMITY, NO_AFFINITY]
    assert r[2].common_ip_bits == 25


def test_zone_name_in_another_region_is_not_same_zone():
    r = find_nearest(REF, [cs(1, "x", "z1", "r2", "")])
    assert r[0].reason == NO_AFFINITY


def test_ties_broken_by_utilisation_then_id():
    c = [cs(2, "x", "z1", "r1", used=90), cs(1, "y", "z1", "r1", used=10), cs(3, "w", "z1", "r1", used=10)]
    assert [x.candidate.id for x in find_nearest(REF, c)] == ["cs1", "cs3", "cs2"]


def test_ip_prefix_bits():
    assert common_prefix_bits("10.0.0.1", "10.0.0.1") == 32
    assert common_prefix_bits("10.0.0.0", "10.0.0.1") == 31
    assert common_prefix_bits("127.0.1.1", "127.0.2.1") == 22
    assert common_prefix_bits("10.0.0.1", "::1") == 0
    assert common_prefix_bits("", "10.0.0.1") == 0
    assert common_prefix_bits("not-an-ip", "10.0.0.1") == 0


def test_record_holders_cover_distinct_zones():
    c = [cs(1, "n1", "z1", "r1"), cs(2, "n2", "z1", "r1"), cs(3, "n3", "z2", "r1"), cs(4, "n4", "z3", "r1")]
    r = pick_record_holders(REF, c, 2)
    assert r[0].candidate.id == "cs1"  # same node
    assert r[1].candidate.location.zone != "z1"  # second copy in another zone
    assert {x.candidate.id for x in r} == {"cs1", "cs2", "cs3", "cs4"}  # rest kept as fall-backs


def test_record_holders_single_zone_prefers_other_node():
    c = [cs(1, "n1", "z1", "r1"), cs(2, "n1", "z1", "r1"), cs(3, "n3", "z1", "r1")]
    r = pick_record_holders(REF, c, 2)
    assert r[0].candidate.location.node == "n1"
    assert r[1].candidate.id == "cs3"


def test_place_replicas_spreads_zones_then_nodes():
    c = [cs(1, "n1", "z1"), cs(2, "n2", "z1"), cs(3, "n3", "z2"), cs(4, "n4", "z3"), cs(5, "n5", "z3")]
    chosen = place_replicas(c, 3)
    assert len({x.location.zone for x in chosen}) == 3
    more = place_replicas(c, 2, existing=chosen)
    assert not {x.id for x in more} & {x.id for x in chosen}


def test_place_replicas_with_existing_and_exclusions_and_space():
    c = [cs(1, "n1", "z1"), cs(2, "n2", "z2", used=99), cs(3, "n3", "z2")]
    got = place_replicas(c, 1, existing=[c[0]], need_bytes=10)
    assert [x.id for x in got] == ["cs3"]  # cs2 lacks space; z2 preferred over z1
    assert place_replicas(c, 5, exclude={"cs1", "cs2", "cs3"}) == []


def test_place_replicas_is_deterministic():
    c = [cs(i, f"n{i}", f"z{i % 2}") for i in range(8)]
    assert place_replicas(c, 3) == place_replicas(list(reversed(c)), 3)
