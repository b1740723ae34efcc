"""Every kopf registration of the kubegfs operator, and nothing else of substance.

Run: ``kubegfs-operator`` (or ``kopf run --standalone --all-namespaces -m kubegfs_operator.main``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import kopf
from aiohttp import web

from kubegfs import metrics as M
from kubegfs.auth import Tokens, metrics_only_policy
from kubegfs.client import Client
from kubegfs.tls import server_context_from_env
from kubegfs.web import make_middlewares, metrics_handler

from . import FINALIZER, GROUP, VERSION, objects, reconcile
from .cluster import fetch_view
from .config import Config

log = logging.getLogger("kubegfs.operator")
_first_seen: dict[str, float] = {}
_in_progress: set[str] = set()


class _State:
    cfg: Config
    core: Any
    custom: Any
    deps: reconcile.Deps


S = _State()


def _deps(cfg: Config, core: Any, custom: Any) -> reconcile.Deps:
    def get_snapshot(ns: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "snapshots", name)
            return dict(obj)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    return reconcile.Deps(
        cfg=cfg,
        view=lambda ref: fetch_view(core, ref, cfg.master_port, cfg.chunkserver_port, cfg.scheme),
        master=lambda url: Client(url, cfg.token, timeout=cfg.request_timeout),
        get_snapshot=get_snapshot,
    )


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    from kubernetes import client, config

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "kubegfs-operator"  # Events' source, not "kopf"
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    settings.posting.event_name_prefix = "kubegfs-"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 16
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    S.cfg = Config.from_env()
    S.core = client.CoreV1Api()
    S.custom = client.CustomObjectsApi()
    S.deps = _deps(S.cfg, S.core, S.custom)
    tokens = Tokens(S.cfg.token, metrics=S.cfg.metrics_token)
    app = web.Application(middlewares=make_middlewares(tokens, M.OPERATOR_HTTP, metrics_only_policy))
    app.router.add_get("/metrics", metrics_handler(M.OPERATOR))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    mhost, _sep, mport = S.cfg.metrics_listen.rpartition(":")
    await web.TCPSite(runner, mhost or "0.0.0.0", int(mport), ssl_context=server_context_from_env()).start()
    memo["metrics_runner"] = runner
    log.info("metrics on %s://%s/metrics (bearer token required)",
             "https" if os.environ.get("KUBEGFS_TLS_CERT") else "http", S.cfg.metrics_listen)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
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


def _started(uid: str) -> float:
    return _first_seen.setdefault(uid, time.time())


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


class _Failed(kopf.PermanentError):
    pass


def _unsettled(body: kopf.Body, **_: Any) -> bool:
    return not objects.settled(body.get("status"), body.get("metadata", {}).get("generation"))


# resume: after a restart, finish objects whose outcome never reached their status
@kopf.on.resume(GROUP, VERSION, "snapshots", when=_unsettled)
@kopf.on.create(GROUP, VERSION, "snapshots")
def snapshot_create(body: kopf.Body, patch: kopf.Patch, retry: int, namespace: str | None, uid: str,
                    **_: Any) -> None:
    namespace = namespace or ""
    started = _started(uid)
    if uid not in _in_progress:
        _in_progress.add(uid)
        M.OP_IN_PROGRESS.labels(namespace).inc()
    try:
        res = _decide(body, patch, lambda: reconcile.snapshot(dict(body), retry, started, S.deps),
                      "SnapshotFailed")
    except _Failed:
        M.OP_SNAPSHOTS.labels(namespace, "failure").inc()
        _done(uid, namespace)
        raise
    M.OP_SNAPSHOTS.labels(namespace, "success").inc()
    M.OP_SNAPSHOTS.labels(namespace, "failure")  # exists at 0, so increase() alerts see a first failure
    M.OP_SNAPSHOT_SIZE.labels(namespace).observe(res.metrics["size"])
    M.OP_SNAPSHOT_RECORD.labels(namespace).observe(res.metrics["record"])
    M.OP_SNAPSHOT_DURATION.labels(namespace).observe(res.metrics["duration"])
    M.OP_LAST_SUCCESS.labels(namespace).set(time.time())
    _done(uid, namespace)


def _done(uid: str, namespace: str) -> None:
    _first_seen.pop(uid, None)
    if uid in _in_progress:
        _in_progress.discard(uid)
        M.OP_IN_PROGRESS.labels(namespace).dec()


@kopf.on.delete(GROUP, VERSION, "snapshots")
def snapshot_delete(body: kopf.Body, retry: int, namespace: str | None, uid: str,
                    logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    namespace = namespace or ""
    _done(uid, namespace)
    try:
        what = reconcile.snapshot_delete(dict(body), retry, S.deps)
    except reconcile.Retry as r:
        raise kopf.TemporaryError(str(r), delay=r.delay) from None
    logger.info("Snapshot deleted: %s", what)
    if "gave up" in what:
        kopf.warn(body, reason="SnapshotCleanupAbandoned", message=what)


@kopf.on.resume(GROUP, VERSION, "restores", when=_unsettled)
@kopf.on.create(GROUP, VERSION, "restores")
def restore_create(body: kopf.Body, patch: kopf.Patch, retry: int, namespace: str | None, uid: str,
                   **_: Any) -> None:
    namespace = namespace or ""
    started = _started(uid)
    try:
        res = _decide(body, patch, lambda: reconcile.restore(dict(body), retry, started, S.deps),
                      "RestoreFailed")
    except _Failed:
        M.OP_RESTORES.labels(namespace, "failure").inc()
        _first_seen.pop(uid, None)
        raise
    M.OP_RESTORES.labels(namespace, "success").inc()
    M.OP_RESTORES.labels(namespace, "failure")
    M.OP_RESTORE_DURATION.labels(namespace).observe(res.metrics["duration"])
    _first_seen.pop(uid, None)
