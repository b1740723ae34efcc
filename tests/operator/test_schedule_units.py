"""SnapshotSchedule logic without a server: cron times, CronJob-like missed runs, concurrency
and restic-style retention, driven by a fake clock over generated timelines."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegfs_operator import api
from kubegfs_operator.schedule import (
    Defer,
    Kept,
    Owned,
    Retention,
    Start,
    concurrency,
    due,
    parse_cron,
    parse_retention,
    parse_schedule,
    plan,
    retain,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# ----------------------------------------------------------------------------- a fake world


@dataclass
class World:
    """The schedule's Snapshot objects and status, advanced tick by tick like the operator does."""

    cron_expr: str
    retention: Retention
    policy: str = "Forbid"
    deadline: int | None = None
    tz: str | None = None
    ready_after: timedelta = timedelta(seconds=30)
    fail_every: int = 0  # every n-th run fails
    created_at: datetime = T0
    since: datetime = T0
    snaps: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)  # name -> (scheduled, created)
    runs: list[datetime] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    missed: int = 0
    suspended: bool = False
    clock: datetime = T0

    def __post_init__(self) -> None:
        self.cron = parse_cron(self.cron_expr, self.tz)

    def phase(self, name: str, now: datetime) -> str:
        sched, created = self.snaps[name]
        if now - created < self.ready_after:
            return "Shipping"
        if self.fail_every and self.runs.index(sched) % self.fail_every == self.fail_every - 1:
            return "Failed"
        return "Ready"

    def tick(self, now: datetime, crash_before_status: bool = False) -> None:
        owned = [Owned(n, self.phase(n, now), s) for n, (s, _c) in self.snaps.items()]
        p = plan(self.cron, self.retention, self.policy, self.suspended, self.deadline, 1, self.since, owned, now)
        for name in p.prune:
            del self.snaps[name]
            self.pruned.append(name)
        if p.due is None:
            return
        if p.due.missed and not crash_before_status:
            self.missed += p.due.missed
        if isinstance(p.action, Start):
            for name in p.action.replace:
                del self.snaps[name]
            name = "sched-" + p.due.run_at.strftime("%Y%m%d-%H%M%S")
            if name not in self.snaps:  # create is idempotent by name (409 = already there)
                self.snaps[name] = (p.due.run_at, now)
                self.runs.append(p.due.run_at)
        if crash_before_status:
            return
        marks = [t for t in (p.due.latest_missed, p.due.run_at if isinstance(p.action, Start) else None) if t]
        if marks:
            self.since = max([self.since, *marks])

    def run(self, until: datetime, step: timedelta, down: tuple[datetime, datetime] | None = None) -> None:
        while self.clock <= until:
            if down is None or not down[0] <= self.clock < down[1]:
                self.tick(self.clock)
            self.clock += step

    def ready_names(self, now: datetime) -> set[str]:
        return {n for n in self.snaps if self.phase(n, now) == "Ready"}


# ----------------------------------------------------------------------------- an independent oracle


def oracle_keep(times: list[datetime], r: Retention, tz=UTC) -> set[datetime]:
    """Keep-last N, plus the newest snapshot of each of the newest N hours/days/weeks/... (enough
    history assumed: the 'oldest' extra of restic does not apply)."""
    keep = set(sorted(times, reverse=True)[: r.last])
    periods = {
        "hourly": lambda t: t.astimezone(tz).strftime("%Y%m%d%H"),
        "daily": lambda t: t.astimezone(tz).strftime("%Y%m%d"),
        "weekly": lambda t: t.astimezone(tz).strftime("%G%V"),
        "monthly": lambda t: t.astimezone(tz).strftime("%Y%m"),
        "yearly": lambda t: t.astimezone(tz).strftime("%Y"),
    }
    for rule, key in periods.items():
        newest: dict[str, datetime] = {}
        for t in times:
            k = key(t)
            newest[k] = max(newest.get(k, t), t)
        for k in sorted(newest, reverse=True)[: getattr(r, rule)]:
            keep.add(newest[k])
    return keep


