"""Every Prometheus metric kubegfs exports, in one place (names ``kubegfs_*``; units in the name).

Each process kind has its own registry so a master does not export operator series and so on.
A name has one meaning in every registry: the master's series about the snapshots it builds are
``kubegfs_master_*``; the operator's about Snapshot resources are ``kubegfs_snapshot*``.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import __version__

MASTER = CollectorRegistry(auto_describe=True)
CHUNKSERVER = CollectorRegistry(auto_describe=True)
OPERATOR = CollectorRegistry(auto_describe=True)

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SNAP_LAT = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_SIZE = tuple(float(1 << s) for s in range(10, 45, 3))  # 1 KiB .. 16 TiB


class HttpMetrics:
    """Request count and latency of one component's HTTP server."""

    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        self.requests = Counter(
            "kubegfs_http_requests_total", "HTTP requests served",
            ["component", "route", "method", "code"], registry=registry,
        )
        self.latency = Histogram(
            "kubegfs_http_request_duration_seconds", "HTTP request latency",
            ["component", "route", "method"], buckets=_LAT, registry=registry,
        )
        self.component = component


def _build_info(registry: CollectorRegistry, component: str) -> Gauge:
    """``kubegfs_build_info{component,version,python}`` = 1: which build runs where, and the
    series whose absence means the component is down."""
    g = Gauge("kubegfs_build_info", "Always 1: the version of this kubegfs process",
              ["component", "version", "python"], registry=registry)
    g.labels(component, __version__, platform.python_version()).set(1)
    return g


# ----------------------------------------------------------------------------- master
MASTER_BUILD = _build_info(MASTER, "master")
MASTER_HTTP = HttpMetrics(MASTER, "master")
M_FILES = Gauge("kubegfs_master_files", "Files in the live namespace", registry=MASTER)
M_CHUNKS = Gauge("kubegfs_master_chunks", "Chunks known to the master", registry=MASTER)
M_UNDER_REPLICATED = Gauge(
    "kubegfs_master_under_replicated_chunks", "Chunks with fewer live replicas than the goal",
    registry=MASTER,
)
M_CHUNKSERVERS = Gauge(
    "kubegfs_master_chunkservers", "Chunkservers by state", ["state"], registry=MASTER
)
M_CS_CAPACITY = Gauge(
    "kubegfs_chunkserver_capacity_bytes", "Chunkserver capacity as reported by heartbeats",
    ["chunkserver", "zone"], registry=MASTER,
)
M_CS_USED = Gauge(
    "kubegfs_chunkserver_used_bytes", "Chunkserver used bytes as reported by heartbeats",
    ["chunkserver", "zone"], registry=MASTER,
)
M_OPLOG_RECORDS = Counter("kubegfs_oplog_records_total", "Op-log records made durable", registry=MASTER)
M_OPLOG_FSYNC = Histogram(
    "kubegfs_oplog_commit_duration_seconds", "Time from apply to durable (group commit)",
    buckets=_LAT, registry=MASTER,
)
M_CHECKPOINTS = Counter("kubegfs_checkpoints_total", "Checkpoints written", ["result"], registry=MASTER)
M_COW = Counter("kubegfs_cow_clones_total", "Copy-on-write chunk clones ordered", registry=MASTER)
M_GC = Counter("kubegfs_gc_chunks_deleted_total", "Chunk replicas ordered deleted by GC", registry=MASTER)
M_REREPL = Counter(
    "kubegfs_rereplications_total", "Chunk re-replications", ["result"], registry=MASTER
)
M_RECORD_REPAIRS = Counter(
    "kubegfs_snapshot_record_repairs_total", "Snapshot record copies re-made after a loss",
    ["result"], registry=MASTER,
)
M_RECORD_DROPPED = Counter(
    "kubegfs_snapshot_record_copies_dropped_total",
    "Snapshot record copies dropped from the catalog (missing, truncated, corrupt, not the catalog's bytes)",
    ["reason"], registry=MASTER,
)
M_SNAP_UNDER_COPIED = Gauge(
    "kubegfs_snapshots_under_copied", "Ready snapshots with fewer live record copies than they ask for",
    registry=MASTER,
)
M_CORRUPT = Counter(
    "kubegfs_corrupt_replicas_total", "Replicas reported corrupt by chunkservers", registry=MASTER
)
M_SNAPSHOTS = Gauge("kubegfs_master_catalog_snapshots", "Snapshots in the catalog", ["state"], registry=MASTER)
M_SNAP_CAPTURE = Histogram(
    "kubegfs_snapshot_capture_seconds", "Master pause to pin a snapshot's point-in-time view",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1), registry=MASTER,
)
M_SNAP_BUILD = Histogram(
    "kubegfs_snapshot_build_seconds", "Capture to committed (build + ship + log)",
    buckets=_SNAP_LAT, registry=MASTER,
)
M_SNAP_RECORD = Histogram(
    "kubegfs_master_snapshot_record_bytes", "Size of the SnapObj records the master built (every snapshot)",
    buckets=_SIZE, registry=MASTER
)
M_SNAP_BLOCKS_SHIPPED = Counter(
    "kubegfs_snapshot_blocks_shipped_total", "Directory blocks shipped to record holders (only those they lacked)",
    registry=MASTER,
)
M_SNAP_RESULT = Counter(
    "kubegfs_master_snapshots_total", "Snapshots finished by the master", ["result"], registry=MASTER
)
M_RESTORE = Histogram(
    "kubegfs_master_restore_seconds", "Restore duration on the master", buckets=_SNAP_LAT,
    registry=MASTER,
)
M_RESTORE_RESULT = Counter(
    "kubegfs_master_restores_total", "Restores by result", ["result"], registry=MASTER
)

