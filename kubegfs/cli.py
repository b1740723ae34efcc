"""The ``kubegfs`` command line: servers, files, snapshots, the local stack and the demo."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from .errors import InvalidArgument, KubegfsError
from .topology import Location


def parse_size(text: str) -> int:
    """A size as a Kubernetes quantity (64Mi = 2^26, 64M = 64·10^6); a usage error otherwise."""
    from .quantity import BadQuantity, parse_bytes

    try:
        return parse_bytes(text)
    except BadQuantity as exc:
        raise click.BadParameter(str(exc)) from exc


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


OUTPUT_KEY = "kubegfs.output"
CACERT_KEY = "kubegfs.cacert"


def tls_server_options(f: Any) -> Any:
    """--tls-cert/--tls-key: serve HTTPS (the peers it calls are verified per KUBEGFS_CACERT)."""
    f = click.option("--tls-key", envvar="KUBEGFS_TLS_KEY", type=click.Path(dir_okay=False),
                     help="the certificate's private key, PEM (env KUBEGFS_TLS_KEY)")(f)
    f = click.option("--tls-cert", envvar="KUBEGFS_TLS_CERT", type=click.Path(dir_okay=False),
                     help="serve HTTPS with this certificate chain, PEM (env KUBEGFS_TLS_CERT)")(f)
    return f


def _server_ssl(cert: str | None, key: str | None) -> Any:
    from .tls import server_context_from_env

    try:
        return server_context_from_env(cert, key)
    except (ValueError, OSError) as exc:
        raise click.BadParameter(f"TLS: {exc}") from exc


def role_token_options(f: Any) -> Any:
    """The servers' per-role tokens besides --token (the client token): see kubegfs/auth.py."""
    for role, what in (("metrics", "Prometheus may only GET /metrics with it"),
                       ("internal", "master <-> chunkservers")):
        f = click.option(f"--{role}-token-file", envvar=f"KUBEGFS_{role.upper()}_TOKEN_FILE",
                         help=f"read the {role} token from this file (env KUBEGFS_{role.upper()}_TOKEN_FILE)")(f)
        f = click.option(f"--{role}-token", envvar=f"KUBEGFS_{role.upper()}_TOKEN",
                         help=f"{role} token: {what}; default the --token (env KUBEGFS_{role.upper()}_TOKEN)")(f)
    return f


def server_tokens(token: str | None, token_file: str | None, internal_token: str | None,
                  internal_token_file: str | None, metrics_token: str | None, metrics_token_file: str | None) -> Any:
    from .auth import Tokens

    def optional(tok: str | None, tok_file: str | None) -> str:
        return read_token(tok, tok_file) if (tok or tok_file) else ""

    return Tokens(read_token(token, token_file), optional(internal_token, internal_token_file),
                  optional(metrics_token, metrics_token_file))


class Ctx:
    def __init__(self, master: str, token: str | None, as_json: bool) -> None:
        self.master = master
        meta = click.get_current_context().meta
        token_file = meta.get(TOKEN_FILE_META)
        self.token = read_token(token, token_file) if token_file else token
        self.fmt: str | None = "json" if as_json else meta.get(OUTPUT_KEY)
        self.cacert: str | None = meta.get(CACERT_KEY)

    def client(self) -> Any:
        from .client import Client
        from .tls import ClientTLS

        try:
            return Client(self.master, self.token, tls=ClientTLS.from_env(self.cacert),
                          short_circuit=click.get_current_context().meta.get(SHORT_CIRCUIT_KEY))
        except KubegfsError as exc:
            fail(exc.message)

    def out(self, data: Any, human: Any = None, view: Any = None, name: Any = None) -> None:
        """Print ``data`` as -o asked: a table of ``view``, or ``human(data)`` (which prints)."""
        from .output import UnsupportedFormat, render

        if self.fmt is None and view is None and human is not None:
            human(data)
            return
        try:
            click.echo(render(data, self.fmt, view, name=name))
        except UnsupportedFormat as exc:
            raise click.UsageError(str(exc)) from exc