# ----------------------------------------------------------------------------- cron


def test_cron_fields_macros_seconds_and_errors():
    assert parse_cron("0 2 * * *").next_after(T0) == T0.replace(hour=2)
    assert parse_cron("@hourly").next_after(T0) == T0.replace(hour=1)
    sec = parse_cron("*/10 * * * * *")
    assert sec.seconds and sec.next_after(T0) == T0 + timedelta(seconds=10)
    assert sec.latest_at_or_before(T0 + timedelta(seconds=19, microseconds=5)) == T0 + timedelta(seconds=10)
    assert sec.latest_at_or_before(T0 + timedelta(seconds=20)) == T0 + timedelta(seconds=20)
    for bad, words in [("61 * * * *", "not a valid"), ("* * *", "5 fields"), ("@often", "unknown macro"),
                       ("CRON_TZ=UTC 0 * * * *", "timeZone"), ("0 0 30 2 *", "never fires"), (None, "cron")]:
        with pytest.raises(api.SpecError, match=words):
            parse_cron(bad)
    with pytest.raises(api.SpecError, match="IANA"):
        parse_cron("0 2 * * *", "Mars/Olympus")


def test_time_zone_and_dst():
    berlin = parse_cron("30 2 * * *", "Europe/Berlin")
    assert berlin.next_after(T0) == datetime(2026, 1, 1, 1, 30, tzinfo=UTC)  # 02:30 CET
    # across the spring-forward night (02:30 does not exist on 29 March) it still fires once a day
    t = datetime(2026, 3, 27, 12, tzinfo=UTC)
    fires = []
    for _ in range(4):
        t = berlin.next_after(t)
        fires.append(t)
    assert [f.astimezone(ZoneInfo("Europe/Berlin")).day for f in fires] == [28, 29, 30, 31]
    assert fires[0].astimezone(ZoneInfo("Europe/Berlin")).hour == 2 and fires[2].hour == 0  # CEST: 00:30 UTC


# ----------------------------------------------------------------------------- when to run


def test_due_runs_latest_once_and_counts_misses():
    cron = parse_cron("0 * * * *")
    now = T0 + timedelta(hours=5, minutes=10)
    d = due(cron, T0, now, None)
    assert d.run_at == T0 + timedelta(hours=5) and d.missed == 4
    assert d.latest_missed == T0 + timedelta(hours=4) and d.next_at == T0 + timedelta(hours=6)
    # once started (since = run_at) nothing more is due until the next hour
    assert due(cron, d.run_at, now, None).run_at is None
    # with a deadline the late run is not started: all five are missed
    late = due(cron, T0, now, 300)
    assert late.run_at is None and late.missed == 5 and late.latest_missed == T0 + timedelta(hours=5)
    assert due(cron, T0, now, 601).run_at == T0 + timedelta(hours=5)
    # a time exactly at now is due; creation at a scheduled time does not run that one
    assert due(cron, T0, T0 + timedelta(hours=1), 0).run_at == T0 + timedelta(hours=1)
    assert due(cron, T0, T0, None).run_at is None


def test_concurrency_policies():
    assert concurrency("Forbid", []) == Start()
    assert concurrency("Forbid", ["a"]) == Defer(("a",))
    assert concurrency("Allow", ["a"]) == Start()
    assert concurrency("Replace", ["a", "b"]) == Start(("a", "b"))


def test_every_run_fires_once_on_time_over_a_day():
    w = World("*/5 * * * *", Retention())
    w.run(T0 + timedelta(days=1), timedelta(seconds=60))
    expected = [T0 + timedelta(minutes=5 * i) for i in range(1, 288 + 1)]
    assert w.runs == expected and w.missed == 0
    assert len(w.snaps) == 288  # empty retention keeps all


