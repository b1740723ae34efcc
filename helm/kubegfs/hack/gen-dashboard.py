#!/usr/bin/env python3
"""Writes files/dashboard.json (the Grafana dashboard the chart ships). Edit here, then run:
    python3 helm/kubegfs/hack/gen-dashboard.py
tests/packaging/test_helm.py checks the committed JSON is what this script makes."""

import json
import sys
from pathlib import Path

RI = "$__rate_interval"
NS = 'namespace=~"$namespace"'
_id = 0


def panel(title, targets, x, y, w=8, h=8, kind="timeseries", unit="short", desc="", **extra):
    global _id
    _id += 1
    p = {
        "id": _id, "type": kind, "title": title, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": e, "legendFormat": lf,
             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            for i, (e, lf) in enumerate(targets)
        ],
    }
    p.update(extra)
    return p


def row(title, y):
    global _id
    _id += 1
    return {"id": _id, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def q(hist, qs=(0.5, 0.9, 0.99), sel="", by=""):
    b = f"le{', ' + by if by else ''}"
    s = f"{{{sel}}}" if sel else ""
    return [(f"histogram_quantile({x}, sum by ({b}) (rate({hist}_bucket{s}[{RI}])))", f"p{int(x * 100)}"
             + (f" {{{{{by}}}}}" if by else "")) for x in qs]


panels = [
    row("Snapshots and restores (Snapshot/Restore resources, operator)", 0),
    panel("Snapshot rate", [(f"sum by (namespace, result) (rate(kubegfs_snapshots_total{{{NS}}}[{RI}]))",
                             "{{namespace}} {{result}}")], 0, 1, unit="ops",
          desc="Snapshot resources finished per second, by result"),
    panel("Restore rate", [(f"sum by (namespace, result) (rate(kubegfs_restores_total{{{NS}}}[{RI}]))",
                            "{{namespace}} {{result}}")], 8, 1, unit="ops",
          desc="Restore resources finished per second, by result"),
    panel("Success ratio (1h)", [
        (f'sum(increase(kubegfs_snapshots_total{{{NS}, result="success"}}[1h])) / '
         f"sum(increase(kubegfs_snapshots_total{{{NS}}}[1h]))", "snapshots"),
        (f'sum(increase(kubegfs_restores_total{{{NS}, result="success"}}[1h])) / '
         f"sum(increase(kubegfs_restores_total{{{NS}}}[1h]))", "restores"),
    ], 16, 1, kind="stat", unit="percentunit",
        desc="Share of Snapshot/Restore resources that became Ready in the last hour (NaN: none finished)"),
    panel("Snapshot latency (created to Ready)", q("kubegfs_snapshot_duration_seconds", sel=NS), 0, 9, unit="s"),
    panel("Restore latency (created to Ready)", q("kubegfs_restore_duration_seconds", sel=NS), 8, 9, unit="s"),
    panel("Master: snapshot build and capture latency", [
        *q("kubegfs_snapshot_build_seconds", qs=(0.5, 0.99)),
        (f"histogram_quantile(0.99, sum by (le) (rate(kubegfs_snapshot_capture_seconds_bucket[{RI}])))",
         "capture p99"),
        (f"histogram_quantile(0.99, sum by (le) (rate(kubegfs_master_restore_seconds_bucket[{RI}])))",
         "restore p99"),
    ], 16, 9, unit="s", desc="build = capture to committed (build + ship + log); capture = master pause"),
    panel("Snapshot sizes", [
        (f"sum(rate(kubegfs_snapshot_size_bytes_sum{{{NS}}}[{RI}])) / "
         f"sum(rate(kubegfs_snapshot_size_bytes_count{{{NS}}}[{RI}]))", "logical bytes (avg)"),
        *[(e, "logical " + lf) for e, lf in q("kubegfs_snapshot_size_bytes", qs=(0.9,), sel=NS)],
        *[(e, "SnapObj record " + lf) for e, lf in q("kubegfs_snapshot_record_bytes", qs=(0.5, 0.9))],
    ], 0, 17, unit="bytes"),
    panel("Snapshots in progress", [
        (f"sum by (namespace) (kubegfs_snapshots_in_progress{{{NS}}})", "{{namespace}}")], 8, 17),
    panel("Time since last successful snapshot", [
        (f"time() - max by (namespace) (kubegfs_snapshot_last_success_timestamp_seconds{{{NS}}})",
         "{{namespace}}")], 16, 17, unit="s"),
    panel("Catalog snapshots by state (master)", [
        ("sum by (state) (kubegfs_master_catalog_snapshots)", "{{state}}")], 0, 25),
    panel("Master results", [
        (f"sum by (result) (rate(kubegfs_master_snapshots_total[{RI}]))", "snapshot {{result}}"),
        (f"sum by (result) (rate(kubegfs_master_restores_total[{RI}]))", "restore {{result}}"),
    ], 8, 25, unit="ops"),
    panel("Copy-on-write clones", [
        (f"sum(rate(kubegfs_cow_clones_total[{RI}]))", "ordered by the master"),
        (f"sum(rate(kubegfs_chunkserver_cow_clones_total[{RI}]))", "made by chunkservers"),
    ], 16, 25, unit="ops", desc="A shared chunk cloned locally on its first append after a snapshot"),
    row("Chunkservers and data", 33),
    panel("Chunkservers by state", [("sum by (state) (kubegfs_master_chunkservers)", "{{state}}")], 0, 34),
    panel("Capacity and used", [
        ("sum(kubegfs_chunkserver_capacity_bytes)", "capacity"),
        ("sum(kubegfs_chunkserver_used_bytes)", "used"),
    ], 8, 34, unit="bytes"),
    panel("Used per chunkserver", [
        ("max by (chunkserver, zone) (kubegfs_chunkserver_used_bytes) / "
         "max by (chunkserver, zone) (kubegfs_chunkserver_capacity_bytes)", "{{chunkserver}} ({{zone}})"),
    ], 16, 34, unit="percentunit"),
    panel("Under-replicated chunks", [("sum(kubegfs_master_under_replicated_chunks)", "under-replicated")],
          0, 42),
    panel("Files and chunks", [("sum(kubegfs_master_files)", "files"), ("sum(kubegfs_master_chunks)", "chunks")],
          8, 42),
    panel("Re-replication and GC", [
        (f"sum by (result) (rate(kubegfs_rereplications_total[{RI}]))", "re-replication {{result}}"),
        (f"sum(rate(kubegfs_gc_chunks_deleted_total[{RI}]))", "GC deletes"),
        (f"sum(rate(kubegfs_corrupt_replicas_total[{RI}]))", "corrupt replicas"),
    ], 16, 42, unit="ops"),
    panel("HTTP requests", [
        (f"sum by (component, code) (rate(kubegfs_http_requests_total[{RI}]))", "{{component}} {{code}}")],
        0, 50, unit="reqps"),
    panel("HTTP latency p99", q("kubegfs_http_request_duration_seconds", qs=(0.99,), by="component"),
          8, 50, unit="s"),
    panel("Op-log commit latency", q("kubegfs_oplog_commit_duration_seconds", qs=(0.5, 0.99)), 16, 50, unit="s"),
    row("Snapshot schedules (SnapshotSchedule resources, operator)", 58),
    panel("Scheduled runs finished", [
        (f"sum by (namespace, schedule, result) (rate(kubegfs_schedule_runs_total{{{NS}}}[{RI}]))",
         "{{namespace}}/{{schedule}} {{result}}")], 0, 59, unit="ops"),
    panel("Snapshots kept by retention", [
        (f"max by (namespace, schedule) (kubegfs_snapshots_retained{{{NS}}})", "{{namespace}}/{{schedule}}")],
        8, 59),
    panel("Missed runs (1h)", [
        (f"sum by (namespace, schedule) (increase(kubegfs_schedule_missed_total{{{NS}}}[1h]))",
         "{{namespace}}/{{schedule}}")], 16, 59,
        desc="Runs never started: the operator was down, or they were later than startingDeadlineSeconds"),
    panel("Since last success, in periods", [
        (f"(time() - max by (namespace, schedule) (kubegfs_schedule_last_success_timestamp_seconds{{{NS}}}))"
         f" / max by (namespace, schedule) (kubegfs_schedule_period_seconds{{{NS}}})", "{{namespace}}/{{schedule}}")],
        0, 67, desc="KubegfsScheduleNotSucceeding fires above 2"),
    panel("Time to next run", [
        (f"max by (namespace, schedule) (kubegfs_schedule_next_run_timestamp_seconds{{{NS}}}) - time()",
         "{{namespace}}/{{schedule}}")], 8, 67, unit="s"),
]

dashboard = {
    "uid": "kubegfs-overview",
    "title": "kubegfs",
    "description": "kubegfs: snapshots, restores, chunkservers (shipped by the Helm chart)",
    "tags": ["kubegfs", "storage"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
         "current": {}, "hide": 0},
        {"name": "namespace", "type": "query", "label": "Namespace (of Snapshot/Restore resources)",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(kubegfs_snapshots_total, namespace)", "refId": "ns"},
         "definition": "label_values(kubegfs_snapshots_total, namespace)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}

out = Path(__file__).resolve().parents[1] / "files" / "dashboard.json"
text = json.dumps(dashboard, indent=2, sort_keys=True) + "\n"
if "--check" in sys.argv:
    sys.exit(0 if out.read_text() == text else 1)
out.write_text(text)
