"""The benchmark code must not rot: run the in-process benchmarks on tiny trees and check the
shape of what they produce. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from kubegfs import namespace as ns
from kubegfs_dev.bench import inprocess, report, trees
from kubegfs_dev.bench.main import main


def test_tree_generator_builds_what_it_says() -> None:
    made = trees.make_trees([300, 1000])
    t = made[1000]
    files, dirs, chunks, _size = ns.count(t.root)
    assert files == 1000 and dirs == t.dirs and chunks == t.chunks
    # disjoint handle ranges, so the trees can live in one master
    assert made[300].first + made[300].chunks <= t.first
    st = trees.state_with(made)
    for rel in t.sample_files[:5]:
        assert isinstance(st.lookup("/t1000/" + rel)[1], ns.File)


def test_capture_and_seed_rows(tmp_path: Path) -> None:
    made = trees.make_trees([200, 400])
    cap = inprocess.bench_capture(made, repeats=5)
    seed = inprocess.bench_seed(made, cap, {200: 1, 400: 1})
    rows = cap + seed
    assert {r.bench for r in rows} == {"capture", "seed"}
    for r in rows:
        assert r.samples and r.unit
        assert r.lo <= r.median <= r.hi
    assert any(r.met is not None and r.target for r in rows)
    machine = report.machine_info()
    p = report.write_results(rows, machine, tmp_path, {"quick": True})
    doc = json.loads(p.read_text())
    assert set(doc) == {"machine", "config", "rows"}
    assert {"cpu", "cores", "ram_bytes", "python", "date", "git_commit"} <= set(doc["machine"])
    row = doc["rows"][0]
    assert {"bench", "case", "unit", "samples", "median", "min", "max", "target", "met"} <= set(row)
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| benchmark |") and len(md) == len(rows) + 2
    console = Console(record=True, width=160)
    console.print(report.render_table(rows, machine))
    text = console.export_text()
    assert "capture pause, 200 files" in text and "target" in text
    assert [p.name for p in report.plot(rows, tmp_path)] == ["snapshot_scaling.png"]


def test_cli_only_in_process(tmp_path: Path) -> None:
    assert main(["--only", "capture,seed", "--sizes", "100,300", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["only"] == ["capture", "seed"]
    assert (tmp_path / "snapshot_scaling.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("kubegfs-bench-")]  # temp cleaned


def test_hdfs_peer_pairs_rows_by_id_and_ratio_means_kubegfs_faster() -> None:
    from kubegfs_dev.bench import hdfs_peer

    cfg = hdfs_peer.PeerCfg(256 << 20, [10_000], 1.0, 2)
    hdfs = {"hadoop_version": "3.5.0", "rows": [
        {"id": "stat/4", "unit": "ops/s", "samples": [1000.0, 3000.0], "threads": 4},
        {"id": "snapshot/10000", "unit": "s", "samples": [0.002], "files": 10_000},
        {"id": "diff/10000", "unit": "s", "samples": [0.01], "files": 10_000},
    ]}
    kube = {"stat/4": report.Row("hdfs-peer", "k", "ops/s", [4000.0]),
            "snapshot/10000": report.Row("hdfs-peer", "k", "s", [0.02])}
    pairs = hdfs_peer.pair_up(kube, hdfs, cfg)
    assert [p.case for p in pairs] == ["stat of a random file, 4 threads",
                                       "snapshot after 100 changed, 10k files (kubegfs: to Ready)",
                                       "snapshot diff, 10k files, 100 changed"]
    assert pairs[0].speed == 2.0  # 4000/s vs a 2000/s median
    assert abs(pairs[1].speed - 0.1) < 1e-9  # 10× HDFS's time is a tenth of its speed
    rows = hdfs_peer.ratio_rows(pairs)
    assert [r.met for r in rows] == [True, False]  # diff has no kubegfs side: no ratio row
    assert rows[0].extra["kubegfs"] == [4000.0] and rows[0].extra["threads"] == 4
    md = hdfs_peer.markdown_peer_table(pairs)
    assert "| stat of a random file, 4 threads | 4,000/s | 2,000/s | 2.00 | ≥ 1 ✓ |" in md
    assert md.splitlines()[-1].split("|")[2].strip() == "—"  # a workload only HDFS reported: no ratio


def test_hdfs_peer_metadata_only_drops_the_data_and_snapshot_workloads_on_both_sides() -> None:
    from kubegfs_dev.bench import hdfs_peer

    full, meta = hdfs_peer.PeerCfg.for_run(False), hdfs_peer.PeerCfg.for_run(False, metadata_only=True)
    assert full.write_bytes and full.trees  # what --peer all runs
    assert (meta.write_bytes, meta.trees) == (0, [])  # the harness skips data at --write-mib 0, snapshots without trees
    assert (meta.seconds, meta.reps) == (full.seconds, full.reps)  # the rates themselves are measured alike
    java = (hdfs_peer.HARNESS / "src/main/java/kubegfs/hdfspeer/Main.java").read_text()
    assert "if (writeMiB > 0)" in java


def test_hdfs_peer_data_only_runs_the_writes_and_both_reads_on_both_sides() -> None:
    from kubegfs_dev.bench import hdfs_peer

    data = hdfs_peer.PeerCfg.for_run(False, data_only=True)
    assert data.write_bytes and (data.trees, data.metadata) == ([], False)
    java = (hdfs_peer.HARNESS / "src/main/java/kubegfs/hdfspeer/Main.java").read_text()
    assert 'case "--metadata"' in java and 'row("read_sc"' in java
    assert 'setBoolean("dfs.client.use.legacy.blockreader.local", true)' in java
    assert "TCP" in hdfs_peer._label("read", data) and "short-circuit" in hdfs_peer._label("read_sc", data)


def test_pods_bench_is_opt_in_and_its_crs_carry_the_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    from kubegfs_dev.bench import ALL, OPT_IN
    from kubegfs_dev.bench.pods import _snapshot

    assert "pods" in OPT_IN and "pods" not in ALL  # never in `make bench` / bench-quick
    with pytest.raises(SystemExit):
        main(["--only", "nope"])
    assert "pods" in capsys.readouterr().err
    # a CR without a namespace lands in `default`, where no operator of the release watches
    assert _snapshot("kgfs-bench", "b-1")["metadata"] == {"name": "b-1", "namespace": "kgfs-bench"}


def test_ab_creates_arms_name_mode_copies_and_revision(tmp_path: Path) -> None:
    import argparse

    from kubegfs_dev.bench.abcreates import parse_arm, source_tree

    a = parse_arm("main=sync/1@main")
    assert (a.label, a.mode, a.copies, a.rev) == ("main", "sync", 1, "main")
    b = parse_arm("off=off")
    assert (b.mode, b.copies, b.rev) == ("off", 2, "")
    for bad in ("sync", "x=fast", "x=sync/two", "=off"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_arm(bad)
    assert (source_tree("HEAD", tmp_path) / "kubegfs" / "master" / "oplog.py").is_file()


class _FakeClient:
    """Answers the snapshot calls ``snapshot_e2e`` makes and a status whose copies catch up."""

    def __init__(self, ready_in_create: bool, in_sync: list[int]) -> None:
        self.ready_in_create, self.in_sync, self.calls = ready_in_create, in_sync, []

    def api(self, method: str, path: str, **kw: object) -> dict[str, object]:
        self.calls.append((method, path, kw.get("params")))
        return {"id": "s-1", "name": "a", "state": "ready" if self.ready_in_create else "pending"}

    def snapshot_show(self, ref: str) -> dict[str, object]:
        self.calls.append(("GET", ref, None))
        return {"id": ref, "name": "a", "state": "ready"}

    def status(self) -> dict[str, object]:
        n = self.in_sync.pop(0) if len(self.in_sync) > 1 else self.in_sync[0]
        return {"metadata_replication": {"mode": "sync", "copies": 2, "in_sync": n}}


def test_snapshot_e2e_long_polls_as_a_user_and_polls_only_what_is_not_ready_by_then() -> None:
    from kubegfs_dev.bench.cluster import snapshot_e2e, wait_metadata_copies

    c = _FakeClient(True, [2])
    _t, done = snapshot_e2e(c, "/d", "a")
    assert done["state"] == "ready" and c.calls == [("POST", "/snapshots", {"wait": "5"})]
    c = _FakeClient(False, [2])
    snapshot_e2e(c, "/d", "a")
    assert c.calls == [("POST", "/snapshots", {"wait": "5"}), ("GET", "s-1", None)]
    c = _FakeClient(False, [2])
    snapshot_e2e(c, "/d", "a", long_poll=False)  # (the ``during`` benchmark's pace)
    assert c.calls == [("POST", "/snapshots", None), ("GET", "s-1", None)]
    c = _FakeClient(True, [0, 1, 1, 2])
    wait_metadata_copies(c)
    assert c.in_sync == [2]