def test_operator_down_catches_up_at_most_once():
    w = World("0 * * * *", Retention())
    down = (T0 + timedelta(hours=2, minutes=30), T0 + timedelta(hours=9, minutes=15))
    w.run(T0 + timedelta(hours=12), timedelta(minutes=1), down=down)
    # hours 3..9 fell in the outage: only 9:00 is run (at 9:15), 3..8 are missed
    assert T0 + timedelta(hours=9) in w.runs
    assert [t.hour for t in w.runs] == [1, 2, 9, 10, 11, 12] and w.missed == 6


def test_operator_down_beyond_the_deadline_runs_nothing_and_counts_once():
    w = World("0 * * * *", Retention(), deadline=600)
    down = (T0 + timedelta(hours=2, minutes=30), T0 + timedelta(hours=9, minutes=15))
    w.run(T0 + timedelta(hours=12), timedelta(minutes=1), down=down)
    assert [t.hour for t in w.runs] == [1, 2, 10, 11, 12] and w.missed == 7


def test_crash_between_create_and_status_makes_no_duplicate():
    w = World("0 * * * *", Retention())
    now = T0 + timedelta(hours=1, seconds=3)
    w.tick(now, crash_before_status=True)
    w.tick(now + timedelta(seconds=5))  # the restarted operator: same run, same name
    assert w.runs == [T0 + timedelta(hours=1)] and len(w.snaps) == 1
    w.tick(now + timedelta(seconds=10))
    assert len(w.snaps) == 1


def test_forbid_defers_within_the_deadline_and_replace_replaces():
    # every minute, a snapshot takes 90 s: Forbid starts the deferred run late, if in time
    w = World("* * * * *", Retention(), policy="Forbid", ready_after=timedelta(seconds=90), deadline=45)
    w.run(T0 + timedelta(minutes=10), timedelta(seconds=5))
    started = sorted(created for _s, created in w.snaps.values())
    assert all((b - a).total_seconds() >= 90 for a, b in zip(started, started[1:], strict=False))
    assert all((created - sched).total_seconds() <= 45 for sched, created in w.snaps.values())
    assert any(created > sched for sched, created in w.snaps.values())  # deferred, then started
    assert w.missed > 0 and len(w.runs) + w.missed == 10
    r = World("* * * * *", Retention(), policy="Replace", ready_after=timedelta(seconds=90))
    r.run(T0 + timedelta(minutes=10), timedelta(seconds=5))
    assert len(r.runs) == 10 and len(r.snaps) == 1  # each run replaced the unfinished one
    a = World("* * * * *", Retention(), policy="Allow", ready_after=timedelta(seconds=90))
    a.run(T0 + timedelta(minutes=10), timedelta(seconds=5))
    assert len(a.runs) == 10 and len(a.snaps) == 10


def test_suspend_and_resume():
    w = World("0 * * * *", Retention(), deadline=1800)
    w.run(T0 + timedelta(hours=3), timedelta(minutes=5))
    w.suspended = True
    w.run(T0 + timedelta(hours=8, minutes=10), timedelta(minutes=5))
    assert [t.hour for t in w.runs] == [1, 2, 3]
    w.suspended = False
    w.run(T0 + timedelta(hours=10), timedelta(minutes=5))
    # on resume at 8:15 the 8:00 run is within the deadline: it runs; 4..7 are missed
    assert [t.hour for t in w.runs] == [1, 2, 3, 8, 9, 10] and w.missed == 4


# ----------------------------------------------------------------------------- retention


def test_a_month_of_hourly_runs_keeps_exactly_the_policy():
    r = Retention(last=3, hourly=5, daily=7, weekly=3, monthly=2)
    w = World("17 * * * *", r, ready_after=timedelta(minutes=2))
    end = T0 + timedelta(days=31, hours=5)
    w.run(end, timedelta(minutes=5))
    runs = list(w.runs)
    assert len(runs) == 31 * 24 + 5 and w.missed == 0
    expected = {"sched-" + t.strftime("%Y%m%d-%H%M%S") for t in oracle_keep(runs, r)}
    assert w.ready_names(end) == expected
    assert len(expected) < 3 + 5 + 7 + 3 + 2  # rules overlap on the newest ones
    # the pruned ones are exactly the others, each deleted once
    assert sorted(w.pruned) == sorted(set(w.pruned)) and set(w.pruned) | expected == {
        "sched-" + t.strftime("%Y%m%d-%H%M%S") for t in runs}


