"""SnapshotSchedule logic, pure: cron times in a time zone, CronJob-like due/missed decisions,
concurrency, and grandfather-father-son retention (restic's ``--keep-*`` rules).

No I/O and no clock: every function takes ``now``, so tests drive it over generated timelines.

Semantics (the same as a Kubernetes CronJob's):

- A run is due for the most recent scheduled time ``t`` with ``since < t <= now``, where
  ``since`` is the later of the last started run, the last missed run and the schedule's
  creation. Older scheduled times in that window are *missed*: an operator that was down
  catches up at most once.
- With ``startingDeadlineSeconds`` a run whose time is more than that many seconds ago is not
  started any more; it is missed too.
- ``Forbid`` defers a due run while a snapshot of the schedule is still being taken (it starts
  when that finishes, if still within the deadline); ``Replace`` deletes the unfinished ones and
  starts; ``Allow`` starts regardless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .api import SpecError, parse_snapshot

MAX_COUNTED_MISSES = 1000
"""Counting missed times stops here (a per-second schedule after a week down)."""

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


@dataclass(frozen=True)
class Cron:
    """A cron expression in a time zone: 5 fields, 6 with a leading seconds field, or a macro."""

    expr: str
    tz: tzinfo
    seconds: bool

    def _iter(self, start: datetime) -> Any:
        return croniter(self.expr, start.astimezone(self.tz), second_at_beginning=self.seconds)

    def next_after(self, t: datetime) -> datetime:
        """The first scheduled time strictly after ``t``."""
        nxt: datetime = self._iter(t).get_next(datetime)
        return nxt.astimezone(UTC)

    def latest_at_or_before(self, t: datetime) -> datetime:
        """The last scheduled time at or before ``t``."""
        nxt = self.next_after(t - timedelta(seconds=1))  # croniter works in whole seconds
        if nxt <= t:
            return nxt
        prev: datetime = self._iter(t).get_prev(datetime)
        return prev.astimezone(UTC)

    def count_between(self, after: datetime, before: datetime, cap: int = MAX_COUNTED_MISSES) -> int:
        """Scheduled times strictly between ``after`` and ``before`` (at most ``cap``)."""
        it = self._iter(after)
        n = 0
        while n < cap:
            t = it.get_next(datetime).astimezone(UTC)
            if t >= before:
                break
            n += 1
        return n

    def period(self, now: datetime) -> timedelta:
        """The interval around ``now``: from the latest scheduled time to the next one."""
        return self.next_after(now) - self.latest_at_or_before(now)


def parse_cron(expr: Any, time_zone: Any = None) -> Cron:
    if not isinstance(expr, str) or not expr.strip():
        raise SpecError("schedule must be a cron expression such as '0 2 * * *'")
    text = " ".join(expr.split())
    if text.upper().startswith(("TZ=", "CRON_TZ=")):
        raise SpecError("schedule: put the time zone in spec.timeZone, not in the expression")
    fields = text.split(" ")
    if text.startswith("@"):
        if text not in MACROS:
            raise SpecError(f"schedule: unknown macro {text!r} (one of {', '.join(MACROS)})")
        seconds = False
    elif len(fields) in (5, 6):
        seconds = len(fields) == 6
    else:
        raise SpecError(f"schedule {text!r}: 5 fields (minute hour day month weekday), "
                        "or 6 with a leading seconds field")
    if not croniter.is_valid(text, second_at_beginning=seconds):
        raise SpecError(f"schedule {text!r} is not a valid cron expression")
    tz: tzinfo = UTC
    if time_zone not in (None, ""):
        if not isinstance(time_zone, str):
            raise SpecError("timeZone must be an IANA time zone name such as 'Europe/Berlin'")
        try:
            tz = ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise SpecError(f"timeZone {time_zone!r} is not a known IANA time zone") from exc
    cron = Cron(text, tz, seconds)
    try:
        cron.next_after(datetime(2000, 1, 1, tzinfo=UTC))
    except Exception as exc:  # noqa: BLE001 - e.g. '0 0 30 2 *' never matches
        raise SpecError(f"schedule {text!r} never fires") from exc
    return cron


# ----------------------------------------------------------------------------- when to run


@dataclass(frozen=True)
class Due:
    run_at: datetime | None
    """The scheduled time to start a run for now, or None."""
    missed: int
    """Scheduled times that will never run (capped at ``MAX_COUNTED_MISSES``)."""
    latest_missed: datetime | None
    """The most recent of those, to remember so they are counted once."""
    next_at: datetime
    """The first scheduled time after ``now``."""


def due(cron: Cron, since: datetime, now: datetime, deadline_seconds: int | None) -> Due:
    """What to start at ``now``; ``since`` = the latest of last run, last miss and creation."""
    next_at = cron.next_after(now)
    latest = cron.latest_at_or_before(now)
    if latest <= since:
        return Due(None, 0, None, next_at)
    older = cron.count_between(since, latest)
    if deadline_seconds is not None and (now - latest).total_seconds() > deadline_seconds:
        return Due(None, min(older + 1, MAX_COUNTED_MISSES), latest, next_at)
    latest_missed = None
    if older:
        latest_missed = cron.latest_at_or_before(latest - timedelta(seconds=1))
    return Due(latest, older, latest_missed, next_at)


CONCURRENCY_POLICIES = ("Allow", "Forbid", "Replace")


@dataclass(frozen=True)
class Start:
    """Start a run: delete ``replace`` (unfinished snapshots) first."""

    replace: tuple[str, ...] = ()


@dataclass(frozen=True)
class Defer:
    """Forbid: the run waits for ``active`` to finish."""

    active: tuple[str, ...]


def concurrency(policy: str, active: Sequence[str]) -> Start | Defer:
    if not active or policy == "Allow":
        return Start()
    if policy == "Forbid":
        return Defer(tuple(active))
    return Start(tuple(active))


# ----------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class Retention:
    """How many to keep: the last N, and one per hour/day/ISO week/month/year for the newest N
    such periods (restic's ``--keep-last/-hourly/-daily/-weekly/-monthly/-yearly``)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))


RETENTION_FIELDS = {"keepLast": "last", "keepHourly": "hourly", "keepDaily": "daily",
                    "keepWeekly": "weekly", "keepMonthly": "monthly", "keepYearly": "yearly"}


def parse_retention(spec: Any) -> Retention:
    if spec is None:
        return Retention(last=7)
    if not isinstance(spec, dict):
        raise SpecError("retention must be an object")
    values: dict[str, int] = {}
    for key, attr in RETENTION_FIELDS.items():
        v = spec.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 100_000:
            raise SpecError(f"retention.{key} must be an integer from 0 to 100000")
        values[attr] = v
    return Retention(**values)


@dataclass(frozen=True)
class Kept:
    name: str
    at: datetime


_Bucket = Callable[[datetime], tuple[int, ...]]


def _buckets(tz: tzinfo) -> dict[str, _Bucket]:
    def local(t: datetime) -> datetime:
        return t.astimezone(tz)

    return {
        "hourly": lambda t: (local(t).year, local(t).month, local(t).day, local(t).hour),
        "daily": lambda t: (local(t).year, local(t).month, local(t).day),
        "weekly": lambda t: tuple(local(t).isocalendar()[:2]),
        "monthly": lambda t: (local(t).year, local(t).month),
        "yearly": lambda t: (local(t).year,),
    }


def retain(snaps: Sequence[Kept], r: Retention, tz: tzinfo = UTC) -> dict[str, list[str]]:
    """Which snapshots to keep, with why (``{name: ["last", "daily", ...]}``); the rest go.

    Newest first, each rule keeps a snapshot when it is the newest of a period the rule has not
    kept yet, until its count is used up. As in restic, when a time rule still has counts left at
    the oldest snapshot, that one is kept too (so a young schedule keeps its whole history).
    An empty policy keeps everything. Periods are taken in ``tz``, the schedule's time zone."""
    ordered = sorted(snaps, key=lambda k: (k.at, k.name), reverse=True)
    if r.empty():
        return {k.name: ["all"] for k in ordered}
    left = {"last": r.last, "hourly": r.hourly, "daily": r.daily, "weekly": r.weekly,
            "monthly": r.monthly, "yearly": r.yearly}
    previous: dict[str, tuple[int, ...] | None] = dict.fromkeys(left)
    buckets = _buckets(tz)
    kept: dict[str, list[str]] = {}
    for i, snap in enumerate(ordered):
        oldest = i == len(ordered) - 1
        why: list[str] = []
        for rule, count in left.items():
            if count <= 0:
                continue
            if rule == "last":
                why.append("last")
                left[rule] -= 1
                continue
            val = buckets[rule](snap.at)
            if val != previous[rule] or oldest:
                why.append(rule if val != previous[rule] else f"oldest ({rule})")
                previous[rule] = val
                left[rule] -= 1
        if why:
            kept[snap.name] = why
    return kept


# ----------------------------------------------------------------------------- one tick


@dataclass(frozen=True)
class Owned:
    """A Snapshot object the schedule owns."""

    name: str
    phase: str  # Pending, Shipping, Ready, Failed
    scheduled_at: datetime
    deleting: bool = False


@dataclass(frozen=True)
class Plan:
    due: Due | None
    """None while suspended."""
    action: Start | Defer | None
    """What to do about ``due.run_at`` (None when nothing is due)."""
    prune: tuple[str, ...]
    """Snapshots retention (or the failed-history limit) lets go, oldest first."""
    kept: dict[str, list[str]]
    active: tuple[str, ...]
    last_successful: Owned | None


def plan(cron: Cron, retention: Retention, policy: str, suspended: bool, deadline_seconds: int | None,
         failed_history: int, since: datetime, owned: Sequence[Owned], now: datetime) -> Plan:
    """One reconcile of a schedule: what to start, what to delete, what to report."""
    live = [o for o in owned if not o.deleting]
    active = tuple(o.name for o in sorted(live, key=lambda o: o.scheduled_at) if o.phase not in ("Ready", "Failed"))
    ready = [o for o in live if o.phase == "Ready"]
    failed = sorted((o for o in live if o.phase == "Failed"), key=lambda o: (o.scheduled_at, o.name), reverse=True)
    kept = retain([Kept(o.name, o.scheduled_at) for o in ready], retention, cron.tz)
    gone = [o for o in ready if o.name not in kept] + failed[failed_history:]
    prune = tuple(o.name for o in sorted(gone, key=lambda o: (o.scheduled_at, o.name)))
    last_ok = max(ready, key=lambda o: (o.scheduled_at, o.name), default=None)
    if suspended:
        return Plan(None, None, prune, kept, active, last_ok)
    d = due(cron, since, now, deadline_seconds)
    action: Start | Defer | None = None
    if d.run_at is not None:
        if any(o.scheduled_at == d.run_at for o in owned):
            action = Start()  # its Snapshot exists already (the status write was lost): just record it
        else:
            action = concurrency(policy, active)
    return Plan(d, action, prune, kept, active, last_ok)


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ScheduleSpec:
    cron: Cron
    retention: Retention
    suspend: bool
    starting_deadline_seconds: int | None
    concurrency_policy: str
    failed_history_limit: int
    snapshot_spec: dict[str, Any]
    """The spec of each Snapshot it creates (validated like a Snapshot's own)."""
    snapshot_labels: dict[str, str]


def _int(spec: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = spec.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SpecError(f"{key} must be an integer from {lo} to {hi}")
    return v


def parse_schedule(spec: dict[str, Any], namespace: str, default_cluster: str = "kubegfs",
                   default_namespace: str = "") -> ScheduleSpec:
    cron = parse_cron(spec.get("schedule"), spec.get("timeZone"))
    suspend = spec.get("suspend", False)
    if not isinstance(suspend, bool):
        raise SpecError("suspend must be true or false")
    policy = spec.get("concurrencyPolicy", "Forbid")
    if policy not in CONCURRENCY_POLICIES:
        raise SpecError(f"concurrencyPolicy must be one of {', '.join(CONCURRENCY_POLICIES)}")
    tmpl = spec.get("snapshotTemplate") or {}
    if not isinstance(tmpl, dict):
        raise SpecError("snapshotTemplate must be an object")
    snap_spec: dict[str, Any] = {"path": spec.get("path")}
    for key in ("copies", "deletionPolicy"):
        if key in tmpl:
            snap_spec[key] = tmpl[key]
    if "cluster" in spec:
        snap_spec["cluster"] = spec["cluster"]
    parse_snapshot(snap_spec, namespace, default_cluster, default_namespace)
    labels = tmpl.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise SpecError("snapshotTemplate.labels must be a map of strings")
    return ScheduleSpec(
        cron=cron,
        retention=parse_retention(spec.get("retention")),
        suspend=suspend,
        starting_deadline_seconds=_int(spec, "startingDeadlineSeconds", None, 1, 365 * 86400),
        concurrency_policy=policy,
        failed_history_limit=_int(spec, "failedSnapshotsHistoryLimit", 1, 0, 1000) or 0,
        snapshot_spec=snap_spec,
        snapshot_labels=dict(labels),
    )
