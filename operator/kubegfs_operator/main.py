"""Every kopf registration of the kubegfs operator, and nothing else of substance.

Run: ``kubegfs-operator`` (or ``kopf run --standalone --all-namespaces -m kubegfs_operator.main``).
The operator's state lives in kopf's ``memo`` (one ``Runtime``), never in module globals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from aiohttp import web

from kubegfs import metrics as M
from kubegfs.auth import Tokens, metrics_only_policy
from kubegfs.client import Client
from kubegfs.tls import server_context_from_env
from kubegfs.web import make_middlewares, metrics_handler

from . import FINALIZER, GROUP, VERSION, objects, reconcile
from .cluster import PODS_SELECTOR, MasterClients, NodeLabels, WatchedViews
from .config import Config, catalog_sync_seconds
from .podwatch import PodWatch, raw_json

log = logging.getLogger("kubegfs.operator")


@dataclass
class Runtime:
    cfg: Config
    core: Any
    custom: Any
    deps: reconcile.Deps
    first_seen: dict[str, float] = field(default_factory=dict)  # uid -> when a handler first ran
    in_progress: set[str] = field(default_factory=set)  # Snapshot uids counted in OP_IN_PROGRESS
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # schedule uid -> status last written


def _rt(memo: kopf.Memo) -> Runtime:
    rt: Runtime = memo["rt"]
    return rt


def _views(cfg: Config, core: Any) -> WatchedViews:
    """Installations' views: their namespaces' kubegfs pods watched, nodes' labels remembered."""

    def read_node(name: str) -> dict[str, str]:
        return dict((raw_json(core.read_node, name).get("metadata") or {}).get("labels") or {})

    return WatchedViews(lambda ns: PodWatch(core, ns, PODS_SELECTOR).start(), read_node, NodeLabels(),
                        cfg.master_port, cfg.chunkserver_port, cfg.scheme)


