"""The chart's scrape objects and alert rules as rendered: every pod of the release is scraped
exactly once (a ServiceMonitor over the master's two Services counted every master series twice),
and every alert carries its runbook and the release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "helm" / "kubegfs"
FULL = str(HERE / "values-full.yaml")

WORKLOADS = ("Deployment", "StatefulSet")


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for e in selector.get("matchExpressions") or []:
        assert e["operator"] == "In"
        ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def pods(objs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, str], set[str]]]:
    """component -> (pod labels, container port names)"""
    out = {}
    for o in objs:
        if o["kind"] in WORKLOADS:
            t = o["spec"]["template"]
            names = {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
            out[t["metadata"]["labels"]["app.kubernetes.io/component"]] = (t["metadata"]["labels"], names)
    return out


def scrapes_per_pod(objs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """monitor kind -> component -> how many scrape targets Prometheus gets for one of its pods."""
    out: dict[str, dict[str, int]] = {}
    workloads = pods(objs)
    for mon in (o for o in objs if o["apiVersion"] == "monitoring.coreos.com/v1"):
        spec, counts = mon["spec"], {}
        for comp, (labels, ports) in workloads.items():
            n = 0
            if mon["kind"] == "PodMonitor" and matches(spec["selector"], labels):
                n = sum(1 for e in spec["podMetricsEndpoints"] if e["port"] in ports)
            if mon["kind"] == "ServiceMonitor":
                wanted = {e["port"] for e in spec["endpoints"]}
                for svc in (o for o in objs if o["kind"] == "Service"):
                    if not matches(spec["selector"], svc["metadata"]["labels"]):
                        continue
                    if not all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()):
                        continue
                    n += sum(1 for p in svc["spec"]["ports"] if p["name"] in wanted and p["targetPort"] in ports)
            counts[comp] = n
        if mon["kind"] != "PrometheusRule":
            out[mon["kind"]] = counts
    return out


def test_each_pod_is_scraped_once(render):
    objs = render("-f", FULL, namespace="store")
    assert scrapes_per_pod(objs) == {
        "ServiceMonitor": {"operator": 1, "master": 1, "chunkserver": 1},
        "PodMonitor": {"operator": 1, "master": 1, "chunkserver": 1},
    }


def test_rules_carry_release_runbook_and_namespace(render):
    objs = render("-f", FULL, "--set", "prometheusRule.runbookBaseURL=https://wiki.example.com/kubegfs/",
                  namespace="store", release="prod")
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    plain = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    n = 0
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            n += 1
            assert r["labels"]["release"] == "prod"
            assert r["annotations"]["runbook_url"] == f"https://wiki.example.com/kubegfs#{r['alert'].lower()}"
    assert n == sum(len(g["rules"]) for g in plain["groups"])
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["KubegfsMasterDown"] == 'absent(kubegfs_build_info{namespace="store",component="master"})'
