"""kubegfs benchmarks: ``python -m kubegfs_dev.bench [--quick] [--out DIR] [--only NAME,...]``.

Every figure is the median of several runs (min–max shown). Speed claims are measured as
ratios *in the same run* (the seed's deep copy + pickle, the disk's own fdatasync speed, loopback
TCP), so they hold on a noisy shared machine. Nothing here asserts a threshold: the ✓/✗ column is
informational, and the process exits 0 unless the benchmark code itself breaks.

Benchmarks (``--only`` names):

* ``capture``    in-loop cost of pinning a snapshot: ``MasterState.apply(snap_capture)``
* ``seed``       the same trees captured the seed's way: ``copy.deepcopy`` + ``pickle.dumps``
* ``incremental`` the master's own work (in process) for a snapshot after 100 files changed in
                 100 directories (digests, diff, blocks to ship, bytes shipped), a holder
                 storing those blocks (rebuilt, hashed, packed, fsynced), a restore in
                 place that undoes them and the diff of two trees 100 files apart
* ``snapshot``   end-to-end snapshot and restore (new path / in place) on a real master that
                 recovered the N-file state from a checkpoint written offline
* ``memory``     master RSS per million files, RSS growth per snapshot after modifying K files
* ``during``     p99 latency of a write stream while snapshots are being taken vs without
* ``throughput`` durable creates/s from 1/4/16 client threads, stat/s and ls/s
* ``datapath``   1 GiB put/get at RF=3 vs the machine's disk and loopback ceilings
* ``recovery``   durable creates with metadata replication sync/async/off; ``master recover``
                 time of the largest size
* ``hdfs``       (only when asked: ``--hdfs``, as ``make bench`` does, or ``--only hdfs``) the same workloads on kubegfs
                 and an HDFS MiniDFSCluster, side by side with a ratio column (``hdfs_peer``)
* ``pods``       (only when asked: ``--only pods``; root) the Helm chart on a 3-node kubelet +
                 containerd cluster: install -> all Ready, 50 Snapshot CRs at once -> each Ready,
                 master pod deleted -> serving again

Outputs: a table on stdout, ``DIR/results.json`` (raw samples + machine), PNG plots in ``DIR``.
"""

ALL = ("capture", "seed", "incremental", "snapshot", "memory", "during", "throughput", "datapath", "operator", "recovery")
CLUSTER_BENCHES = {"snapshot", "memory", "during"}
PEERS = ("hdfs",)  # never in the default set: the first build fetches ~140 MB from Maven Central
OPT_IN = (*PEERS, "pods")  # pods: root, a real-node cluster and an image build; minutes