def _deps(cfg: Config, core: Any, custom: Any, views: WatchedViews) -> reconcile.Deps:
    from kubernetes.client.exceptions import ApiException

    def get_snapshot(ns: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(custom.get_namespaced_custom_object(GROUP, VERSION, ns, "snapshots", name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_snapshot(ns: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(custom.create_namespaced_custom_object(GROUP, VERSION, ns, "snapshots", body))
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = get_snapshot(ns, body["metadata"]["name"])
        return existing if existing is not None else create_snapshot(ns, body)

    def delete_snapshot(ns: str, name: str) -> None:
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "snapshots", name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_snapshots(ns: str, selector: str) -> list[dict[str, Any]]:
        out = custom.list_namespaced_custom_object(GROUP, VERSION, ns, "snapshots", label_selector=selector)
        return [dict(o) for o in out.get("items", [])]

    deps = reconcile.Deps(
        cfg=cfg,
        view=views.get,
        master=MasterClients(lambda url: Client(url, cfg.token, timeout=cfg.request_timeout)).get,
        get_snapshot=get_snapshot,
        create_snapshot=create_snapshot,
        delete_snapshot=delete_snapshot,
        list_snapshots=list_snapshots,
    )
    # every Snapshot's catalog check shares one listing per installation and sync interval
    deps.catalog = _per_installation(lambda ref: reconcile.fetch_catalog(ref, deps), catalog_sync_seconds() / 2)
    # ... and every object's ClusterHealthy condition one status call (schedules tick more often)
    reported: dict[Any, reconcile.Health] = {}

    def health(ref: Any) -> reconcile.Health | None:
        got = reconcile.fetch_health(ref, deps)
        if got is None:
            return None
        h, master = got
        before = reported.get(ref)
        reported[ref] = h
        if before is not None and before.reason == h.reason or before is None and h.ok:
            return h
        _master_event(ref, master, h)
        return h

    deps.health = _per_installation(health, min(cfg.schedule_tick, catalog_sync_seconds()) / 2)
    return deps


def _per_installation(fetch: Any, ttl: float) -> Any:
    """``fetch(ref)``, cached per installation for ``ttl`` seconds (thread-safe). Handlers of one
    installation wait for one fetch; an installation whose master is slow to answer does not hold
    up the others."""
    cache: dict[Any, tuple[float, Any]] = {}
    locks: dict[Any, threading.Lock] = {}
    guard = threading.Lock()

    def cached(ref: Any) -> Any:
        with guard:
            lock = locks.setdefault(ref, threading.Lock())
        with lock:
            hit = cache.get(ref)
            if hit is None or time.monotonic() - hit[0] > ttl:
                hit = (time.monotonic(), fetch(ref))
                cache[ref] = hit
            return hit[1]

    return cached


def _master_event(ref: Any, master: Any, h: reconcile.Health) -> None:
    """The installation's health changed: an Event on the master pod (``kubectl describe pod``,
    ``kubectl get events``), once per change, whichever object's handler noticed it."""
    kind = "Warning" if h.warning else "Normal"
    pod: Any = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": master.name, "namespace": ref.namespace, "uid": master.uid}}
    try:
        kopf.event(pod, type=kind, reason=h.reason if not h.ok else "ClusterHealthy", message=h.message)
    except LookupError:  # outside a handler's context (no event queue): the conditions still say it
        log.info("installation %s/%s: %s: %s", ref.namespace, ref.name, h.reason, h.message)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    from kubernetes import client, config

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # Events: the operator posts its own (SnapshotCreated, RestoreCompleted, failures…) explicitly;
    # kopf's per-handler INFO lines ("Handler … succeeded", "Creation is processed") would each be
    # one more Event, i.e. two more API writes per object, which a burst of objects waits behind
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubegfs-operator"  # Events' source, not "kopf"
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    settings.posting.event_name_prefix = "kubegfs-"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # sync handlers run in this many threads; a Snapshot's handler mostly waits on the master's
    # long poll, so a burst of objects is served this many at a time
    settings.execution.max_workers = 32
    # a deleted object keeps its finalizer until its timers/daemons exit: look again soon, not
    # after kopf's default minute (they exit within one tick)
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 1.0
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    # one pooled API connection per handler thread (the default pool, 5 per CPU, is smaller than
    # the thread pool: a burst would reconnect, TLS handshake included, on every overflow)
    api_conf = client.Configuration.get_default_copy()
    api_conf.connection_pool_maxsize = (settings.execution.max_workers or 32) + 4
    client.Configuration.set_default(api_conf)
    cfg = Config.from_env()
    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    memo["views"] = views = _views(cfg, core)
    memo["rt"] = Runtime(cfg, core, custom, _deps(cfg, core, custom, views))
    tokens = Tokens(cfg.token, metrics=cfg.metrics_token)
    app = web.Application(middlewares=make_middlewares(tokens, M.OPERATOR_HTTP, metrics_only_policy))
    app.router.add_get("/metrics", metrics_handler(M.OPERATOR))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    mhost, _sep, mport = cfg.metrics_listen.rpartition(":")
    await web.TCPSite(runner, mhost or "0.0.0.0", int(mport), ssl_context=server_context_from_env()).start()
    memo["metrics_runner"] = runner
    log.info("metrics on %s://%s/metrics (bearer token required)",
             "https" if os.environ.get("KUBEGFS_TLS_CERT") else "http", cfg.metrics_listen)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    views = memo.get("views")
    if views is not None:
        await asyncio.get_running_loop().run_in_executor(None, views.stop)
    runner = memo.get("metrics_runner")
    if runner is not None:
        await runner.cleanup()


@kopf.on.probe(id="kubegfs")
def probe(**_: Any) -> str:
    return "ok"


def _apply(patch: kopf.Patch, status: dict[str, Any]) -> None:
    for k, v in status.items():
        patch.status[k] = v


def _post(body: Any, event: tuple[str, str, str] | None) -> None:
    if event:
        kopf.event(body, type=event[0], reason=event[1], message=event[2])


def _decide(body: kopf.Body, patch: kopf.Patch, decide: Any, failed_reason: str) -> reconcile.Result:
    """Run a reconcile decision and turn its outcome into status, events and kopf's errors."""
    try:
        res: reconcile.Result = decide()
    except reconcile.Retry as r:
        _apply(patch, r.status)
        _post(body, r.event)
        raise kopf.TemporaryError(str(r), delay=r.delay) from None
    except reconcile.Fail as f:
        _apply(patch, f.status)
        _post(body, ("Warning", failed_reason, f"{f.reason}: {f}"))
        raise _Failed(f"{f.reason}: {f}") from None
    _apply(patch, res.status)
    _post(body, res.event)
    return res


def _publish(rt: Runtime, plural: str, namespace: str, name: str, patch: kopf.Patch) -> None:
    """Write an outcome's status now, from the handler's thread, instead of leaving it to kopf.

    kopf writes a handler's patch after it has marked the object handled, in two requests queued
    behind every other object's work on its event loop: under a burst of objects, seconds. The
    status is the user's answer (Ready), so it goes first; kopf then only marks the object handled.
    If this write fails, the status stays in kopf's patch. A crash between the two is harmless:
    the next operator runs the handler again, which finds the same kubegfs object (idempotent ids)
    and writes the same status."""
    from kubernetes.client.exceptions import ApiException

    status = dict(patch.get("status") or {})
    if not status:
        return
    try:
        # the answer (the whole object) is not decoded: nothing here reads it
        rt.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name, {"status": status},
                                                        _preload_content=False).release_conn()
    except (ApiException, OSError) as exc:
        log.debug("status of %s/%s left to kopf's patch: %s", namespace, name, exc)
        return
    del patch["status"]


class _Failed(kopf.PermanentError):
    pass


def _unsettled(body: kopf.Body, **_: Any) -> bool:
    return not objects.settled(body.get("status"), body.get("metadata", {}).get("generation"))


def _schedule_of(body: kopf.Body) -> str | None:
    """The SnapshotSchedule that made this Snapshot, if any."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "SnapshotSchedule":
            return str(ref.get("name"))
    return None


# ----------------------------------------------------------------------------- snapshots


# resume: after a restart, finish objects whose outcome never reached their status
@kopf.on.resume(GROUP, VERSION, "snapshots", when=_unsettled)
@kopf.on.create(GROUP, VERSION, "snapshots")
def snapshot_create(body: kopf.Body, patch: kopf.Patch, retry: int, namespace: str | None, uid: str,
                    memo: kopf.Memo, **_: Any) -> None:
    rt = _rt(memo)
    namespace = namespace or ""
    started = rt.first_seen.setdefault(uid, time.time())
    if uid not in rt.in_progress:
        rt.in_progress.add(uid)
        M.OP_IN_PROGRESS.labels(namespace).inc()
    schedule = _schedule_of(body)
    try:
        res = _decide(body, patch, lambda: reconcile.snapshot(dict(body), retry, started, rt.deps),
                      "SnapshotFailed")
    except _Failed:
        M.OP_SNAPSHOTS.labels(namespace, "failure").inc()
        if schedule:
            M.SCHED_RUNS.labels(namespace, schedule, "failure").inc()
        _done(rt, uid, namespace)
        raise
    _publish(rt, "snapshots", namespace, body["metadata"]["name"], patch)
    M.OP_SNAPSHOTS.labels(namespace, "success").inc()
    M.OP_SNAPSHOTS.labels(namespace, "failure")  # exists at 0, so increase() alerts see a first failure
    if schedule:
        M.SCHED_RUNS.labels(namespace, schedule, "success").inc()
        M.SCHED_RUNS.labels(namespace, schedule, "failure")
    M.OP_SNAPSHOT_SIZE.labels(namespace).observe(res.metrics["size"])
    M.OP_SNAPSHOT_RECORD.labels(namespace).observe(res.metrics["record"])
    M.OP_SNAPSHOT_DURATION.labels(namespace).observe(res.metrics["duration"])
    M.OP_LAST_SUCCESS.labels(namespace).set(time.time())
    _done(rt, uid, namespace)


def _done(rt: Runtime, uid: str, namespace: str) -> None:
    rt.first_seen.pop(uid, None)
    if uid in rt.in_progress:
        rt.in_progress.discard(uid)
        M.OP_IN_PROGRESS.labels(namespace).dec()


@kopf.on.delete(GROUP, VERSION, "snapshots")
def snapshot_delete(body: kopf.Body, retry: int, namespace: str | None, uid: str, memo: kopf.Memo,
                    logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    rt = _rt(memo)
    _done(rt, uid, namespace or "")
    try:
        out = reconcile.snapshot_delete(dict(body), retry, rt.deps)
    except reconcile.Retry as r:
        raise kopf.TemporaryError(str(r), delay=r.delay) from None
    logger.info("Snapshot deleted: %s", out.message)
    if out.abandoned:
        kopf.warn(body, reason="SnapshotCleanupAbandoned", message=out.message)


def _catalog_checked(body: kopf.Body, **_: Any) -> bool:
    return objects.phase_of(dict(body)) in (objects.READY, objects.FAILED) and not body.get(
        "metadata", {}).get("deletionTimestamp")


# one catalog: a Snapshot whose kubegfs snapshot vanished (e.g. `kubegfs snapshot delete --force`)
# (first look one interval after the Snapshot settled: the master has just answered for it, and a
# burst of new Snapshots would otherwise call this once each while the rest wait)
@kopf.timer(GROUP, VERSION, "snapshots", id="catalog-sync", interval=catalog_sync_seconds(),
            initial_delay=catalog_sync_seconds(), when=_catalog_checked)
def snapshot_sync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    res = reconcile.snapshot_sync(dict(body), _rt(memo).deps)
    if res is not None:
        _apply(patch, res.status)
        _post(body, res.event)


# ----------------------------------------------------------------------------- restores


@kopf.on.resume(GROUP, VERSION, "restores", when=_unsettled)
@kopf.on.create(GROUP, VERSION, "restores")
def restore_create(body: kopf.Body, patch: kopf.Patch, retry: int, namespace: str | None, uid: str,
                   memo: kopf.Memo, **_: Any) -> None:
    rt = _rt(memo)
    namespace = namespace or ""
    started = rt.first_seen.setdefault(uid, time.time())
    try:
        res = _decide(body, patch, lambda: reconcile.restore(dict(body), retry, started, rt.deps),
                      "RestoreFailed")
    except _Failed:
        M.OP_RESTORES.labels(namespace, "failure").inc()
        rt.first_seen.pop(uid, None)
        raise
    _publish(rt, "restores", namespace, body["metadata"]["name"], patch)
    M.OP_RESTORES.labels(namespace, "success").inc()
    M.OP_RESTORES.labels(namespace, "failure")
    M.OP_RESTORE_DURATION.labels(namespace).observe(res.metrics["duration"])
    rt.first_seen.pop(uid, None)


# ----------------------------------------------------------------------------- schedules


def _schedule_metrics(namespace: str, name: str, tick: reconcile.Tick | None) -> None:
    series = (M.SCHED_NEXT_RUN, M.SCHED_RETAINED, M.SCHED_LAST_SUCCESS, M.SCHED_PERIOD)
    if tick is None:  # the schedule is gone
        for g in (*series, M.SCHED_MISSED):
            try:
                g.remove(namespace, name)
            except KeyError:
                pass
        return
    M.SCHED_MISSED.labels(namespace, name).inc(tick.missed)
    M.SCHED_RETAINED.labels(namespace, name).set(tick.kept)
    for gauge, value in ((M.SCHED_NEXT_RUN, tick.next_run), (M.SCHED_LAST_SUCCESS, tick.last_success),
                         (M.SCHED_PERIOD, tick.period)):
        if value is None:
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        else:
            gauge.labels(namespace, name).set(value)


def _tick_and_write(rt: Runtime, body: dict[str, Any]) -> reconcile.Tick:
    meta = body["metadata"]
    # the watch may not have brought our last status write back yet: never act on older marks
    body = {**body, "status": reconcile.newest_marks(body.get("status"), rt.written.get(meta["uid"]))}
    tick = reconcile.schedule_tick(body, datetime.now(UTC), rt.deps)
    if not reconcile.unchanged(body.get("status"), tick.status):
        rt.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], "snapshotschedules", meta["name"], {"status": tick.status})
        rt.written[meta["uid"]] = tick.status
    return tick


@kopf.daemon(GROUP, VERSION, "snapshotschedules", id="scheduler", cancellation_timeout=10)
async def schedule_daemon(stopped: kopf.DaemonStopped, body: kopf.Body, name: str | None,
                          namespace: str | None, memo: kopf.Memo,
                          logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    """One per SnapshotSchedule: wakes at each scheduled time (and every schedule_tick seconds,
    to see its Snapshots finish and spec edits), starts runs, prunes, reports. ``body`` is kopf's
    live view of the object, so each tick sees its latest spec and status."""
    rt = _rt(memo)
    ns, nm = namespace or "", name or ""
    while not stopped:
        delay = rt.cfg.schedule_tick
        try:
            tick = await asyncio.to_thread(_tick_and_write, rt, dict(body))
        except Exception as exc:  # noqa: BLE001 - a failed tick is retried; the daemon must live on
            logger.warning("schedule tick failed (retrying): %s", exc)
        else:
            for ev in tick.events:
                kopf.event(body, type=ev[0], reason=ev[1], message=ev[2])
            _schedule_metrics(ns, nm, tick)
            delay = tick.sleep
        await stopped.wait(delay)
    if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
        _schedule_metrics(ns, nm, None)
        rt.written.pop(body.get("metadata", {}).get("uid", ""), None)