def _set_cacert(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta[CACERT_KEY] = value


def _set_output(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta[OUTPUT_KEY] = value


TOKEN_FILE_META = "kubegfs.token_file"
SHORT_CIRCUIT_KEY = "kubegfs.short_circuit"


def _set_short_circuit(ctx: click.Context, _param: click.Parameter, value: bool | None) -> None:
    if value is not None:
        ctx.meta[SHORT_CIRCUIT_KEY] = value


def _token_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[TOKEN_FILE_META] = value


def client_options(f: Any) -> Any:
    from .output import FORMATS

    f = click.option("-o", "--output", type=click.Choice(FORMATS), expose_value=False, callback=_set_output,
                     help="json or yaml (the API objects), name (one per line), wide (more columns)")(f)
    f = click.option("--json", "as_json", is_flag=True, help="same as -o json")(f)
    f = click.option("--short-circuit/--no-short-circuit", default=None, envvar="KUBEGFS_SHORT_CIRCUIT",
                     expose_value=False, callback=_set_short_circuit,
                     help="read chunks of chunkservers on this host through their files' descriptors "
                     "(default on; env KUBEGFS_SHORT_CIRCUIT=off)")(f)
    f = click.option("--cacert", envvar="KUBEGFS_CACERT", type=click.Path(dir_okay=False), expose_value=False,
                     callback=_set_cacert, help="verify an https:// master against this CA bundle (env KUBEGFS_CACERT)")(f)
    f = click.option("--token-file", envvar="KUBEGFS_TOKEN_FILE", expose_value=False, callback=_token_file,
                     help="file holding the client token, e.g. /etc/kubegfs/token in the pods (wins over --token)")(f)
    f = click.option("--token", envvar="KUBEGFS_TOKEN", help="client token (env KUBEGFS_TOKEN)")(f)
    f = click.option("--master", envvar="KUBEGFS_MASTER", default="http://127.0.0.1:9400",
                     show_default=True, help="master URL (env KUBEGFS_MASTER)")(f)
    return f


class Group(click.Group):
    """Turns KubegfsError into one clear line and exit 1, as kubectl and velero do for anything
    the API refused or could not do (2 stays for usage errors, which click reports)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KubegfsError as exc:
            fail(exc.message, 1)
        except OSError as exc:  # a local file or directory (e.g. fs get into a missing directory)
            fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))


@click.group(cls=Group)
@click.option("--log-level", envvar="KUBEGFS_LOG_LEVEL", default="INFO", show_default=True,
              help="DEBUG, INFO, WARNING or ERROR (env KUBEGFS_LOG_LEVEL)")
@click.option("--log-format", envvar="KUBEGFS_LOG_FORMAT", type=click.Choice(["text", "json"]), default="text",
              help="log lines as text or one JSON object each (env KUBEGFS_LOG_FORMAT)")
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
@click.option("--token", envvar="KUBEGFS_TOKEN", help="client token (env KUBEGFS_TOKEN)")
@click.option("--token-file", envvar="KUBEGFS_TOKEN_FILE", help="read the client token from this file (env KUBEGFS_TOKEN_FILE)")
@role_token_options
@tls_server_options
@click.option("--chunk-size", default="64Mi", show_default=True,
              help="a quantity (64Mi = 2^26 bytes, 64M = 64·10^6); only used when the file system is new")
@click.option("--replication", default=3, show_default=True, type=click.IntRange(1, 16),
              help="replicas of every chunk (only used when the file system is new)")
@click.option("--dead-after", default=5.0, show_default=True, help="seconds without heartbeat before a chunkserver is dead")
@click.option("--checkpoint-interval", default=300.0, show_default=True, help="seconds between checkpoints")
@click.option("--checkpoint-ops", default=100_000, show_default=True, help="checkpoint after this many ops")
@click.option("--format", "format_", is_flag=True,
              help="start a new cluster in an empty or refusing data dir (chunkservers of the old one stay refused)")
@click.option("--safe-mode-threshold", default=0.999, show_default=True, type=click.FloatRange(0, 1),
              help="after a start, delete nothing until this share of known chunks has been reported")
@click.option("--safe-mode-grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="...or until this many seconds have passed")
@click.option("--metadata-replication", type=click.Choice(["sync", "async", "off"]), default="sync",
              show_default=True, help="copy the op log + checkpoints to chunkservers in other zones "
              "(sync: before acknowledging; async: within --metadata-max-lag)")
@click.option("--metadata-copies", default=2, show_default=True, type=click.IntRange(1, 8),
              help="metadata copies on chunkservers")
@click.option("--metadata-max-lag", default=5.0, show_default=True, type=click.FloatRange(0),
              help="async: seconds the copies may trail the master")
@click.option("--fast-listen", default="", help="HOST:PORT of a second, lean listener for stat, ls, "
              "stat_many, mkdir and create (clients find it from a header on those answers); default: off")
@click.option("--fast-spin-us", default=100, show_default=True, type=click.IntRange(0, 10_000),
              help="after answering on the lean listener, poll the connection this many microseconds for the "
              "next request before sleeping (less latency for a client that asks again at once, some CPU; "
              "0: off; never over TLS)")
@click.option("--debug-fsync-delay", default=0.0, hidden=True, type=click.FloatRange(0, 60),
              help="testing: each op-log sync takes this many seconds longer (a busy disk)")
@topology_options
@click.pass_context
def master(ctx: click.Context, listen: str, data_dir: str | None, token: str | None, token_file: str | None,
           internal_token: str | None, internal_token_file: str | None, metrics_token: str | None,
           metrics_token_file: str | None, tls_cert: str | None, tls_key: str | None,
           chunk_size: str, replication: int, dead_after: float, checkpoint_interval: float, checkpoint_ops: int,
           format_: bool, safe_mode_threshold: float, safe_mode_grace: float,
           metadata_replication: str, metadata_copies: int, metadata_max_lag: float, fast_listen: str,
           fast_spin_us: int, debug_fsync_delay: float, node: str, zone: str, region: str, topology_from_node: bool) -> None:
    """Run the master (``kubegfs master recover``: rebuild one that lost its data directory)."""
    if ctx.invoked_subcommand is not None:
        return
    if not data_dir:
        raise click.UsageError("--data is required to run the master")
    from .master.metareplica import MetaReplicationConfig
    from .master.safemode import SafeModeConfig
    from .master.server import Options, run

    tok = server_tokens(token, token_file, internal_token, internal_token_file, metrics_token, metrics_token_file)
    opts = Options(dead_after=dead_after, checkpoint_interval=checkpoint_interval, checkpoint_ops=checkpoint_ops,
                   format=format_, safe_mode=SafeModeConfig(safe_mode_threshold, safe_mode_grace),
                   meta=MetaReplicationConfig(metadata_replication, metadata_copies, metadata_max_lag),
                   fsync_delay=debug_fsync_delay, fast_listen=fast_listen,
                   fast_spin=fast_spin_us / 1e6)
    if fast_listen:
        from .web import split_listen

        split_listen(fast_listen)  # a bad value is one error line now, not a crash at startup
    loc = _location(node, zone, region, topology_from_node)
    run(listen, Path(data_dir), tok, loc, parse_size(chunk_size), replication, opts, _server_ssl(tls_cert, tls_key))


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
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="chunks and snapshot records")
@click.option("--token", envvar="KUBEGFS_TOKEN", help="client token (env KUBEGFS_TOKEN)")
@click.option("--token-file", envvar="KUBEGFS_TOKEN_FILE", help="read the client token from this file (env KUBEGFS_TOKEN_FILE)")
@role_token_options
@tls_server_options
@click.option("--advertise", default=None, help="URL others use to reach this chunkserver")
@click.option("--chunk-size", default=None, help="a quantity (64Mi); defaults to what the data dir or master says")
@click.option("--heartbeat-interval", default=1.0, show_default=True, help="seconds between heartbeats to the master")
@click.option("--scrub-interval", default=60.0, show_default=True,
              help="seconds between background checksum passes (0 = off)")
@click.option("--data-listen", default="", help="HOST:PORT of the lean listener for written pieces "
              "(default: --listen's host, any free port; 'off' for none; never with TLS)")
@click.option("--short-circuit-socket", default="", envvar="KUBEGFS_SHORT_CIRCUIT_SOCKET",
              help="Unix socket that hands local clients chunk files' descriptors (default: "
              "DATA/run/short-circuit.sock; 'off' for none; env KUBEGFS_SHORT_CIRCUIT_SOCKET)")
@click.option("--block-cache", default="128Mi", show_default=True, envvar="KUBEGFS_BLOCK_CACHE",
              help="a quantity: recent snapshot directory blocks kept in memory as delta bases (0 = none; "
              "env KUBEGFS_BLOCK_CACHE)")
@topology_options
def chunkserver(listen: str, master_url: str, data_dir: str, token: str | None, token_file: str | None,
                internal_token: str | None, internal_token_file: str | None, metrics_token: str | None,
                metrics_token_file: str | None, tls_cert: str | None, tls_key: str | None, advertise: str | None, chunk_size: str | None, heartbeat_interval: float, scrub_interval: float,
                data_listen: str, short_circuit_socket: str, block_cache: str, node: str, zone: str, region: str,
                topology_from_node: bool) -> None:
    """Run a chunkserver."""
    from .chunkserver.server import run

    tok = server_tokens(token, token_file, internal_token, internal_token_file, metrics_token, metrics_token_file)
    if data_listen and data_listen != "off":
        from .web import split_listen

        try:
            split_listen(data_listen)  # a bad value is one error line now, not a crash at startup
        except InvalidArgument:
            raise InvalidArgument(f"--data-listen must be HOST:PORT or off, got {data_listen!r}") from None
    run(listen, Path(data_dir), master_url, tok, _location(node, zone, region, topology_from_node), advertise,
        parse_size(chunk_size) if chunk_size else None, heartbeat_interval, scrub_interval, ssl_context=_server_ssl(tls_cert, tls_key),
        data_listen=data_listen, block_cache=parse_size(block_cache), short_circuit=short_circuit_socket)


# ----------------------------------------------------------------------------- fs


@main.group(cls=Group)
def fs() -> None:
    """Files and directories."""


def _entry_views() -> Any:
    from .output import Column, View

    def mode(e: Any) -> str:
        return ("d" if e["type"] == "dir" else "-") + format(e["mode"], "04o")

    return View((Column("MODE", mode), Column("SIZE", lambda e: e.get("size", e.get("entries", 0))),
                 Column("MTIME", lambda e: _ns_time(e.get("mtime_ns")), wide=True),
                 Column("PATH", lambda e: e["path"])), lambda e: str(e["path"]))


def _ns_time(ns: int | None) -> str:
    import datetime

    if ns is None:
        return ""
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _path_of(d: Any) -> str:
    return str(d["path"])


@fs.command("mkdir")
@click.argument("path")
@click.option("-p", "--parents", is_flag=True, help="create missing parents; no error if it exists")
@client_options
def fs_mkdir(path: str, parents: bool, master: str, token: str | None, as_json: bool) -> None:
    """Create a directory (-p: with its parents, no error if it exists)."""
    c = Ctx(master, token, as_json)
    res = c.client().mkdir(path, parents)
    c.out(res, lambda d: click.echo(d["path"]), name=_path_of)


@fs.command("ls")
@click.argument("path", default="/")
@client_options
def fs_ls(path: str, master: str, token: str | None, as_json: bool) -> None:
    """List a directory (default /)."""
    c = Ctx(master, token, as_json)
    c.out(c.client().ls(path), view=_entry_views())


@fs.command("stat")
@click.argument("path")
@client_options
def fs_stat(path: str, master: str, token: str | None, as_json: bool) -> None:
    """Show one file or directory."""
    c = Ctx(master, token, as_json)
    c.out(c.client().stat(path), view=_entry_views())


@fs.command("rm")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="remove a directory and everything in it")
@client_options
def fs_rm(path: str, recursive: bool, master: str, token: str | None, as_json: bool) -> None:
    """Remove a file, or a directory with -r."""
    c = Ctx(master, token, as_json)
    c.out(c.client().rm(path, recursive), lambda d: None, name=lambda d: str(d["removed"]))


@fs.command("mv")
@click.argument("src")
@click.argument("dst")
@client_options
def fs_mv(src: str, dst: str, master: str, token: str | None, as_json: bool) -> None:
    """Rename or move a file or directory."""
    c = Ctx(master, token, as_json)
    c.out(c.client().mv(src, dst), lambda d: None, name=lambda d: str(d["to"]))


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
@click.option("-q", "--quiet", is_flag=True, help="no progress bar or summary")
@client_options
def fs_put(local: str, remote: str, append: bool, no_clobber: bool, quiet: bool, master: str,
           token: str | None, as_json: bool) -> None:
    """Upload LOCAL (- for stdin) to REMOTE."""
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
    c.out(res, lambda d: click.echo(f"{d['path']}: {d['size']} bytes"), name=_path_of)


@fs.command("get")
@click.argument("remote")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-q", "--quiet", is_flag=True, help="no progress bar or summary")
@client_options
def fs_get(remote: str, local: str, quiet: bool, master: str, token: str | None, as_json: bool) -> None:
    """Download REMOTE to LOCAL (- for stdout); the file appears only once complete."""
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
    """Write REMOTE to stdout."""
    c = Ctx(master, token, as_json)
    c.client().get_to(remote, sys.stdout.buffer)
    sys.stdout.buffer.flush()


# ----------------------------------------------------------------------------- snapshots


@main.group(cls=Group)
def snapshot() -> None:
    """Point-in-time directory snapshots."""


def _snap_view() -> Any:
    from .catalog import owner
    from .output import Column, View

    return View((Column("NAME", lambda s: s["name"]), Column("PATH", lambda s: s["path"]),
                 Column("STATE", lambda s: s["state"]), Column("FILES", lambda s: s["files"]),
                 Column("BYTES", lambda s: s["logical_bytes"]), Column("CREATED", lambda s: s["created"]),
                 Column("OWNER", lambda s: owner(dict(s)) or "-"),
                 Column("ID", lambda s: s.get("id"), wide=True),
                 Column("RECORD", lambda s: s["record_bytes"], wide=True),
                 Column("HOLDERS", lambda s: ",".join(h["id"] for h in s["holders"]) or "<none>", wide=True)),
                lambda s: str(s["name"]))


@snapshot.command("create")
@click.argument("path")
@click.option("--name", required=True, help="the snapshot's name (unique)")
@click.option("--copies", default=2, show_default=True, type=click.IntRange(1, 16),
              help="chunkservers that keep a copy of the snapshot record")
@click.option("--no-wait", is_flag=True, help="return once the snapshot is captured")
@client_options
def snap_create(path: str, name: str, copies: int, no_wait: bool, master: str, token: str | None, as_json: bool) -> None:
    """Take a point-in-time snapshot of directory PATH."""
    c = Ctx(master, token, as_json)
    s = c.client().snapshot_create(path, name, copies, wait=not no_wait)
    c.out(s, view=_snap_view())


@snapshot.command("list")
@client_options
def snap_list(master: str, token: str | None, as_json: bool) -> None:
    """List snapshots."""
    c = Ctx(master, token, as_json)
    c.out(c.client().snapshot_list(), view=_snap_view())


@snapshot.command("show")
@click.argument("name")
@client_options
def snap_show(name: str, master: str, token: str | None, as_json: bool) -> None:
    """Show one snapshot."""
    c = Ctx(master, token, as_json)
    c.out(c.client().snapshot_show(name), view=_snap_view())


def _print_diff(d: dict[str, Any]) -> None:
    """The report HDFS users know: + created, - deleted, M modified, R renamed."""
    to = d["to"] or f"the live tree at {d['to_path']}"
    click.echo(f"Difference between snapshot {d['from']} and {to} under {d['path']}:")
    for c in d["changes"]:
        click.echo(f"{c['kind']}\t{c['path']} -> {c['to']}" if c["kind"] == "R" else f"{c['kind']}\t{c['path']}")
    s = d["summary"]
    click.echo(f"{s['created']} created, {s['deleted']} deleted, {s['modified']} modified, {s['renamed']} renamed")


@snapshot.command("diff")
@click.argument("name")
@click.argument("to", required=False)
@client_options
def snap_diff(name: str, to: str | None, master: str, token: str | None, as_json: bool) -> None:
    """What changed from snapshot NAME to snapshot TO (or to the live tree when TO is left out)."""
    c = Ctx(master, token, as_json)
    c.out(c.client().snapshot_diff(name, to), _print_diff)


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
    """Restore snapshot NAME in place (or to a new path with --to)."""
    from .catalog import restore_undoable

    c = Ctx(master, token, as_json)
    c.out(restore_undoable(c.client(), name, to, pre_restore=not no_pre), _restored, name=_path_of)


@snapshot.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="also delete a snapshot a Kubernetes Snapshot object owns")
@client_options
def snap_delete(name: str, force: bool, master: str, token: str | None, as_json: bool) -> None:
    """Delete snapshot NAME and its records."""
    from .catalog import refuse_owned_delete

    c = Ctx(master, token, as_json)
    cl = c.client()
    if not force:
        refuse_owned_delete(cl.snapshot_show(name))
    c.out(cl.snapshot_delete(name), lambda d: click.echo(f"deleted {d['deleted']}"),
          name=lambda d: str(d["deleted"]))


@main.command()
@client_options
def status(master: str, token: str | None, as_json: bool) -> None:
    """Cluster status: files, capacity, chunkservers alive, chunks under-replicated."""
    from .output import Column, View
    from .quantity import format_bytes

    view = View((Column("FILES", lambda d: d["files"]), Column("DIRECTORIES", lambda d: d["directories"]),
                 Column("BYTES", lambda d: d["logical_bytes"]), Column("CHUNKS", lambda d: d["chunks"]),
                 Column("SNAPSHOTS", lambda d: d["snapshots"]),
                 Column("CHUNKSERVERS", lambda d: f"{d['chunkservers']['alive']}/{d['chunkservers']['total']}"),
                 Column("UNDER-REPLICATED", lambda d: d["under_replicated"]),
                 Column("CHUNK-SIZE", lambda d: format_bytes(d["chunk_size"]), wide=True),
                 Column("REPLICATION", lambda d: d["replication"], wide=True),
                 Column("SEQ", lambda d: d["seq"], wide=True), Column("EPOCH", lambda d: d["epoch"], wide=True)),
                None)
    c = Ctx(master, token, as_json)
    c.out(c.client().status(), view=view)


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  source <(kubegfs completion bash)      (or save it in /etc/bash_completion.d/kubegfs)
    zsh:   kubegfs completion zsh > "${fpath[1]}/_kubegfs"
    fish:  kubegfs completion fish > ~/.config/fish/completions/kubegfs.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the Choice admits only shells click supports
    click.echo(cls(main, {}, "kubegfs", "_KUBEGFS_COMPLETE").source())


# ----------------------------------------------------------------------------- local stack


@main.group(cls=Group)
def local() -> None:
    """The embedded default: everything on this machine, on loopback addresses."""


@local.command("up")
@click.option("--chunkservers", default=3, show_default=True, type=click.IntRange(1, 64), help="how many to start")
@click.option("--data", "data_dir", default=".data/local", show_default=True, help="data, logs and the token")
@click.option("--chunk-size", default="64Mi", show_default=True, help="a quantity (64Mi = 2^26 bytes)")
@click.option("--port", default=9400, show_default=True, help="master port (0 or taken: any free port)")
@click.option("--tls", is_flag=True, help="serve HTTPS with a CA made in the data dir (prints KUBEGFS_CACERT)")
def local_up(chunkservers: int, data_dir: str, chunk_size: str, port: int, tls: bool) -> None:
    """Start a master and N chunkservers (127.0.1.1, 127.0.2.1, …) over simulated zones;
    Ctrl-C, SIGTERM or SIGHUP stops them all."""
    from .local import LocalCluster, StopSignal, signals_ignored, stop_on_signals

    cl = LocalCluster(Path(data_dir), chunkservers, parse_size(chunk_size), master_port=port, tls=tls)
    died: RuntimeError | None = None
    with stop_on_signals():
        try:
            cl.start()
            click.echo(f"master:  {cl.master_url}\ntoken:   {cl.token}")
            cacert = f" KUBEGFS_CACERT={cl.cacert}" if cl.cacert else ""
            click.echo(f"export KUBEGFS_MASTER={cl.master_url} KUBEGFS_TOKEN={cl.token}{cacert}")
            for cs in cl.chunkservers:
                click.echo(f"chunkserver {cs.name}: {cs.url} node={cs.node} zone={cs.zone} region={cs.region}")
            click.echo("Ctrl-C stops everything.")
            cl.wait()
        except RuntimeError as exc:  # ChildExited, or a process that never answered
            died = exc
        except StopSignal:
            pass
        finally:
            with signals_ignored():
                cl.stop()
    if died is not None:
        fail(f"{died}; stopped the rest")
    click.echo("stopped.")


@main.command()
@click.option("--data", "data_dir", default=None, help="keep the demo's data here (default: a temp dir)")
def demo(data_dir: str | None) -> None:
    """The `make run` demo: write, snapshot, mutate, restore both ways, verify."""
    from .demo import run_demo

    sys.exit(run_demo(Path(data_dir) if data_dir else None))


if __name__ == "__main__":
    main()
