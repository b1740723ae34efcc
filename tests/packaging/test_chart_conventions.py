"""Chart conventions users ask for: PodDisruptionBudgets, the escape hatches of the values schema
(priorityClassName, extra pod labels, volumes and mounts, image digests) and kubeVersion."""

from __future__ import annotations

from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "kubegfs"
DIGEST = "sha256:" + "ab" * 32


def by(objs, kind, component):
    return [o for o in objs if o["kind"] == kind and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]


def test_pod_disruption_budgets(render):
    objs = render()
    (cs,) = by(objs, "PodDisruptionBudget", "chunkserver")
    (m,) = by(objs, "PodDisruptionBudget", "master")
    assert cs["spec"]["maxUnavailable"] == 1 and m["spec"]["maxUnavailable"] == 0
    for pdb, comp in ((cs, "chunkserver"), (m, "master")):
        (sts,) = by(objs, "StatefulSet", comp)
        assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    objs = render("--set", "master.podDisruptionBudget.enabled=false", "--set", "chunkservers.podDisruptionBudget.maxUnavailable=2")
    assert not by(objs, "PodDisruptionBudget", "master")
    assert by(objs, "PodDisruptionBudget", "chunkserver")[0]["spec"]["maxUnavailable"] == 2


def test_escape_hatches(render):
    sets = []
    for comp in ("operator", "master", "chunkservers"):
        sets += ["--set", f"{comp}.priorityClassName=storage-critical", "--set", f"{comp}.podLabels.team=storage",
                 "--set", f"{comp}.image.digest={DIGEST}",
                 "--set", f"{comp}.extraVolumes[0].name=extra", "--set", f"{comp}.extraVolumes[0].emptyDir.medium=Memory",
                 "--set", f"{comp}.extraVolumeMounts[0].name=extra", "--set", f"{comp}.extraVolumeMounts[0].mountPath=/extra"]
    objs = render(*sets)
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 3
    for w in workloads:
        t = w["spec"]["template"]
        assert t["spec"]["priorityClassName"] == "storage-critical"
        assert t["metadata"]["labels"]["team"] == "storage"
        assert "team" not in w["spec"]["selector"]["matchLabels"]  # never in the immutable selector
        c = t["spec"]["containers"][0]
        assert c["image"].endswith("@" + DIGEST), c["image"]
        assert {"name": "extra", "mountPath": "/extra"} in c["volumeMounts"]
        assert {"name": "extra", "emptyDir": {"medium": "Memory"}} in t["spec"]["volumes"]


def test_schema_refuses_a_bad_digest_and_chart_states_kube_version(helm_cmd):
    r = helm_cmd("template", "kubegfs", str(CHART), "--set", "master.image.digest=latest", check=False)
    assert r.returncode != 0 and "/master/image/digest" in r.stderr
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == ">=1.27.0-0"