def test_failed_runs_keep_only_the_newest_and_never_count_for_retention():
    w = World("0 */6 * * *", Retention(daily=2), ready_after=timedelta(minutes=1), fail_every=3)
    end = T0 + timedelta(days=4, hours=1)
    w.run(end, timedelta(minutes=10))
    phases = {n: w.phase(n, end) for n in w.snaps}
    assert list(phases.values()).count("Failed") == 1
    ready = sorted(n for n, p in phases.items() if p == "Ready")
    assert len(ready) == 2 and ready[-1].startswith("sched-20260105")


def test_retention_in_the_schedule_time_zone():
    tokyo = ZoneInfo("Asia/Tokyo")  # UTC+9
    snaps = [Kept("c", datetime(2026, 1, 1, 13, 0, tzinfo=UTC)),   # Jan 1, 22:00 in Tokyo
             Kept("a", datetime(2026, 1, 1, 14, 30, tzinfo=UTC)),  # Jan 1, 23:30 in Tokyo
             Kept("b", datetime(2026, 1, 1, 15, 30, tzinfo=UTC))]  # Jan 2, 00:30 in Tokyo
    assert retain(snaps, Retention(daily=2), tokyo) == {"b": ["daily"], "a": ["daily"]}
    # one UTC day: the newest, and the oldest because a daily count is left over
    assert retain(snaps, Retention(daily=2), UTC) == {"b": ["daily"], "c": ["oldest (daily)"]}
    assert retain(snaps, Retention(daily=1), tokyo) == {"b": ["daily"]}


def test_retention_young_schedule_keeps_the_oldest_and_empty_keeps_all():
    snaps = [Kept(f"s{i}", T0 + timedelta(hours=i)) for i in range(5)]  # one day only
    kept = retain(snaps, Retention(daily=7))
    assert kept == {"s4": ["daily"], "s0": ["oldest (daily)"]}
    assert set(retain(snaps, Retention())) == {f"s{i}" for i in range(5)}
    assert retain(snaps, Retention(last=2)) == {"s4": ["last"], "s3": ["last"]}
    assert parse_retention(None) == Retention(last=7)
    with pytest.raises(api.SpecError):
        parse_retention({"keepDaily": -1})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 400 * 24 * 60), min_size=1, max_size=60, unique=True),
       st.tuples(*[st.integers(0, 6)] * 6))
def test_retention_properties(minutes, counts):
    r = Retention(*counts)
    times = [T0 + timedelta(minutes=m) for m in minutes]
    snaps = [Kept(t.isoformat(), t) for t in times]
    kept = retain(snaps, r)
    assert set(kept) <= {s.name for s in snaps}
    if r.empty():
        assert len(kept) == len(snaps)
        return
    newest = max(times).isoformat()
    assert newest in kept
    time_rules = sum(1 for c in counts[1:] if c)
    assert len(kept) <= sum(counts) + time_rules
    assert {t.isoformat() for t in oracle_keep(times, r)} <= set(kept)


def test_plan_never_prunes_unfinished_or_deleting_snapshots():
    cron = parse_cron("0 * * * *")
    owned = [Owned("old", "Ready", T0), Owned("new", "Ready", T0 + timedelta(hours=1)),
             Owned("going", "Ready", T0 - timedelta(hours=1), deleting=True),
             Owned("busy", "Shipping", T0 + timedelta(hours=2))]
    p = plan(cron, Retention(last=1), "Forbid", False, None, 1, T0 + timedelta(hours=2), owned,
             T0 + timedelta(hours=3, seconds=1))
    assert p.prune == ("old",) and p.active == ("busy",) and isinstance(p.action, Defer)
    assert p.last_successful is not None and p.last_successful.name == "new"
    suspended = plan(cron, Retention(last=1), "Forbid", True, None, 1, T0, owned, T0 + timedelta(hours=3))
    assert suspended.due is None and suspended.action is None and suspended.prune == ("old",)


