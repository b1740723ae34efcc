package kubegfs.hdfspeer;

import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.util.ArrayList;
import java.util.EnumSet;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicReference;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.CreateFlag;
import org.apache.hadoop.fs.FSDataOutputStream;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.permission.FsPermission;
import org.apache.hadoop.hdfs.DistributedFileSystem;
import org.apache.hadoop.hdfs.HdfsConfiguration;
import org.apache.hadoop.hdfs.MiniDFSCluster;
import org.apache.hadoop.hdfs.client.HdfsDataInputStream;
import org.apache.hadoop.hdfs.protocol.SnapshotDiffReport;
import org.apache.hadoop.util.VersionInfo;

/**
 * The HDFS peer of the kubegfs benchmark: one MiniDFSCluster (1 NameNode with edit-log fsync on,
 * 3 DataNodes, replication 3, every socket on 127.0.0.1 with ephemeral ports) driven through
 * the HDFS client library, on the workloads kubegfs_dev.bench.hdfs_peer runs against kubegfs.
 * Prints one JSON object on stdout; Hadoop's logging goes to stderr.
 *
 * <p>Durability, as configured here: every namespace change (create, complete, snapshot) is
 * acknowledged only after the NameNode's edit log is fsynced (MiniDFSCluster skips that fsync
 * unless {@code skipFsyncForTesting(false)}, which we set). The data path runs in two modes:
 * "default" (the HDFS default: a block's bytes are acknowledged once every DataNode in the
 * pipeline has them in its page cache; close() does not fsync) and "sync" (CreateFlag.SYNC_BLOCK
 * plus hsync() before close(): every DataNode fsyncs each block as it is finalized).
 *
 * <p>Reads run twice per round: "read" over TCP from the DataNodes (the client's default), and
 * "read_sc" with HDFS's legacy short-circuit local reads ({@code BlockReaderLocalLegacy},
 * HDFS-2246: {@code dfs.client.read.shortcircuit} and {@code dfs.client.use.legacy.blockreader.local}
 * on a client of its own {@code dfs.client.context}, the DataNodes allowing this user through
 * {@code dfs.block.local-path-access.user}): the client asks the DataNode for the block and
 * checksum files' paths over RPC and reads and verifies them itself. The modern one (HDFS-347,
 * descriptors over a Unix socket) needs libhadoop, which the Maven artifacts do not carry. The
 * row's {@code short_circuit_fraction} is the share of bytes the HDFS client counted as read
 * short-circuit ({@code getReadStatistics}), so a silent fallback to TCP shows.
 *
 * <p>Arguments: {@code --base DIR --write-mib N --trees N,N --seconds S --reps R --modify K
 * [--metadata 0]} ({@code --metadata 0}: no stat, ls or create rows).
 */
public final class Main {
    private static final int MiB = 1 << 20;

    private final List<String> rows = new ArrayList<>();
    private final Configuration conf;
    private final MiniDFSCluster cluster;
    private final DistributedFileSystem fs;

    private Main(File base) throws IOException {
        conf = new HdfsConfiguration();
        conf.set(MiniDFSCluster.HDFS_MINIDFS_BASEDIR, base.getAbsolutePath());
        conf.setInt("dfs.replication", 3);
        conf.setBoolean("dfs.datanode.synconclose", false); // the HDFS default, stated
        // who may ask a DataNode for its block files' paths (legacy short-circuit reads): this user
        conf.set("dfs.block.local-path-access.user", System.getProperty("user.name"));
        cluster = new MiniDFSCluster.Builder(conf)
                .numDataNodes(3)
                .skipFsyncForTesting(false) // edit-log fsync ON
                .build();
        cluster.waitActive();
        fs = cluster.getFileSystem();
    }

    // ----------------------------------------------------------------- helpers

    interface Worker {
        /** Run until the deadline (System.nanoTime()); return the number of operations. */
        long run(FileSystem fs, int thread, long deadline) throws Exception;
    }

