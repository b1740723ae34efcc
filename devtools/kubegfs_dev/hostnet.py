"""What a real-node cluster changes on the host, recorded before and undone after.

The kubelets, kube-proxy and the CNI bridge plugin change host state that outlives them: kernel
sysctls (the kubelet sets ``kernel.panic``/``kernel.panic_on_oops``/``vm.overcommit_memory``, the
bridge plugin ``net.ipv4.ip_forward``, kube-proxy conntrack and ``route_localnet``), links and
routes (one bridge per node plus ``kgfs0``, an empty bridge holding the API server's and DNS
server's addresses and the catch-all route of the pod/service range), ``KUBE-*`` iptables chains,
cgroup directories, mounts and a few well-known host directories.

:func:`record` writes the original values into ``host.json`` of the cluster's state directory once
(a second call keeps the first record, so an interrupted run is still restored to the state before
it); :func:`restore` undoes everything and is safe to call any number of times. Nothing here
chooses what to remove by a name pattern of someone else's: links and cgroups are the ones named
in the record, mounts are those under the state directory.

Invariant: after ``restore(state)`` returns, no link, route, mount, cgroup, ``KUBE-*`` chain or
changed sysctl of that cluster is left, and ``host.json`` is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

# Kernel tunables any part of the cluster may change (restored whatever their new value).
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
# Host directories containerd, the kubelet and CNI use whatever their configuration says; removed
# afterwards only if they did not exist before.
HOST_DIRS = ("/run/containerd", "/var/lib/kubelet", "/run/netns", "/var/lib/cni", "/var/log/containers")
CGROUP_ROOT = Path("/sys/fs/cgroup")
IPTABLES_TABLES = ("filter", "nat", "mangle")


class HostRecord(TypedDict):
    sysctls: dict[str, str]
    dirs_existed: dict[str, bool]
    links: list[str]
    cgroups: list[str]


class HostError(RuntimeError):
    """A host command failed."""


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    if check and r.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value + "\n")


def _record_path(state: Path) -> Path:
    return state / "host.json"


def load(state: Path) -> HostRecord | None:
    try:
        data: HostRecord = json.loads(_record_path(state).read_text())
        return data
    except (OSError, ValueError):
        return None


def _save(state: Path, rec: HostRecord) -> None:
    tmp = _record_path(state).with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    tmp.replace(_record_path(state))


def record(state: Path, *, links: Sequence[str], cgroups: Sequence[str]) -> HostRecord:
    """Record the host's values before the cluster changes them (the first record wins)."""
    rec = load(state)
    if rec is None:
        rec = HostRecord(
            sysctls={n: v for n in SYSCTLS if (v := read_sysctl(n)) is not None},
            dirs_existed={d: os.path.exists(d) for d in HOST_DIRS},
            links=[], cgroups=[])
    rec["links"] = sorted(set(rec["links"]) | set(links))
    rec["cgroups"] = sorted(set(rec["cgroups"]) | set(cgroups))
    _save(state, rec)
    return rec


# ----------------------------------------------------------------------------------- links


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def ensure_bridge(name: str, addresses: Iterable[str]) -> None:
    """An up bridge with these addresses (``a.b.c.d/len``)."""
    if not link_exists(name):
        run("ip", "link", "add", name, "type", "bridge")
    have = run("ip", "-o", "-4", "addr", "show", "dev", name).stdout
    for a in addresses:
        if f" {a} " not in have:
            run("ip", "addr", "add", a, "dev", name)
    run("ip", "link", "set", name, "up")


def ensure_route(dst: str, dev: str, src: str) -> None:
    run("ip", "route", "replace", dst, "dev", dev, "src", src)


def delete_link(name: str) -> None:
    if not link_exists(name):
        return
    # veth host ends the CNI plugin attached to this bridge: their pods are gone by now.
    ports = run("ip", "-o", "link", "show", "master", name, check=False).stdout
    for line in ports.splitlines():
        port = line.split(":")[1].strip().split("@")[0]
        run("ip", "link", "del", port, check=False)
    run("ip", "link", "del", name, check=False)


# ----------------------------------------------------------------------------------- cgroups


