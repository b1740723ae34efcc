"""In-process benchmarks on a master state: the snapshot capture pause (``capture``) and the
seed's deepcopy + pickle of the same trees (``seed``)."""

from __future__ import annotations

import copy
import gc
import pickle
import statistics
import time

from kubegfs.master.ops import SnapCapture
from kubegfs.master.state import now_ns

from .report import Row, at_least, at_most, human_n
from .trees import Tree, seed_metadata, state_with


def bench_capture(trees: dict[int, Tree], repeats: int = 201) -> list[Row]:
    """Time MasterState.apply of a snap_capture op on a state holding all the trees."""
    st = state_with(trees)
    rows = []
    times: dict[int, list[float]] = {}
    for n in trees:
        samples = []
        for r in range(repeats):
            op = SnapCapture(op="snap_capture", id=f"c-{n}-{r}", name=f"c-{n}-{r}", path=f"/t{n}",
                             created=now_ns(), copies=2, seq=st.seq + 1)
            t0 = time.perf_counter_ns()
            st.apply(op)
            samples.append((time.perf_counter_ns() - t0) / 1e9)
        st.pins.clear()
        times[n] = samples
        rows.append(at_most(Row("capture", f"capture pause, {human_n(n)} files", "s", samples,
                                extra={"files": n}), 0.010, "≤ 10 ms"))
    if len(times) >= 2:
        small, big = min(times), max(times)
        ratio = statistics.median(times[big]) / statistics.median(times[small])
        rows.append(at_most(Row("capture", f"t({human_n(big)}) / t({human_n(small)})", "x", [ratio],
                                extra={"small": small, "big": big}), 2.0, "≤ 2×"))
    return rows


def bench_seed(trees: dict[int, Tree], capture_rows: list[Row], repeats: dict[int, int]) -> list[Row]:
    """The seed's capture: deepcopy the metadata subtree, then pickle it (in process only)."""
    version: dict[int, int] = {}
    rows = []
    cap = {r.extra.get("files"): r.median for r in capture_rows if "files" in r.extra}
    for n, t in trees.items():
        meta = {"/": seed_metadata(t.root, version)}
        samples = []
        size = 0
        for _ in range(repeats.get(n, 3)):
            gc.collect()
            t0 = time.perf_counter()
            snap = copy.deepcopy(meta["/"])
            # the seed pickled its deep copy: this is the baseline being measured, not a use of
            # pickle by kubegfs (the only pickle call in the repository)
            blob = pickle.dumps(snap)  # noqa: S301
            samples.append(time.perf_counter() - t0)
            size = len(blob)
            del snap, blob
        del meta
        rows.append(Row("seed", f"seed capture (deepcopy+pickle), {human_n(n)} files", "s", samples,
                        extra={"files": n, "pickle_bytes": size}))
        rows.append(Row("seed", f"seed bytes per file, {human_n(n)} files", "B/file", [size / n],
                        extra={"files": n}))
        if n in cap and cap[n] > 0:
            ratios = [s / cap[n] for s in samples]
            rows.append(at_least(Row("seed", f"seed / kubegfs capture, {human_n(n)} files", "x", ratios,
                                     extra={"files": n}), 100, "≥ 100×"))
    return rows