    /** ops/s over the wall time of {@code threads} threads, each with its own FileSystem (DFSClient). */
    private double threads(int threads, double seconds, Worker w) throws Exception {
        FileSystem[] clients = new FileSystem[threads];
        for (int i = 0; i < threads; i++) {
            clients[i] = FileSystem.newInstance(fs.getUri(), conf);
        }
        long[] counts = new long[threads];
        AtomicReference<Throwable> err = new AtomicReference<>();
        CyclicBarrier start = new CyclicBarrier(threads + 1);
        Thread[] ts = new Thread[threads];
        long[] t0 = new long[1];
        for (int i = 0; i < threads; i++) {
            final int idx = i;
            ts[i] = new Thread(() -> {
                try {
                    start.await();
                    counts[idx] = w.run(clients[idx], idx, System.nanoTime() + (long) (seconds * 1e9));
                } catch (Throwable e) {
                    err.compareAndSet(null, e);
                }
            });
            ts[i].start();
        }
        start.await();
        t0[0] = System.nanoTime();
        for (Thread t : ts) {
            t.join();
        }
        double wall = (System.nanoTime() - t0[0]) / 1e9;
        for (FileSystem c : clients) {
            c.close();
        }
        if (err.get() != null) {
            throw new IOException("worker failed", err.get());
        }
        long sum = 0;
        for (long c : counts) {
            sum += c;
        }
        return sum / wall;
    }

    private void row(String id, String unit, List<Double> samples, String extra) {
        StringBuilder sb = new StringBuilder();
        sb.append("{\"id\":\"").append(id).append("\",\"unit\":\"").append(unit).append("\",\"samples\":[");
        for (int i = 0; i < samples.size(); i++) {
            sb.append(i == 0 ? "" : ",").append(String.format(Locale.ROOT, "%.9g", samples.get(i)));
        }
        sb.append("]");
        if (!extra.isEmpty()) {
            sb.append(",").append(extra);
        }
        rows.add(sb.append("}").toString());
        System.err.println("hdfs-peer: " + rows.get(rows.size() - 1));
    }

    private static void createEmpty(FileSystem c, Path p) throws IOException {
        c.create(p, false).close();
    }

    // ----------------------------------------------------------------- workloads

    private void metadata(double seconds, int reps) throws Exception {
        Path st = new Path("/st");
        fs.mkdirs(st);
        for (int i = 0; i < 100; i++) {
            createEmpty(fs, new Path(st, "f" + i));
        }
        Path warm = new Path("/warmup");
        fs.mkdirs(warm);
        threads(4, Math.max(1.0, seconds), (c, i, deadline) -> { // JIT warm-up, not measured
            long k = 0;
            while (System.nanoTime() < deadline) {
                c.getFileStatus(new Path("/st/f" + (k % 100)));
                c.listStatus(st);
                createEmpty(c, new Path(warm, "w" + i + "-" + k));
                k++;
            }
            return k;
        });
        for (int nt : new int[] {1, 4}) {
            List<Double> stat = new ArrayList<>();
            List<Double> ls = new ArrayList<>();
            List<Double> creates = new ArrayList<>();
            for (int r = 0; r < reps; r++) {
                stat.add(threads(nt, seconds, (c, i, deadline) -> {
                    long k = 0;
                    ThreadLocalRandom rnd = ThreadLocalRandom.current();
                    while (System.nanoTime() < deadline) {
                        c.getFileStatus(new Path("/st/f" + rnd.nextInt(100)));
                        k++;
                    }
                    return k;
                }));
                ls.add(threads(nt, seconds, (c, i, deadline) -> {
                    long k = 0;
                    while (System.nanoTime() < deadline) {
                        if (c.listStatus(st).length != 100) {
                            throw new IOException("ls /st: expected 100 entries");
                        }
                        k++;
                    }
                    return k;
                }));
                Path dir = new Path("/cr" + nt + "-" + r);
                fs.mkdirs(dir);
                creates.add(threads(nt, seconds, (c, i, deadline) -> {
                    long k = 0;
                    while (System.nanoTime() < deadline) {
                        createEmpty(c, new Path(dir, "w" + i + "-" + k));
                        k++;
                    }
                    return k;
                }));
            }
            String t = "\"threads\":" + nt;
            row("stat/" + nt, "ops/s", stat, t);
            row("ls/" + nt, "ops/s", ls, t);
            row("create/" + nt, "ops/s", creates, t);
        }
    }