def cgroup_hierarchies() -> list[Path]:
    """Mounted cgroup hierarchies (v1 controllers and the v2 ``unified`` one)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2") and parts[1].startswith(str(CGROUP_ROOT)):
            out.append(Path(parts[1]))
    return out


def make_cgroup(name: str) -> None:
    """``/<name>`` in every v1 hierarchy (the kubelet's cgroupRoot), cpuset filled in."""
    for h in cgroup_hierarchies():
        if h.name == "unified":
            continue
        d = h / name
        d.mkdir(exist_ok=True)
        if h.name == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((h / f).read_text())


def _cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup dir under ``/<name>`` in every hierarchy, deepest first."""
    dirs: list[Path] = []
    for h in cgroup_hierarchies():
        top = h / name
        if top.is_dir():
            dirs.extend(Path(root) for root, _, _ in os.walk(top))
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for d in _cgroup_dirs(name):
        with contextlib.suppress(OSError, ValueError):
            pids |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
    return pids


def remove_cgroup(name: str, timeout: float = 20) -> None:
    """SIGKILL what still runs in the cgroup tree ``/<name>`` (containers of a stopped node),
    then remove its directories."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for d in _cgroup_dirs(name):
        for _ in range(20):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


# ----------------------------------------------------------------------------------- mounts


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(prefix: Path) -> list[str]:
    pre = str(prefix.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = _unescape(line.split()[4])
        if mp == pre or mp.startswith(pre + "/"):
            found.append(mp)
    return found


def unmount_under(prefix: Path) -> None:
    """Unmount every mount at or below ``prefix``, deepest first (lazily if busy)."""
    for _ in range(5):
        mps = sorted(set(mounts_under(prefix)), key=lambda m: m.count("/"), reverse=True)
        if not mps:
            return
        for mp in mps:
            if run("umount", mp, check=False).returncode != 0:
                run("umount", "-l", mp, check=False)


# ----------------------------------------------------------------------------------- iptables


def _iptables_bins() -> list[str]:
    return [b for b in ("iptables", "ip6tables") if shutil.which(b)]


def remove_kube_chains() -> None:
    """Delete every ``KUBE-*`` chain (kubelet + kube-proxy) and the rules jumping to them."""
    for ipt in _iptables_bins():
        for table in IPTABLES_TABLES:
            rules = run(ipt, "-w", "-t", table, "-S", check=False).stdout.splitlines()
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for r in rules:
                parts = shlex.split(r)
                if parts[:1] == ["-A"] and not parts[1].startswith("KUBE-") and any(
                        p.startswith("KUBE-") for p in parts[2:]):
                    run(ipt, "-w", "-t", table, "-D", *parts[1:], check=False)
            for c in chains:
                run(ipt, "-w", "-t", table, "-F", c, check=False)
            for c in chains:
                run(ipt, "-w", "-t", table, "-X", c, check=False)


def kube_chains() -> list[str]:
    """``table/chain`` of every KUBE-* chain left (for tests of the cleanup)."""
    left = []
    for ipt in _iptables_bins():
        for table in IPTABLES_TABLES:
            out = run(ipt, "-w", "-t", table, "-S", check=False).stdout
            left += [f"{ipt}/{table}/{r.split()[1]}" for r in out.splitlines() if r.startswith("-N KUBE-")]
    return left


# ----------------------------------------------------------------------------------- restore


def restore(state: Path, *, log: Any = None) -> None:
    """Undo what the record names: links, cgroups, KUBE-* chains, sysctls, created host dirs."""
    rec = load(state)
    if rec is None:
        return
    say = log or (lambda _msg: None)
    for name in rec["cgroups"]:
        remove_cgroup(name)
    for name in rec["links"]:
        delete_link(name)
    remove_kube_chains()
    for name, value in rec["sysctls"].items():
        if read_sysctl(name) not in (None, value):
            say(f"sysctl {name}: {read_sysctl(name)} -> {value}")
            with contextlib.suppress(OSError):
                write_sysctl(name, value)
    for d, existed in rec["dirs_existed"].items():
        if not existed and os.path.isdir(d):
            unmount_under(Path(d))
            shutil.rmtree(d, ignore_errors=True)
    _record_path(state).unlink(missing_ok=True)
