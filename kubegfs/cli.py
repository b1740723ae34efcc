"""The ``kubegfs`` command line: servers, files, snapshots, the local stack and the demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from .errors import KubegfsError
from .topology import Location

SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in SIZE_UNITS or not num.isdigit():
        raise click.BadParameter(f"bad size {text!r} (e.g. 64MiB, 1m, 65536)")
    return int(num) * SIZE_UNITS[unit]


def fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"kubegfs: error: {msg}", err=True)
    sys.exit(code)


def read_token(token: str | None, token_file: str | None) -> str:
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            fail(f"cannot read token file {token_file}: {exc.strerror}")
    if token:
        return token
    fail("no token: pass --token, --token-file or set KUBEGFS_TOKEN")


class Ctx:
    def __init__(self, master: str, token: str | None, as_json: bool) -> None:
        self.master = master
        token_file = click.get_current_context().meta.get(TOKEN_FILE_META)
        self.token = read_token(token, token_file) if token_file else token
        self.json = as_json

    def client(self) -> Any:
        from .client import Client

        try:
            return Client(self.master, self.token)
        except KubegfsError as exc:
            fail(exc.message)

    def out(self, data: Any, human: Any = None) -> None:
        if self.json or human is None:
            click.echo(json.dumps(data, indent=None if self.json else 2, sort_keys=True))
        else:
            human(data)


TOKEN_FILE_META = "kubegfs.token_file"


def _token_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[TOKEN_FILE_META] = value


def client_options(f: Any) -> Any:
    f = click.option("--json", "as_json", is_flag=True, help="machine-readable output")(f)
    f = click.option("--token-file", envvar="KUBEGFS_TOKEN_FILE", expose_value=False, callback=_token_file,
                     help="file holding the token, e.g. /etc/kubegfs/token in the pods (wins over --token)")(f)
    f = click.option("--token", envvar="KUBEGFS_TOKEN", help="shared token (env KUBEGFS_TOKEN)")(f)
    f = click.option("--master", envvar="KUBEGFS_MASTER", default="http://127.0.0.1:9400",
                     show_default=True, help="master URL (env KUBEGFS_MASTER)")(f)
    return f


class Group(click.Group):
    """Turns KubegfsError into one clear line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KubegfsError as exc:
            fail(exc.message, 2 if 400 <= exc.status < 500 else 1)
        except OSError as exc:  # a local file or directory (e.g. fs get into a missing directory)
            fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))


@click.group(cls=Group)
@click.option("--log-level", envvar="KUBEGFS_LOG_LEVEL", default="INFO", show_default=True)
@click.option("--log-format", envvar="KUBEGFS_LOG_FORMAT", type=click.Choice(["text", "json"]), default="text")
@click.version_option(package_name="kubegfs")
def main(log_level: str, log_format: str) -> None:
    """kubegfs: a GFS-style file system with point-in-time directory snapshots."""
    from . import logs

    logs.setup(log_level, log_format)


# ----------------------------------------------------------------------------- servers


def topology_options(f: Any) -> Any:
    f = click.option("--topology-from-node", envvar="KUBEGFS_TOPOLOGY_FROM_NODE", is_flag=True,
                     help="read zone/region from the labels of node --node via the Kubernetes API")(f)
    f = click.option("--region", envvar="KUBEGFS_REGION", default="", help="topology.kubernetes.io/region")(f)
    f = click.option("--zone", envvar="KUBEGFS_ZONE", default="", help="topology.kubernetes.io/zone")(f)
    f = click.option("--node", envvar="KUBEGFS_NODE", default="", help="kubernetes.io/hostname")(f)
    return f


