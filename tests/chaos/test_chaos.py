"""A small seeded chaos run in CI (the big one: make chaos TRIALS=200)."""

import os
import random

import pytest

from kubegfs_dev.chaos import Trial

SEEDS = [int(os.environ.get("KUBEGFS_CHAOS_SEED", random.randrange(1 << 30))) + i for i in range(2)]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_ops_and_faults_match_the_witness(seed, tmp_path):
    st = Trial(seed, 30, tmp_path / "chaos").run()
    assert not st.failures, f"replay with: python -m kubegfs_dev.chaos --trials 1 --seed {seed}: {st.failures}"
    assert st.lost == 0
    assert st.corruptions_detected == st.corruptions_injected
    assert st.steps + sum(st.faults.values()) >= 25  # the trial ran (a seed may draw many faults)


def test_losing_the_master_volume_mid_run_matches_the_witness(tmp_path):
    t = Trial(int(os.environ.get("KUBEGFS_CHAOS_SEED", random.randrange(1 << 30))), 0, tmp_path / "chaos")
    try:
        t.cl.start()
        for _ in range(15):
            t.op()
        t.master_volume_loss()
        t.verify(full=True)
        for _ in range(5):
            t.op()
        t.verify(full=True)
        for name in sorted(t.m.snaps):
            t.verify_snapshot(name)
    finally:
        t.cl.stop()
    assert t.st.recovery_seconds, "the fault did not run"