# master: cluster identity, safe mode, metadata replication (master/guard.py, metareplica.py)
M_CLUSTER_REFUSALS = Counter(
    "kubegfs_master_cluster_refusals_total", "Heartbeats refused: the chunkserver is of another cluster",
    registry=MASTER,
)
M_REFUSING = Gauge(
    "kubegfs_master_refusing", "1 while the master refuses everything (empty data dir, data on chunkservers)",
    registry=MASTER,
)
M_FOREIGN_CS = Gauge(
    "kubegfs_master_foreign_chunkservers", "Chunkservers of another cluster seen recently", registry=MASTER
)
M_SAFE_MODE = Gauge("kubegfs_master_safe_mode", "1 while the master holds every deletion", registry=MASTER)
M_SAFE_MODE_RATIO = Gauge(
    "kubegfs_master_safe_mode_reported_ratio", "Share of known chunks with a reported replica", registry=MASTER
)
M_DELETIONS_HELD = Gauge(
    "kubegfs_master_deletions_held", "Deletion orders waiting in the gate while safe mode holds them",
    registry=MASTER,
)
M_META_IN_SYNC = Gauge(
    "kubegfs_master_metadata_copies_in_sync", "Chunkservers holding an up-to-date copy of the master's metadata",
    registry=MASTER,
)
M_META_LAG = Gauge(
    "kubegfs_master_metadata_replication_lag_seconds", "Age of the oldest op not yet on the copies (async)",
    registry=MASTER,
)
M_META_DROPS = Counter(
    "kubegfs_master_metadata_copy_failures_total", "Metadata copies that fell out of sync", registry=MASTER
)

# ----------------------------------------------------------------------------- chunkserver
CHUNKSERVER_BUILD = _build_info(CHUNKSERVER, "chunkserver")
CS_HTTP = HttpMetrics(CHUNKSERVER, "chunkserver")
CS_CHUNKS = Gauge("kubegfs_chunkserver_chunks", "Chunks stored", registry=CHUNKSERVER)
CS_BYTES = Gauge("kubegfs_chunkserver_stored_bytes", "Chunk bytes stored", registry=CHUNKSERVER)
CS_RECORDS = Gauge("kubegfs_chunkserver_records", "Snapshot records stored", registry=CHUNKSERVER)
CS_READ_BYTES = Counter("kubegfs_chunkserver_read_bytes_total", "Bytes read", registry=CHUNKSERVER)
CS_WRITE_BYTES = Counter("kubegfs_chunkserver_write_bytes_total", "Bytes written", registry=CHUNKSERVER)
CS_CHECKSUM_FAIL = Counter(
    "kubegfs_chunkserver_checksum_failures_total", "Blocks or records whose checksum failed",
    ["kind"], registry=CHUNKSERVER,
)
CS_SCRUBBED = Counter(
    "kubegfs_chunkserver_scrubbed_chunks_total", "Chunks verified by the background scrubber",
    registry=CHUNKSERVER,
)
CS_CLONES = Counter(
    "kubegfs_chunkserver_cow_clones_total", "Local copy-on-write chunk clones", registry=CHUNKSERVER
)
CS_HEARTBEAT_FAIL = Counter(
    "kubegfs_chunkserver_heartbeat_failures_total", "Heartbeats the master did not answer",
    registry=CHUNKSERVER,
)
CS_SHORT_CIRCUIT_GRANTS = Counter(
    "kubegfs_chunkserver_short_circuit_grants_total",
    "Chunk file descriptors handed to local clients over the short-circuit socket", registry=CHUNKSERVER,
)
CS_SHORT_CIRCUIT_REFUSALS = Counter(
    "kubegfs_chunkserver_short_circuit_refusals_total",
    "Short-circuit requests answered without a descriptor, by reason (the error code; busy: too many clients)",
    ["reason"], registry=CHUNKSERVER,
)
CS_CLUSTER_REFUSALS = Counter(
    "kubegfs_chunkserver_cluster_refusals_total",
    "Masters refused or refusing us because the cluster ids differ", registry=CHUNKSERVER,
)