    private void data(long size, int reps) throws Exception {
        byte[] buf = new byte[4 * MiB];
        ThreadLocalRandom.current().nextBytes(buf);
        List<Double> def = new ArrayList<>();
        List<Double> sync = new ArrayList<>();
        List<Double> read = new ArrayList<>();
        List<Double> readSc = new ArrayList<>();
        long scBytes = 0;
        long scTotal = 0;
        Configuration scConf = new Configuration(conf);
        scConf.setBoolean("dfs.client.read.shortcircuit", true);
        scConf.setBoolean("dfs.client.use.legacy.blockreader.local", true);
        scConf.set("dfs.client.context", "short-circuit"); // a ClientContext of its own (it caches the mode)
        FileSystem scFs = FileSystem.newInstance(fs.getUri(), scConf);
        long blockSize = fs.getDefaultBlockSize(new Path("/"));
        for (int r = 0; r < reps; r++) {
            for (boolean syncMode : new boolean[] {false, true}) {
                Path p = new Path(syncMode ? "/big-sync.bin" : "/big.bin");
                long t0 = System.nanoTime();
                FSDataOutputStream out = syncMode
                        ? fs.create(p, FsPermission.getFileDefault(),
                                EnumSet.of(CreateFlag.CREATE, CreateFlag.OVERWRITE, CreateFlag.SYNC_BLOCK),
                                64 * 1024, (short) 3, blockSize, null)
                        : fs.create(p, true, 64 * 1024, (short) 3, blockSize);
                for (long left = size, i = 0; left > 0; left -= buf.length, i++) {
                    buf[0] = (byte) i; // every piece differs
                    out.write(buf, 0, (int) Math.min(left, buf.length));
                }
                if (syncMode) {
                    out.hsync();
                }
                out.close();
                (syncMode ? sync : def).add(size / ((System.nanoTime() - t0) / 1e9) / 1e6);
            }
            for (boolean local : new boolean[] {false, true}) {
                long t0 = System.nanoTime();
                long got = 0;
                try (InputStream in = (local ? scFs : fs).open(new Path("/big.bin"))) {
                    for (int n; (n = in.read(buf)) > 0; ) {
                        got += n;
                    }
                    if (local) {
                        scBytes += ((HdfsDataInputStream) in).getReadStatistics().getTotalShortCircuitBytesRead();
                        scTotal += got;
                    }
                }
                if (got != size) {
                    throw new IOException("read " + got + " bytes, wrote " + size);
                }
                (local ? readSc : read).add(got / ((System.nanoTime() - t0) / 1e9) / 1e6);
            }
        }
        scFs.close();
        String e = "\"bytes\":" + size + ",\"block_size\":" + blockSize;
        row("write_default", "MB/s", def, e);
        row("write_sync", "MB/s", sync, e);
        row("read", "MB/s", read, e);
        row("read_sc", "MB/s", readSc, e + String.format(Locale.ROOT, ",\"short_circuit_fraction\":%.4f",
                scTotal == 0 ? 0.0 : (double) scBytes / scTotal));
    }

    /** N empty files, 250 to a directory, created from 16 threads (the edit log groups their fsyncs). */
    private double buildTree(Path root, int files) throws Exception {
        long t0 = System.nanoTime();
        int dirs = (files + 249) / 250;
        for (int d = 0; d < dirs; d++) {
            fs.mkdirs(new Path(root, "d" + d));
        }
        int nt = 16;
        AtomicReference<Throwable> err = new AtomicReference<>();
        Thread[] ts = new Thread[nt];
        for (int i = 0; i < nt; i++) {
            final int idx = i;
            ts[i] = new Thread(() -> {
                try (FileSystem c = FileSystem.newInstance(fs.getUri(), conf)) {
                    for (int f = idx; f < files; f += nt) {
                        createEmpty(c, new Path(root, "d" + (f / 250) + "/f" + (f % 250)));
                    }
                } catch (Throwable e) {
                    err.compareAndSet(null, e);
                }
            });
            ts[i].start();
        }
        for (Thread t : ts) {
            t.join();
        }
        if (err.get() != null) {
            throw new IOException("building " + root, err.get());
        }
        return (System.nanoTime() - t0) / 1e9;
    }

