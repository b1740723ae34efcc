"""Metric names: one meaning per name across every process kind, and a build_info in each."""

from kubegfs import __version__
from kubegfs import metrics as M


def families(registry):
    return {m.name: m for m in registry.collect()}


def test_a_name_means_the_same_in_every_registry():
    seen = {}
    for kind, reg in (("master", M.MASTER), ("chunkserver", M.CHUNKSERVER), ("operator", M.OPERATOR)):
        for name, fam in families(reg).items():
            key = (fam.type, fam.documentation)
            if name in seen:
                assert seen[name][1] == key, f"{name}: {seen[name][0]} and {kind} give it different meanings"
            seen[name] = (kind, key)


def test_build_info_in_every_registry():
    for kind, reg in (("master", M.MASTER), ("chunkserver", M.CHUNKSERVER), ("operator", M.OPERATOR)):
        (sample,) = families(reg)["kubegfs_build_info"].samples
        assert sample.name == "kubegfs_build_info" and sample.value == 1
        assert sample.labels["component"] == kind and sample.labels["version"] == __version__