# ----------------------------------------------------------------------------- operator
OPERATOR_BUILD = _build_info(OPERATOR, "operator")
OPERATOR_HTTP = HttpMetrics(OPERATOR, "operator")
OP_SNAPSHOT_SIZE = Histogram(
    "kubegfs_snapshot_size_bytes", "Logical bytes captured by Snapshot resources",
    ["namespace"], buckets=_SIZE, registry=OPERATOR,
)
OP_SNAPSHOT_RECORD = Histogram(
    "kubegfs_snapshot_record_bytes", "SnapObj record bytes of Snapshot resources",
    ["namespace"], buckets=_SIZE, registry=OPERATOR,
)
OP_SNAPSHOT_DURATION = Histogram(
    "kubegfs_snapshot_duration_seconds", "Snapshot resource: created to Ready",
    ["namespace"], buckets=_SNAP_LAT, registry=OPERATOR,
)
OP_SNAPSHOTS = Counter(
    "kubegfs_snapshots_total", "Snapshot resources finished", ["namespace", "result"],
    registry=OPERATOR,
)
OP_RESTORE_DURATION = Histogram(
    "kubegfs_restore_duration_seconds", "Restore resource: created to Ready",
    ["namespace"], buckets=_SNAP_LAT, registry=OPERATOR,
)
OP_RESTORES = Counter(
    "kubegfs_restores_total", "Restore resources finished", ["namespace", "result"],
    registry=OPERATOR,
)
OP_IN_PROGRESS = Gauge(
    "kubegfs_snapshots_in_progress", "Snapshot resources being taken", ["namespace"],
    registry=OPERATOR,
)
OP_LAST_SUCCESS = Gauge(
    "kubegfs_snapshot_last_success_timestamp_seconds", "Unix time of the last Ready snapshot",
    ["namespace"], registry=OPERATOR,
)
SCHED_RUNS = Counter(
    "kubegfs_schedule_runs_total", "Snapshots of a SnapshotSchedule finished", ["namespace", "schedule", "result"],
    registry=OPERATOR,
)
SCHED_MISSED = Counter(
    "kubegfs_schedule_missed_total", "Scheduled runs never started (operator down, or past the deadline)",
    ["namespace", "schedule"], registry=OPERATOR,
)
SCHED_RETAINED = Gauge(
    "kubegfs_snapshots_retained", "Ready Snapshots a SnapshotSchedule's retention policy keeps",
    ["namespace", "schedule"], registry=OPERATOR,
)
SCHED_NEXT_RUN = Gauge(
    "kubegfs_schedule_next_run_timestamp_seconds", "Unix time of a SnapshotSchedule's next run (absent when suspended)",
    ["namespace", "schedule"], registry=OPERATOR,
)
SCHED_LAST_SUCCESS = Gauge(
    "kubegfs_schedule_last_success_timestamp_seconds",
    "Scheduled time of a SnapshotSchedule's newest Ready Snapshot (its creation while it has none)",
    ["namespace", "schedule"], registry=OPERATOR,
)
SCHED_PERIOD = Gauge(
    "kubegfs_schedule_period_seconds", "A SnapshotSchedule's current interval between runs (absent when suspended)",
    ["namespace", "schedule"], registry=OPERATOR,
)
