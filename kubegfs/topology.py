"""Topology and placement: pure in-memory logic, no I/O (reused by the operator).

``find_nearest`` ranks chunkservers against a reference point (the master, or a Kubernetes node):
same node, then same zone, then same region, then the longest common IP prefix, then the least
used. ``place_replicas`` spreads chunk replicas over zones first, then nodes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Distance classes, nearest first. The reason strings are part of the API (Snapshot status).
SAME_NODE = "same-node"
SAME_ZONE = "same-zone"
SAME_REGION = "same-region"
IP_PROXIMITY = "ip-proximity"
NO_AFFINITY = "no-affinity"

_REASON_RANK = {SAME_NODE: 0, SAME_ZONE: 1, SAME_REGION: 2, IP_PROXIMITY: 3, NO_AFFINITY: 4}


@dataclass(frozen=True)
class Location:
    """Where something runs: Kubernetes node labels plus an IP address. Empty = unknown."""

    node: str = ""
    zone: str = ""
    region: str = ""
    ip: str = ""

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "zone": self.zone, "region": self.region, "ip": self.ip}

    @classmethod
    def from_json(cls, d: object) -> Location:
        if not isinstance(d, dict):
            return cls()
        return cls(**{k: str(d.get(k) or "") for k in ("node", "zone", "region", "ip")})


@dataclass(frozen=True)
class Candidate:
    """A chunkserver as placement sees it."""

    id: str
    location: Location
    used_bytes: int = 0
    capacity_bytes: int = 0
    address: str = ""

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def utilisation(self) -> float:
        if self.capacity_bytes <= 0:
            return 1.0
        return self.used_bytes / self.capacity_bytes


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    reason: str
    common_ip_bits: int


def _ip_bits(ip: str) -> tuple[int, int] | None:
    """(integer value, width in bits) of an IP address, or None."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return None
    return int(addr), addr.max_prefixlen


def common_prefix_bits(a: str, b: str) -> int:
    """Number of leading bits two IP addresses share (0 if either is missing or families differ)."""
    pa, pb = _ip_bits(a), _ip_bits(b)
    if pa is None or pb is None or pa[1] != pb[1]:
        return 0
    x = pa[0] ^ pb[0]
    return pa[1] - x.bit_length()


def classify(ref: Location, loc: Location) -> tuple[str, int]:
    """The distance class of ``loc`` from ``ref`` and the common IP prefix length."""
    bits = common_prefix_bits(ref.ip, loc.ip)
    if ref.node and loc.node and ref.node == loc.node:
        return SAME_NODE, bits
    if ref.zone and loc.zone and ref.zone == loc.zone and _same_region_or_unknown(ref, loc):
        return SAME_ZONE, bits
    if ref.region and loc.region and ref.region == loc.region:
        return SAME_REGION, bits
    if bits > 0:
        return IP_PROXIMITY, bits
    return NO_AFFINITY, 0


def _same_region_or_unknown(a: Location, b: Location) -> bool:
    # zone names are only unique within a region: "a" in eu-west and "a" in us-east differ.
    return not (a.region and b.region and a.region != b.region)


def find_nearest(ref: Location, candidates: Iterable[Candidate]) -> list[Ranked]:
    """Rank ``candidates`` nearest first: node > zone > region > IP prefix > least used.

    Ties inside a class are broken by the longer common IP prefix, then lower utilisation, then
    the id (so the order is total and deterministic).
    """
    ranked = []
    for c in candidates:
        reason, bits = classify(ref, c.location)
        ranked.append(Ranked(c, reason, bits))
    ranked.sort(
        key=lambda r: (
            _REASON_RANK[r.reason],
            -r.common_ip_bits,
            r.candidate.utilisation,
            r.candidate.id,
        )
    )
    return ranked


def pick_record_holders(ref: Location, candidates: Sequence[Candidate], copies: int) -> list[Ranked]:
    """Order chunkservers for a snapshot record: the nearest first, then further copies each in a
    zone not used yet when the cluster has several, otherwise in the nearest remaining ones.

    Returns the full list in try-order (the first ``copies`` are the preferred holders; the rest
    are fall-backs if a preferred one fails).
    """
    ranked = find_nearest(ref, candidates)
    return diversify(ranked, copies)


def diversify(ranked: list[Ranked], copies: int) -> list[Ranked]:
    """Keep ``ranked[0]`` first; choose the next ``copies-1`` to cover new zones (then new nodes)
    in rank order; append everything else afterwards in rank order."""
    if not ranked:
        return []
    chosen = [ranked[0]]
    rest = list(ranked[1:])
    while len(chosen) < copies and rest:
        zones = {_zone_key(r.candidate.location) for r in chosen}
        nodes = {r.candidate.location.node or r.candidate.id for r in chosen}
        pick = next((r for r in rest if _zone_key(r.candidate.location) not in zones), None)
        if pick is None:
            pick = next(
                (r for r in rest if (r.candidate.location.node or r.candidate.id) not in nodes),
                rest[0],
            )
        chosen.append(pick)
        rest.remove(pick)
    return chosen + rest


def _zone_key(loc: Location) -> tuple[str, str]:
    return (loc.region, loc.zone)


def place_replicas(
    candidates: Sequence[Candidate],
    count: int,
    exclude: Iterable[str] = (),
    existing: Sequence[Candidate] = (),
    need_bytes: int = 0,
) -> list[Candidate]:
    """Choose ``count`` new replica holders: spread over zones first, then nodes, then the most
    free space. ``existing`` replicas count towards the spread; ``exclude`` ids are never chosen.
    Deterministic for a given input."""
    excluded = set(exclude) | {c.id for c in existing}
    pool = [c for c in candidates if c.id not in excluded and c.free_bytes >= need_bytes]
    chosen: list[Candidate] = []
    zones: dict[tuple[str, str], int] = {}
    nodes: dict[str, int] = {}
    for c in existing:
        zones[_zone_key(c.location)] = zones.get(_zone_key(c.location), 0) + 1
        n = c.location.node or c.id
        nodes[n] = nodes.get(n, 0) + 1
    while len(chosen) < count and pool:
        best = min(
            pool,
            key=lambda c: (
                zones.get(_zone_key(c.location), 0),
                nodes.get(c.location.node or c.id, 0),
                c.utilisation,
                -c.free_bytes,
                c.id,
            ),
        )
        chosen.append(best)
        pool.remove(best)
        zones[_zone_key(best.location)] = zones.get(_zone_key(best.location), 0) + 1
        n = best.location.node or best.id
        nodes[n] = nodes.get(n, 0) + 1
    return chosen