def test_parse_schedule():
    s = parse_schedule({"path": "/data", "schedule": "0 2 * * *", "timeZone": "Europe/Berlin",
                        "snapshotTemplate": {"copies": 3, "deletionPolicy": "Retain", "labels": {"tier": "gold"}},
                        "retention": {"keepDaily": 7, "keepWeekly": 4}}, "team")
    assert s.snapshot_spec == {"path": "/data", "copies": 3, "deletionPolicy": "Retain"}
    assert s.retention == Retention(daily=7, weekly=4) and s.concurrency_policy == "Forbid"
    assert s.starting_deadline_seconds is None and s.failed_history_limit == 1 and not s.suspend
    for bad in ({"path": "rel", "schedule": "@daily"}, {"path": "/d", "schedule": "nope"},
                {"path": "/d", "schedule": "@daily", "concurrencyPolicy": "Sometimes"},
                {"path": "/d", "schedule": "@daily", "startingDeadlineSeconds": 0},
                {"path": "/d", "schedule": "@daily", "snapshotTemplate": {"copies": 99}}):
        with pytest.raises(api.SpecError):
            parse_schedule(bad, "team")


# ----------------------------------------------------------------------------- derived names


def test_derived_names_fit_for_any_legal_name():
    uid = "7612454b-bfa6-4d39-bfd2-3eb43efae626"
    assert api.kubegfs_snapshot_name("team", "nightly", uid) == "team.nightly-7612454b"
    rnd = random.Random(7)
    ns = "n" * 63
    names = {"a" * 253, "a" * 252 + "b", "x." * 126 + "z", "-".join("ab" for _ in range(84)) + "c"}
    seen = set()
    for name in names:
        full = api.kubegfs_snapshot_name(ns, name, uid)
        assert len(full) <= 253 and full.endswith("-7612454b") and full[-10] != "-"
        seen.add(full)
        obj = api.derived_name(name, "-20260101-020000")
        assert len(obj) <= 253 and obj.endswith("-20260101-020000") and obj[0].isalnum()
        lv = api.label_value(name)
        assert len(lv) <= 63 and lv[-1].isalnum()
    assert len(seen) == len(names)  # different names never collide
    short = "".join(rnd.choice("abc") for _ in range(20))
    assert api.label_value(short) == short and api.shorten(short, 253) == short


# ----------------------------------------------------------------------------- one tick, with fake Kubernetes calls


class FakeSnapshots:
    """Snapshot objects of one namespace, as the API server would keep them (409 on a taken name)."""

    def __init__(self):
        self.objs = {}
        self.deleted = []

    def deps(self):
        from kubegfs_operator import reconcile
        from kubegfs_operator.config import Config

        def create(ns, body):
            body = json.loads(json.dumps(body))
            body["metadata"].setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            return self.objs.setdefault(body["metadata"]["name"], body)

        def delete(ns, name):
            self.deleted.append(name)
            self.objs.pop(name, None)

        def no_master(url):
            raise AssertionError("a schedule tick never calls the master")

        return reconcile.Deps(Config(token="t", schedule_tick=10), lambda ref: None, no_master,
                              lambda ns, n: self.objs.get(n), create, delete,
                              lambda ns, sel: list(self.objs.values()))


def sched_body(spec, status=None, name="nightly"):
    return {"metadata": {"namespace": "team", "name": name, "uid": "sched-uid", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"path": "/data", "schedule": "0 * * * *", **spec}, "status": status or {}}