@main.group(cls=Group, invoke_without_command=True)
@click.option("--listen", default="127.0.0.1:9400", show_default=True, help="HOST:PORT")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), help="op log + checkpoints (required to run)")
@click.option("--token", envvar="KUBEGFS_TOKEN")
@click.option("--token-file", envvar="KUBEGFS_TOKEN_FILE")
@click.option("--chunk-size", default="64MiB", show_default=True, help="only used when the file system is new")
@click.option("--replication", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option("--dead-after", default=5.0, show_default=True, help="seconds without heartbeat before a chunkserver is dead")
@click.option("--checkpoint-interval", default=300.0, show_default=True)
@click.option("--checkpoint-ops", default=100_000, show_default=True)
@click.option("--format", "format_", is_flag=True,
              help="start a new cluster in an empty or refusing data dir (chunkservers of the old one stay refused)")
@click.option("--safe-mode-threshold", default=0.999, show_default=True, type=click.FloatRange(0, 1),
              help="after a start, delete nothing until this share of known chunks has been reported")
@click.option("--safe-mode-grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="...or until this many seconds have passed")
@click.option("--metadata-replication", type=click.Choice(["sync", "async", "off"]), default="sync",
              show_default=True, help="copy the op log + checkpoints to chunkservers in other zones "
              "(sync: before acknowledging; async: within --metadata-max-lag)")
@click.option("--metadata-copies", default=2, show_default=True, type=click.IntRange(1, 8))
@click.option("--metadata-max-lag", default=5.0, show_default=True, type=click.FloatRange(0),
              help="async: seconds the copies may trail the master")
@click.option("--debug-fsync-delay", default=0.0, hidden=True, type=click.FloatRange(0, 60),
              help="testing: each op-log sync takes this many seconds longer (a busy disk)")
@topology_options
@click.pass_context
def master(ctx: click.Context, listen: str, data_dir: str | None, token: str | None, token_file: str | None,
           chunk_size: str, replication: int, dead_after: float, checkpoint_interval: float, checkpoint_ops: int,
           format_: bool, safe_mode_threshold: float, safe_mode_grace: float,
           metadata_replication: str, metadata_copies: int, metadata_max_lag: float, debug_fsync_delay: float,
           node: str, zone: str, region: str, topology_from_node: bool) -> None:
    """Run the master (``kubegfs master recover``: rebuild one that lost its data directory)."""
    if ctx.invoked_subcommand is not None:
        return
    if not data_dir:
        fail("--data is required to run the master")
    from .master.metareplica import MetaReplicationConfig
    from .master.safemode import SafeModeConfig
    from .master.server import Options, run

    tok = read_token(token, token_file)
    opts = Options(dead_after=dead_after, checkpoint_interval=checkpoint_interval, checkpoint_ops=checkpoint_ops,
                   format=format_, safe_mode=SafeModeConfig(safe_mode_threshold, safe_mode_grace),
                   meta=MetaReplicationConfig(metadata_replication, metadata_copies, metadata_max_lag),
                   fsync_delay=debug_fsync_delay)
    loc = _location(node, zone, region, topology_from_node)
    run(listen, Path(data_dir), tok, loc, parse_size(chunk_size), replication, opts)


@master.command("recover")
@click.option("--cluster-id", default="", help="the cluster to adopt, if chunkservers of several reported")
@click.option("--from", "source", type=click.Choice(["auto", "metadata", "records"]), default="auto",
              show_default=True, help="metadata copies on the chunkservers, else the snapshot records")
@client_options
def master_recover(cluster_id: str, source: str, master: str, token: str | None, as_json: bool) -> None:
    """Rebuild a refusing master from what its chunkservers hold (see docs/recovery.md)."""
    c = Ctx(master, token, as_json)
    body = {"cluster_id": cluster_id, "from": source}
    c.out(c.client().api("POST", "/admin/recover", json=body),
          lambda d: click.echo(f"recovered cluster {d['cluster_id']} from {d['source']} in {d['seconds']}s: "
                               f"{d.get('snapshots', 0)} snapshots, {d.get('files', 0)} files"
                               + "".join(f"\n  warning: {p}" for p in d["problems"])))


def _location(node: str, zone: str, region: str, from_node: bool) -> Location:
    if from_node and node:
        from .k8s_node import node_location

        found = node_location(node)
        return Location(found.node, zone or found.zone, region or found.region)
    return Location(node, zone, region)


@main.command()
@click.option("--listen", default="127.0.0.1:9500", show_default=True, help="HOST:PORT")
@click.option("--master", "master_url", envvar="KUBEGFS_MASTER", required=True, help="master URL")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--token", envvar="KUBEGFS_TOKEN")
@click.option("--token-file", envvar="KUBEGFS_TOKEN_FILE")
@click.option("--advertise", default=None, help="URL others use to reach this chunkserver")
@click.option("--chunk-size", default=None, help="defaults to what the data dir or master says")
@click.option("--heartbeat-interval", default=1.0, show_default=True)
@click.option("--scrub-interval", default=60.0, show_default=True,
              help="seconds between background checksum passes (0 = off)")
@topology_options
def chunkserver(listen: str, master_url: str, data_dir: str, token: str | None, token_file: str | None,
                advertise: str | None, chunk_size: str | None, heartbeat_interval: float, scrub_interval: float,
                node: str, zone: str, region: str, topology_from_node: bool) -> None:
    """Run a chunkserver."""
    from .chunkserver.server import run

    tok = read_token(token, token_file)
    run(listen, Path(data_dir), master_url, tok, _location(node, zone, region, topology_from_node), advertise,
        parse_size(chunk_size) if chunk_size else None, heartbeat_interval, scrub_interval)


# ----------------------------------------------------------------------------- fs


@main.group(cls=Group)
def fs() -> None:
    """Files and directories."""


def _print_entries(entries: list[dict[str, Any]]) -> None:
    for e in entries:
        kind = "d" if e["type"] == "dir" else "-"
        size = e.get("size", e.get("entries", 0))
        click.echo(f"{kind} {e['mode']:04o} {size:>14} {e['path']}")


@fs.command("mkdir")
@click.argument("path")
@click.option("-p", "--parents", is_flag=True)
@client_options
def fs_mkdir(path: str, parents: bool, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    res = c.client().mkdir(path, parents)
    c.out(res, lambda d: click.echo(d["path"]))


@fs.command("ls")
@click.argument("path", default="/")
@client_options
def fs_ls(path: str, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    c.out(c.client().ls(path), _print_entries)


@fs.command("stat")
@click.argument("path")
@client_options
def fs_stat(path: str, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    c.out(c.client().stat(path), lambda d: _print_entries([d]))


@fs.command("rm")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True)
@client_options
def fs_rm(path: str, recursive: bool, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    c.out(c.client().rm(path, recursive), lambda d: None)


@fs.command("mv")
@click.argument("src")
@click.argument("dst")
@client_options
def fs_mv(src: str, dst: str, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    c.out(c.client().mv(src, dst), lambda d: None)


def _progress(total: int | None, label: str, quiet: bool) -> Any:
    from contextlib import nullcontext

    if quiet or total is None or total < 8 * 1024 * 1024 or not sys.stderr.isatty():
        return nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    p = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                 TransferSpeedColumn(), transient=True)
    return _ProgressCtx(p, total, label)


class _ProgressCtx:
    def __init__(self, p: Any, total: int, label: str) -> None:
        self.p, self.total, self.label = p, total, label

    def __enter__(self) -> Any:
        self.p.__enter__()
        task = self.p.add_task(self.label, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        self.p.__exit__(*exc)


@fs.command("put")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("remote")
@click.option("--append", is_flag=True, help="append to the remote file")
@click.option("--no-clobber", is_flag=True, help="fail if the remote file exists")
@click.option("-q", "--quiet", is_flag=True)
@client_options
def fs_put(local: str, remote: str, append: bool, no_clobber: bool, quiet: bool, master: str,
           token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    cl = c.client()
    if local == "-":
        res = cl.put(remote, sys.stdin.buffer, overwrite=not no_clobber, append=append)
    else:
        try:
            f = open(local, "rb")
        except OSError as exc:
            fail(f"cannot read {local}: {exc.strerror}")
        with f, _progress(os.fstat(f.fileno()).st_size, f"put {remote}", quiet or as_json) as prog:
            res = cl.put(remote, f, overwrite=not no_clobber, append=append, progress=prog)
    c.out(res, lambda d: click.echo(f"{d['path']}: {d['size']} bytes"))


@fs.command("get")
@click.argument("remote")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-q", "--quiet", is_flag=True)
@client_options
def fs_get(remote: str, local: str, quiet: bool, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    cl = c.client()
    st = cl.stat(remote)
    if st["type"] != "file":
        fail(f"{remote} is a directory")
    if local == "-":
        n = cl.get_to(remote, sys.stdout.buffer)
        return
    tmp = Path(local + ".kubegfs-part")
    with open(tmp, "wb") as f, _progress(st["size"], f"get {remote}", quiet or as_json) as prog:
        try:
            n = cl.get_to(remote, f, prog)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, local)
    if not quiet:
        c.out({"path": remote, "local": local, "bytes": n}, lambda d: click.echo(f"{local}: {n} bytes"))


@fs.command("cat")
@click.argument("remote")
@client_options
def fs_cat(remote: str, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    c.client().get_to(remote, sys.stdout.buffer)
    sys.stdout.buffer.flush()


# ----------------------------------------------------------------------------- snapshots


@main.group(cls=Group)
def snapshot() -> None:
    """Point-in-time directory snapshots."""


def _print_snaps(snaps: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .catalog import owner

    owners = [owner(s) for s in snaps]
    cols = ["NAME", "PATH", "STATE", "FILES", "BYTES", "RECORD", "HOLDERS", "CREATED"]
    t = Table(*cols, "OWNER") if any(owners) else Table(*cols)  # OWNER: the Kubernetes object, if any
    for s, who in zip(snaps, owners, strict=True):
        row = [s["name"], s["path"], s["state"], str(s["files"]), str(s["logical_bytes"]),
               str(s["record_bytes"]), ",".join(h["id"] for h in s["holders"]), s["created"]]
        t.add_row(*row, *([who or "-"] if any(owners) else []))
    Console().print(t)


@snapshot.command("create")
@click.argument("path")
@click.option("--name", required=True)
@click.option("--copies", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--no-wait", is_flag=True, help="return once the snapshot is captured")
@client_options
def snap_create(path: str, name: str, copies: int, no_wait: bool, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    s = c.client().snapshot_create(path, name, copies, wait=not no_wait)
    c.out(s, lambda d: _print_snaps([d]))


@snapshot.command("list")
@client_options
def snap_list(master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    c.out(c.client().snapshot_list(), _print_snaps)


@snapshot.command("show")
@click.argument("name")
@client_options
def snap_show(name: str, master: str, token: str | None, as_json: bool) -> None:
    c = Ctx(master, token, as_json)
    c.out(c.client().snapshot_show(name))


def _restored(d: dict[str, Any]) -> None:
    click.echo(f"restored {d['snapshot']} to {d['path']} ({d['mode']}): "
               f"{d['files']} files from {d['source']['id']} in {d['duration_seconds']:.3f}s")
    if d.get("pre_restore_snapshot"):
        click.echo(f"undo with: kubegfs snapshot restore {d['pre_restore_snapshot']}")


@snapshot.command("restore")
@click.argument("name")
@click.option("--to", "to", default=None, help="restore to this new path instead of in place")
@click.option("--no-pre-restore-snapshot", "no_pre", is_flag=True,
              help="in place: do not snapshot the target first (the restore cannot be undone)")
@client_options
def snap_restore(name: str, to: str | None, no_pre: bool, master: str, token: str | None, as_json: bool) -> None:
    from .catalog import restore_undoable

    c = Ctx(master, token, as_json)
    c.out(restore_undoable(c.client(), name, to, pre_restore=not no_pre), _restored)


@snapshot.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="also delete a snapshot a Kubernetes Snapshot object owns")
@client_options
def snap_delete(name: str, force: bool, master: str, token: str | None, as_json: bool) -> None:
    from .catalog import refuse_owned_delete

    c = Ctx(master, token, as_json)
    cl = c.client()
    if not force:
        refuse_owned_delete(cl.snapshot_show(name))
    c.out(cl.snapshot_delete(name), lambda d: click.echo(f"deleted {d['deleted']}"))


@main.command()
@client_options
def status(master: str, token: str | None, as_json: bool) -> None:
    """Cluster status."""
    c = Ctx(master, token, as_json)
    c.out(c.client().status())


# ----------------------------------------------------------------------------- local stack


@main.group(cls=Group)
def local() -> None:
    """The embedded default: everything on this machine, on loopback addresses."""


@local.command("up")
@click.option("--chunkservers", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--data", "data_dir", default=".data/local", show_default=True)
@click.option("--chunk-size", default="64MiB", show_default=True)
@click.option("--port", default=9400, show_default=True)
def local_up(chunkservers: int, data_dir: str, chunk_size: str, port: int) -> None:
    """Start a master and N chunkservers (127.0.1.1, 127.0.2.1, …) over simulated zones;
    Ctrl-C stops them all."""
    from .local import LocalCluster

    cl = LocalCluster(Path(data_dir), chunkservers, parse_size(chunk_size), master_port=port)
    cl.start()
    click.echo(f"master:  {cl.master_url}\ntoken:   {cl.token}")
    click.echo(f"export KUBEGFS_MASTER={cl.master_url} KUBEGFS_TOKEN={cl.token}")
    for cs in cl.chunkservers:
        click.echo(f"chunkserver {cs.name}: {cs.url} node={cs.node} zone={cs.zone} region={cs.region}")
    click.echo("Ctrl-C stops everything.")
    try:
        cl.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cl.stop()
        click.echo("stopped.")


@main.command()
@click.option("--data", "data_dir", default=None, help="keep the demo's data here (default: a temp dir)")
def demo(data_dir: str | None) -> None:
    """The `make run` demo: write, snapshot, mutate, restore both ways, verify."""
    from .demo import run_demo

    sys.exit(run_demo(Path(data_dir) if data_dir else None))


if __name__ == "__main__":
    main()
