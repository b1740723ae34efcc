"""Benchmark results: one :class:`Row` per measured case, formatting, the machine it ran on,
the table (rich and Markdown), ``results.json`` and the plots."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Row:
    """One line of the table: a metric measured ``len(samples)`` times."""

    bench: str
    case: str
    unit: str  # s, files/s, B/file, ops/s, MB/s, x, MiB
    samples: list[float]
    target: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def lo(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def hi(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=self.lo, max=self.hi)
        return d


def at_most(row: Row, limit: float, label: str) -> Row:
    row.target = label
    row.met = row.median <= limit
    return row


def at_least(row: Row, limit: float, label: str) -> Row:
    row.target = label
    row.met = row.median >= limit
    return row


def fmt(v: float, unit: str) -> str:
    if v != v:  # NaN
        return "—"
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.1f} µs"
        if v < 1:
            return f"{v * 1e3:.1f} ms"
        return f"{v:.2f} s"
    if unit == "x":
        return f"{v:,.0f}×" if v >= 10 else f"{v:.2f}×"
    if unit in ("files/s", "ops/s"):
        return f"{v / 1e6:.2f} M/s" if v >= 1e6 else f"{v:,.0f}/s"
    if unit == "MB/s":
        return f"{v:,.0f} MB/s"
    if unit == "B/file":
        return f"{v:.1f} B/file"
    if unit == "MiB":
        return f"{v:,.1f} MiB"
    return f"{v:.3g} {unit}"


def human_n(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def human_mib(b: int) -> str:
    return f"{b // GiB} GiB" if b >= GiB and b % GiB == 0 else f"{b // MiB} MiB"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        import psutil

        ram = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        pass
    commit = ""
    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram,
        "ram_gib": round(ram / GiB, 1), "python": platform.python_version(),
        "platform": platform.platform(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
    }


def render_table(rows: list[Row], machine: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"kubegfs benchmarks — {machine['cpu']}, {machine['cores']} cores, "
                    f"{machine['ram_gib']} GiB, Python {machine['python']}")
    for col in ("benchmark", "case"):
        t.add_column(col)
    for col in ("median", "min–max", "runs"):
        t.add_column(col, justify="right")
    t.add_column("target")
    t.add_column("met", justify="center")
    for r in rows:
        met = "" if r.met is None else ("[green]✓[/]" if r.met else "[red]✗[/]")
        t.add_row(r.bench, r.case, fmt(r.median, r.unit), f"{fmt(r.lo, r.unit)} – {fmt(r.hi, r.unit)}",
                  str(len(r.samples)), r.target, met)
    return t


def markdown_table(rows: list[Row]) -> str:
    out = ["| benchmark | case | median | min–max | runs | target | met |",
           "|---|---|---:|---:|---:|---|:---:|"]
    for r in rows:
        met = "" if r.met is None else ("✓" if r.met else "✗")
        out.append(f"| {r.bench} | {r.case} | {fmt(r.median, r.unit)} | {fmt(r.lo, r.unit)} – "
                   f"{fmt(r.hi, r.unit)} | {len(r.samples)} | {r.target} | {met} |")
    return "\n".join(out)


def write_results(rows: list[Row], machine: dict[str, Any], out: Path, config: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / "results.json"
    p.write_text(json.dumps({"machine": machine, "config": config, "rows": [r.to_json() for r in rows]},
                            indent=1, default=str))
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    return p


def plot(rows: list[Row], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    series: dict[str, tuple[str, list[Row]]] = {
        "kubegfs capture pause": ("capture pause", []),
        "seed deepcopy+pickle": ("seed capture", []),
        "end-to-end first snapshot": ("end-to-end first snapshot", []),
        "restore to a new path": ("restore to a new path", []),
        "restore in place": ("restore in place", []),
    }
    for r in rows:
        for _label, (prefix, lst) in series.items():
            if r.case.startswith(prefix) and "files" in r.extra:
                lst.append(r)
    if any(lst for _p, lst in series.values()):
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, (_p, lst) in series.items():
            if not lst:
                continue
            xs = [r.extra["files"] for r in lst]
            if lst[0].unit == "files/s":  # end-to-end: plot seconds
                meds = [statistics.median(r.extra["seconds"]) for r in lst]
                los = [min(r.extra["seconds"]) for r in lst]
                his = [max(r.extra["seconds"]) for r in lst]
            else:
                meds, los, his = [r.median for r in lst], [r.lo for r in lst], [r.hi for r in lst]
            ax.errorbar(xs, meds, yerr=[[m - lo for m, lo in zip(meds, los, strict=True)],
                                        [h - m for m, h in zip(meds, his, strict=True)]],
                        marker="o", capsize=3, label=label)
        ax.axhline(0.010, color="grey", ls=":", lw=1)
        ax.text(0.01, 0.011, "10 ms capture target", color="grey", fontsize=8,
                transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("files in the snapshotted directory")
        ax.set_ylabel("seconds (median, min–max bars)")
        ax.set_title("kubegfs snapshot: capture, end-to-end, restore vs the seed")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "snapshot_scaling.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    tp = [r for r in rows if r.bench == "throughput"]
    dp = [r for r in rows if r.bench == "datapath"]
    if tp or dp:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        for ax, group, ylabel in ((axes[0], tp, "ops/s"), (axes[1], dp, "MB/s")):
            if not group:
                ax.set_visible(False)
                continue
            labels = [r.case.replace(" client threads", " thr").replace(" (100-entry dir)", "") for r in group]
            meds = [r.median for r in group]
            err = [[m - r.lo for m, r in zip(meds, group, strict=True)],
                   [r.hi - m for m, r in zip(meds, group, strict=True)]]
            colors = ["tab:grey" if r.case.startswith("ceiling") else
                      ("tab:green" if r.met else "tab:red") for r in group]
            ax.bar(range(len(group)), meds, yerr=err, capsize=3, color=colors)
            for i, r in enumerate(group):
                lim = _target_value(r)
                if lim is not None:
                    ax.hlines(lim, i - 0.4, i + 0.4, colors="black", linestyles="--")
            ax.set_xticks(range(len(group)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].set_title("metadata throughput (dashed: target)")
        axes[1].set_title("data path vs ceilings (grey) (dashed: target)")
        fig.tight_layout()
        p = out / "throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def _target_value(r: Row) -> float | None:
    t = r.target.replace(",", "")
    for tok in reversed(t.replace("=", " ").split()):
        try:
            return float(tok.rstrip("/s"))
        except ValueError:
            continue
    return None