def test_schedule_tick_creates_an_owned_run_once_and_reports():
    from kubegfs_operator import reconcile

    k = FakeSnapshots()
    d = k.deps()
    now = T0 + timedelta(hours=3, minutes=20)
    tick = reconcile.schedule_tick(sched_body({"snapshotTemplate": {"labels": {"tier": "gold"}}}), now, d)
    run = k.objs["nightly-20260101-030000"]
    assert run["metadata"]["ownerReferences"][0]["uid"] == "sched-uid"
    assert run["metadata"]["labels"] == {"tier": "gold", "kubegfs.io/schedule": "nightly",
                                         "app.kubernetes.io/managed-by": "kubegfs-operator"}
    assert run["metadata"]["annotations"]["kubegfs.io/scheduled-at"] == "2026-01-01T03:00:00Z"
    st = tick.status
    assert st["phase"] == "Active" and st["lastScheduleTime"] == "2026-01-01T03:00:00Z"
    assert st["nextScheduleTime"] == "2026-01-01T04:00:00Z" and st["active"] == ["nightly-20260101-030000"]
    assert st["missedRuns"] == 2 and st["lastMissedTime"] == "2026-01-01T02:00:00Z" and tick.missed == 2
    assert [e[1] for e in tick.events] == ["MissedSchedule", "SnapshotScheduled"]
    assert tick.sleep == 10 and tick.period == 3600
    # the status write was lost (operator killed): the next tick finds the same run, makes no second
    again = reconcile.schedule_tick(sched_body({}), now + timedelta(seconds=1), d)
    assert list(k.objs) == ["nightly-20260101-030000"] and again.status["lastScheduleTime"] == st["lastScheduleTime"]
    # the marks of the operator's own last write win over a stale watch view
    merged = reconcile.newest_marks({"lastScheduleTime": "2026-01-01T01:00:00Z"}, st)
    assert merged["lastScheduleTime"] == st["lastScheduleTime"] and merged["missedRuns"] == 2


def test_schedule_tick_invalid_spec_fails_once_and_never_creates():
    from kubegfs_operator import reconcile

    k = FakeSnapshots()
    body = sched_body({"schedule": "99 * * * *"})
    tick = reconcile.schedule_tick(body, T0 + timedelta(hours=1), k.deps())
    assert tick.status["phase"] == "Failed" and not k.objs
    conds = {c["type"]: c for c in tick.status["conditions"]}
    assert conds["Failed"]["reason"] == "InvalidSpec" and "99 * * * *" in conds["Failed"]["message"]
    assert [e[1] for e in tick.events] == ["InvalidSpec"]
    body["status"] = tick.status
    assert reconcile.schedule_tick(body, T0 + timedelta(hours=2), k.deps()).events == []  # no event spam


def test_schedule_tick_name_conflict_is_a_skipped_run_not_an_adoption():
    from kubegfs_operator import reconcile

    k = FakeSnapshots()
    k.objs["nightly-20260101-010000"] = {"metadata": {"name": "nightly-20260101-010000", "ownerReferences": [],
                                                      "creationTimestamp": "2026-01-01T00:59:00Z"}}
    tick = reconcile.schedule_tick(sched_body({}), T0 + timedelta(hours=1, seconds=2), k.deps())
    assert "lastScheduleTime" not in tick.status and tick.status["lastMissedTime"] == "2026-01-01T01:00:00Z"
    assert [e[1] for e in tick.events] == ["NameConflict"] and not k.deleted


def test_cli_catalog_owner_refusal_and_pre_restore_names():
    from kubegfs import catalog
    from kubegfs.errors import Conflict

    entry = {"name": "team.nightly-1234", "labels": {"kubernetes.namespace": "team", "kubernetes.name": "nightly"}}
    assert catalog.owner(entry) == "Snapshot team/nightly" and catalog.owner({"name": "x"}) is None
    with pytest.raises(Conflict, match=r"Snapshot team/nightly.*kubectl delete snapshot -n team nightly.*--force"):
        catalog.refuse_owned_delete(entry)
    catalog.refuse_owned_delete({"name": "mine", "labels": {}})
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert catalog.pre_restore_name("s1", now) == "pre-restore-s1-20260102-030405"
    long = catalog.pre_restore_name("x" * 253, now)
    assert len(long) == 253 and long.endswith("-20260102-030405")