    private void snapshots(int[] sizes, int modify, int reps) throws Exception {
        byte[] one = new byte[1024];
        for (int n : sizes) {
            Path root = new Path("/snap" + n);
            double built = buildTree(root, n);
            fs.allowSnapshot(root);
            long t0 = System.nanoTime();
            fs.createSnapshot(root, "s0");
            double first = (System.nanoTime() - t0) / 1e9;
            List<Double> snap = new ArrayList<>();
            List<Double> diff = new ArrayList<>();
            int entries = 0;
            for (int r = 1; r <= reps; r++) {
                for (int j = 0; j < modify; j++) {
                    int f = (int) ((long) (r * modify + j) * 7919 % n);
                    try (FSDataOutputStream out = fs.create(new Path(root, "d" + (f / 250) + "/f" + (f % 250)), true)) {
                        out.write(one);
                    }
                }
                t0 = System.nanoTime();
                fs.createSnapshot(root, "s" + r);
                snap.add((System.nanoTime() - t0) / 1e9);
                t0 = System.nanoTime();
                SnapshotDiffReport rep = fs.getSnapshotDiffReport(root, "s" + (r - 1), "s" + r);
                diff.add((System.nanoTime() - t0) / 1e9);
                entries = rep.getDiffList().size();
            }
            row("snapshot_first/" + n, "s", List.of(first), "\"files\":" + n + ",\"build_seconds\":" + built);
            row("snapshot/" + n, "s", snap, "\"files\":" + n + ",\"modified\":" + modify);
            row("diff/" + n, "s", diff, "\"files\":" + n + ",\"modified\":" + modify + ",\"diff_entries\":" + entries);
        }
    }

    private void close() throws IOException {
        fs.close();
        cluster.shutdown(true);
    }

    public static void main(String[] args) throws Exception {
        File base = null;
        long writeMiB = 256;
        int[] trees = {10_000};
        double seconds = 2.0;
        int reps = 3;
        int modify = 100;
        boolean metadata = true;
        for (int i = 0; i < args.length; i += 2) {
            String v = i + 1 < args.length ? args[i + 1] : "";
            switch (args[i]) {
                case "--base" -> base = new File(v);
                case "--write-mib" -> writeMiB = Long.parseLong(v);
                case "--trees" -> trees = v.isEmpty() ? new int[0]
                        : java.util.Arrays.stream(v.split(",")).mapToInt(Integer::parseInt).toArray();
                case "--seconds" -> seconds = Double.parseDouble(v);
                case "--reps" -> reps = Integer.parseInt(v);
                case "--modify" -> modify = Integer.parseInt(v);
                case "--metadata" -> metadata = !v.equals("0");
                default -> {
                    System.err.println("hdfs-peer: unknown argument " + args[i]);
                    System.exit(2);
                }
            }
        }
        if (base == null) {
            System.err.println("hdfs-peer: --base DIR is required");
            System.exit(2);
        }
        long t0 = System.nanoTime();
        Main m = new Main(base);
        double startup = (System.nanoTime() - t0) / 1e9;
        try {
            if (metadata) {
                m.metadata(seconds, reps);
            }
            if (writeMiB > 0) { // 0 (the bench's --peer metadata): stat, ls and creates only
                m.data(writeMiB * MiB, reps);
            }
            m.snapshots(trees, modify, reps);
        } finally {
            m.close();
        }
        StringBuilder sb = new StringBuilder("{\"peer\":\"hdfs\",\"hadoop_version\":\"")
                .append(VersionInfo.getVersion()).append("\",\"java\":\"")
                .append(System.getProperty("java.version")).append("\",")
                .append(String.format(Locale.ROOT, "\"startup_seconds\":%.3f,", startup))
                .append("\"durability\":{\"namenode\":\"edit log fsynced before every namespace change is acknowledged\",")
                .append("\"write_default\":\"HDFS default: acknowledged when all 3 DataNodes have the bytes (page cache), no fsync\",")
                .append("\"write_sync\":\"CreateFlag.SYNC_BLOCK + hsync() before close(): every DataNode fsyncs each block\"},")
                .append("\"rows\":[").append(String.join(",", m.rows)).append("]}");
        System.out.println(sb);
        System.exit(0); // MiniDFSCluster leaves non-daemon threads behind
    }
}
