"""The kubegfs installation as the operator sees it: master and chunkserver pods, their nodes'
topology labels, and the chunkservers ranked by distance to the master pod's node.

``build_view`` is pure (dicts in, view out); ``WatchedViews`` builds views from watched pods
(``podwatch``) and nodes' labels (``NodeLabels``, read at most every 30 s)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kubegfs.topology import Candidate, Location, Ranked, pick_record_holders

from .api import ClusterRef

HOSTNAME = "kubernetes.io/hostname"
ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"

PODS_SELECTOR = f"{NAME_LABEL}=kubegfs"  # every kubegfs pod of a namespace (WatchedViews)

C = TypeVar("C")  # a master client (MasterClients)


@dataclass(frozen=True)
class PodInfo:
    name: str
    ip: str
    node: str
    zone: str
    region: str
    port: int
    scheme: str = "http"  # https when the cluster serves TLS (the operator's KUBEGFS_SCHEME)
    uid: str = ""  # the pod's uid (Events about the installation go on the master pod)

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def location(self) -> Location:
        return Location(self.node, self.zone, self.region, self.ip)

    def to_json(self) -> dict[str, str]:
        return {"pod": self.name, "node": self.node, "zone": self.zone, "region": self.region}


@dataclass(frozen=True)
class ClusterView:
    ref: ClusterRef
    master: PodInfo | None
    chunkservers: tuple[PodInfo, ...]

    def rank(self, copies: int) -> list[Ranked]:
        """Chunkserver pods nearest to the master pod's node first; further copies in new zones."""
        if self.master is None:
            return []
        cands = [Candidate(p.name, p.location, address=p.url) for p in self.chunkservers]
        return pick_record_holders(self.master.location, cands, copies)

    def pods_by_ip(self) -> dict[str, dict[str, str]]:
        return {p.ip: p.to_json() for p in self.chunkservers}


def _pod_ready(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    if st.get("phase") != "Running" or not st.get("podIP"):
        return False
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def _port(pod: dict[str, Any], default: int) -> int:
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == "http" and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return default


def pod_info(pod: dict[str, Any], nodes: dict[str, dict[str, str]], default_port: int,
             scheme: str = "http") -> PodInfo:
    node = (pod.get("spec") or {}).get("nodeName") or ""
    labels = nodes.get(node, {})
    return PodInfo(
        name=pod["metadata"]["name"], ip=pod["status"]["podIP"], node=labels.get(HOSTNAME, node),
        zone=labels.get(ZONE, ""), region=labels.get(REGION, ""), port=_port(pod, default_port), scheme=scheme,
        uid=str(pod["metadata"].get("uid") or ""),
    )


def build_view(ref: ClusterRef, masters: list[dict[str, Any]], chunkservers: list[dict[str, Any]],
               nodes: dict[str, dict[str, str]], master_port: int = 9400,
               chunkserver_port: int = 9500, scheme: str = "http") -> ClusterView:
    ready_masters = sorted((p for p in masters if _pod_ready(p)), key=lambda p: p["metadata"]["name"])
    master = pod_info(ready_masters[0], nodes, master_port, scheme) if ready_masters else None
    cs = tuple(sorted((pod_info(p, nodes, chunkserver_port, scheme) for p in chunkservers if _pod_ready(p)),
                      key=lambda p: p.name))
    return ClusterView(ref, master, cs)


class NodeLabels:
    """Nodes' labels, each read at most once per ``ttl`` seconds (a burst of objects costs no node
    reads). Node topology labels (zone, region) are set when a node joins and rarely change; a relabelled
    node is seen within ``ttl``, and until then a record may go to a pod that is no longer the
    nearest, never to one that is gone. A node that cannot be read has no labels and is read again
    next time."""

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, dict[str, str]]] = {}

    def get(self, name: str, read: Callable[[str], dict[str, str]]) -> dict[str, str]:
        """``name``'s labels: remembered, or ``read(name)`` now."""
        now = self._clock()
        with self._lock:
            hit = self._seen.get(name)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        try:
            labels = read(name)
        except Exception:  # noqa: BLE001 - a vanished node just has no labels
            return {}
        with self._lock:
            self._seen[name] = (now, labels)
            if len(self._seen) > 4096:  # nodes come and go: forget the oldest reads
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:1024]:
                    del self._seen[old]
        return labels


class WatchedViews:
    """Views of installations from watched pods: one ``PodWatch`` per namespace (made by ``watch``
    on the first view asked of it, then kept), nodes' labels through ``node_labels``.

    Pods come from a watch, as any controller's informer cache: a view costs no API call, so a
    burst of objects does not wait on pod listings. A pod deleted in the last moments before a view
    may still be offered; the master then ships to the next pod in the ranking. Until a
    namespace's first listing is in (at most ``sync_timeout`` seconds) ``get`` waits; past that
    it raises, and the handler is retried."""

    def __init__(self, watch: Callable[[str], Any], read_node: Callable[[str], dict[str, str]],
                 node_labels: NodeLabels, master_port: int = 9400, chunkserver_port: int = 9500,
                 scheme: str = "http", sync_timeout: float = 10.0) -> None:
        self._watch, self._read_node, self._labels = watch, read_node, node_labels
        self._ports = (master_port, chunkserver_port)
        self._scheme, self._sync_timeout = scheme, sync_timeout
        self._lock = threading.Lock()
        self._watches: dict[str, Any] = {}

    def get(self, ref: ClusterRef) -> ClusterView:
        with self._lock:
            w = self._watches.get(ref.namespace)
            if w is None:
                w = self._watches[ref.namespace] = self._watch(ref.namespace)
        if not w.wait_synced(self._sync_timeout):
            raise RuntimeError(f"the pods of namespace {ref.namespace} are not listed yet"
                               + (f": {w.error}" if w.error else ""))
        mine = [p for p in w.pods() if ((p.get("metadata") or {}).get("labels") or {}).get(INSTANCE_LABEL) == ref.name]
        by = {c: [p for p in mine if p["metadata"]["labels"].get(COMPONENT_LABEL) == c] for c in ("master", "chunkserver")}
        nodes: dict[str, dict[str, str]] = {}
        for p in by["master"] + by["chunkserver"]:
            n = (p.get("spec") or {}).get("nodeName")
            if n and n not in nodes:
                nodes[n] = self._labels.get(n, self._read_node)
        return build_view(ref, by["master"], by["chunkserver"], nodes, *self._ports, self._scheme)

    def stop(self) -> None:
        with self._lock:
            watches, self._watches = list(self._watches.values()), {}
        for w in watches:
            w.stop()


class MasterClients(Generic[C]):
    """One long-lived client per master URL, shared by every handler thread.

    A client keeps one keep-alive connection per thread, so a burst of objects costs each of the
    operator's worker threads one TLS handshake with the master instead of one per call, and the
    client's TLS context (its CA bundle) is loaded once. At most ``keep`` URLs are remembered; a
    master pod that moved to another IP leaves its old client to be dropped (its connections close
    when it is garbage-collected). Callers never close a client they were given."""

    def __init__(self, make: Callable[[str], C], keep: int = 8) -> None:
        self._make = make
        self._keep = keep
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, C] = OrderedDict()

    def get(self, url: str) -> C:
        with self._lock:
            c = self._clients.get(url)
            if c is None:
                c = self._clients[url] = self._make(url)
                while len(self._clients) > self._keep:
                    self._clients.popitem(last=False)
            else:
                self._clients.move_to_end(url)
            return c