def test_catalog_sync_marks_missing_only_from_a_listing_newer_than_the_outcome():
    from kubegfs_operator import objects, reconcile
    from kubegfs_operator.config import Config

    st = objects.ready(None, 1, "SnapshotReady", "ok")
    for c in st["conditions"]:
        c["lastTransitionTime"] = "2026-01-01T00:00:10Z"
    st.update(snapshotID="k8s-u1", name="team.s1-u1")
    body = {"metadata": {"namespace": "team", "name": "s1", "uid": "u1", "generation": 1},
            "spec": {"path": "/data"}, "status": st}
    t_ready = datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC).timestamp()

    def deps(listed_at, entries):
        d = reconcile.Deps(Config(token="t"), lambda ref: None, lambda url: None, lambda ns, n: None)
        d.catalog = lambda ref: reconcile.Catalog(listed_at, entries)
        return d

    assert reconcile.snapshot_sync(body, deps(t_ready - 5, {})) is None  # listed before it was Ready
    assert reconcile.snapshot_sync(body, deps(t_ready + 60, {"k8s-u1": {"state": "ready"}})) is None
    gone = reconcile.snapshot_sync(body, deps(t_ready + 60, {}))
    assert gone.status["phase"] == "Failed" and gone.event[1] == "SnapshotMissing"
    assert "team.s1-u1" in gone.event[2]
    body["status"] = {**st, **gone.status}
    assert reconcile.snapshot_sync(body, deps(t_ready + 90, {})) is None  # reported once
    back = reconcile.snapshot_sync(body, deps(t_ready + 120, {"k8s-u1": {"state": "ready", "name": "team.s1-u1"}}))
    assert back.status["phase"] == "Ready" and back.event[1] == "SnapshotFound"


def test_operator_interval_settings(monkeypatch):
    from kubegfs_operator import config

    monkeypatch.setenv("KUBEGFS_TOKEN", "t")
    monkeypatch.setenv("KUBEGFS_SCHEDULE_TICK_SECONDS", "2.5")
    assert config.Config.from_env().schedule_tick == 2.5 and config.catalog_sync_seconds() == 60
    for bad in ("soon", "0", "-1", "1e9"):
        monkeypatch.setenv("KUBEGFS_CATALOG_SYNC_SECONDS", bad)
        with pytest.raises(SystemExit, match="KUBEGFS_CATALOG_SYNC_SECONDS"):
            config.catalog_sync_seconds()


def test_schedule_status_carries_the_installation_health():
    from kubegfs_operator import reconcile

    k = FakeSnapshots()
    d = k.deps()
    seen = []
    d.health = lambda ref: seen.append(ref) or reconcile.Health(False, "LostMetadataSuspected", "run recover",
                                                                 warning=True)
    tick = reconcile.schedule_tick(sched_body({}), T0 + timedelta(minutes=5), d)
    conds = {c["type"]: c for c in tick.status["conditions"]}
    assert conds["ClusterHealthy"]["status"] == "False" and conds["ClusterHealthy"]["message"] == "run recover"
    assert conds["Ready"]["status"] == "True" and seen[0].name == "kubegfs" and seen[0].namespace == "team"
    d.health = lambda ref: reconcile.Health(True, "Healthy", "fine")
    again = reconcile.schedule_tick(sched_body({}, tick.status), T0 + timedelta(minutes=6), d)
    assert {c["type"]: c for c in again.status["conditions"]}["ClusterHealthy"]["status"] == "True"
    fresh = reconcile.schedule_tick(sched_body({}), T0 + timedelta(minutes=6), d)
    assert "ClusterHealthy" not in {c["type"] for c in fresh.status["conditions"]}
