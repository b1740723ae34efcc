"""The Helm chart (helm/kubegfs): lint, render, server-side dry run, a real install/upgrade on the
local control plane, Pod Security "restricted", least RBAC, the values schema, and the copies the
chart keeps of files outside itself (CRDs, operator RBAC) and of its monitoring files."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHART = REPO / "helm" / "kubegfs"


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


FULL = str(HERE / "values-full.yaml")
RBAC = yaml.safe_load((REPO / "operator" / "rbac.yaml").read_text())
COMPONENT = "app.kubernetes.io/component"


def by_kind(objs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind
            and (component is None or o["metadata"]["labels"].get(COMPONENT) == component)]


def one(objs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = by_kind(objs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out[f"{o['kind']}/{o['metadata']['name']}"] = o["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            out[f"Pod/{o['metadata']['name']}"] = o["spec"]
    return out


def pss_restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The Pod Security Standards "restricted" checks (plus our read-only root filesystem)."""
    bad = []
    psc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad.append(flag)
    allowed_vols = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                    "projected", "secret"}
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= allowed_vols:
            bad.append(f"volume {v['name']}: {kinds}")
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            bad.append(f"{name}: capabilities.drop must be [ALL]")
        if set(sc.get("capabilities", {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities.add")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if not isinstance(uid, int) or uid == 0:
            bad.append(f"{name}: runAsUser must be a numeric non-root uid")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: readOnlyRootFilesystem")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        tmp = mounts.get("/tmp")
        if not tmp or "emptyDir" not in next(v for v in spec["volumes"] if v["name"] == tmp):
            bad.append(f"{name}: no emptyDir at /tmp")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                bad.append(f"{name}: hostPort")
    return bad


def rbac_wildcards(objs: list[dict[str, Any]]) -> list[str]:
    bad = []
    for o in objs:
        if o["kind"] in ("ClusterRole", "Role"):
            for r in o.get("rules") or []:
                for key in ("verbs", "resources", "apiGroups", "nonResourceURLs"):
                    if any("*" in x for x in r.get(key) or []):
                        bad.append(f"{o['metadata']['name']}: {key}={r[key]}")
    return bad


# ------------------------------------------------------------------ copies kept by the chart


def test_chart_crds_are_byte_identical_to_top_level_crds():
    top = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert top and chart == top, "helm/kubegfs/crds/ must hold exactly crds/*.yaml: run hack/sync-crds.sh"
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"helm/kubegfs/crds/{name} differs from crds/{name}: run hack/sync-crds.sh")


def test_chart_operator_rbac_copy_is_identical():
    assert (CHART / "files" / "operator-rbac.yaml").read_bytes() == (REPO / "operator" / "rbac.yaml").read_bytes(), (
        "helm/kubegfs/files/operator-rbac.yaml differs from operator/rbac.yaml: run hack/sync-crds.sh")


def test_dashboard_json_is_generated():
    r = subprocess.run([sys.executable, str(CHART / "hack" / "gen-dashboard.py"), "--check"], check=False)
    assert r.returncode == 0, "files/dashboard.json is stale: run python3 helm/kubegfs/hack/gen-dashboard.py"


# ------------------------------------------------------------------ lint and render


def test_helm_lint(helm_cmd):
    for extra in ([], ["-f", FULL]):
        r = helm_cmd("lint", "--strict", str(CHART), *extra)
        assert "0 chart(s) failed" in r.stdout, r.stdout


@pytest.mark.parametrize("values", ["default", "full"])
def test_render(render, values):
    full = values == "full"
    objs = render(*(["-f", FULL] if full else []), namespace="store", release="kubegfs")
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "StatefulSet", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "NetworkPolicy", "ConfigMap", "Pod"} <= kinds
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubegfs" and labels["app.kubernetes.io/instance"] == "kubegfs"
        assert labels["app.kubernetes.io/managed-by"] == "Helm" and COMPONENT in labels
        assert labels["helm.sh/chart"] == "kubegfs-0.1.0"

    secret_name = "kubegfs-shared-token" if full else "kubegfs-token"
    secret_key = "shared-token" if full else "token"
    secrets = [s for s in by_kind(objs, "Secret") if s["type"] != "kubernetes.io/tls"]  # TLS: test_chart_security
    if full:
        assert secrets == []  # existingSecret: nothing generated
    else:
        assert [s["metadata"]["name"] for s in secrets] == [secret_name]
        assert len(base64.b64decode(secrets[0]["data"]["token"])) == 48
    reg = "registry.example.com/storage/" if full else ""

    # operator
    dep = one(objs, "Deployment", "operator")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == f"{reg}kubegfs/operator:0.1.0"
    assert c["args"][:2] == ["--liveness", "http://0.0.0.0:8080/healthz"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9090, "healthz": 8080}
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBEGFS_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": secret_key}
    assert env["KUBEGFS_CLUSTER"]["value"] == "kubegfs" and env["KUBEGFS_CLUSTER_NAMESPACE"]["value"] == "store"
    assert env["KUBEGFS_OPERATOR_METRICS"]["value"] == "0.0.0.0:9090"
    assert env["KUBEGFS_MASTER_PORT"]["value"] == "9400" and env["KUBEGFS_CHUNKSERVER_PORT"]["value"] == "9500"
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount", "operator")["metadata"]["name"]
    if full:
        assert c["args"][-4:] == ["--namespace", "apps", "--namespace", "backups"]
        assert c["resources"]["limits"] == {"cpu": "500m", "memory": "192Mi"}
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"} and pod["imagePullSecrets"] == [{"name": "regcred"}]
    op_role = one(objs, "ClusterRole", "operator")
    assert op_role["rules"] == RBAC["rules"], "the chart's operator ClusterRole must equal operator/rbac.yaml"
    op_binding = one(objs, "ClusterRoleBinding", "operator")
    assert op_binding["roleRef"]["name"] == op_role["metadata"]["name"]
    assert op_binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "store"}]

    # master and chunkservers
    sts = {s["metadata"]["labels"][COMPONENT]: s for s in by_kind(objs, "StatefulSet")}
    assert set(sts) == {"master", "chunkserver"}
    assert sts["master"]["spec"]["replicas"] == 1
    assert sts["chunkserver"]["spec"]["replicas"] == (5 if full else 3)
    for comp, port in (("master", 9400), ("chunkserver", 9500)):
        s = sts[comp]
        tpl = s["spec"]["template"]
        assert tpl["metadata"]["labels"][COMPONENT] == comp  # how the operator finds the pods
        vct = s["spec"]["volumeClaimTemplates"][0]
        assert vct["metadata"]["name"] == "data"
        c = tpl["spec"]["containers"][0]
        assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
        assert c["ports"][0] == {"name": "http", "containerPort": port, "protocol": "TCP"}
        assert [p["name"] for p in c["ports"]] == (["http", "fast"] if comp == "master" else ["http"])
        assert c["image"] == f"{reg}kubegfs/{comp}:{'0.1.0-rc1' if full and comp == 'master' else '0.1.0'}"
        assert c["command"] == ["kubegfs"] and c["args"][0] == comp
        assert f"--listen=0.0.0.0:{port}" in c["args"] and "--token-file=/etc/kubegfs/token" in c["args"]
        assert "--node=$(NODE_NAME)" in c["args"] and "--topology-from-node" in c["args"]
        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}  # TLS by default
        assert c["readinessProbe"]["httpGet"]["port"] == "http"
        tok = next(v for v in tpl["spec"]["volumes"] if v["name"] == "token")
        assert tok["secret"]["secretName"] == secret_name and tok["secret"]["items"][0]["key"] == secret_key
        sa = one(objs, "ServiceAccount", comp)
        assert tpl["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    cs = sts["chunkserver"]["spec"]["template"]["spec"]
    cargs = cs["containers"][0]["args"]
    assert "--advertise=https://$(POD_IP):9500" in cargs
    assert "--master=https://kubegfs-master.store.svc:9400" in cargs
    tsc = cs["topologySpreadConstraints"]
    assert tsc[0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert tsc[0]["labelSelector"]["matchLabels"][COMPONENT] == "chunkserver"
    margs = sts["master"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--chunk-size={'16Mi' if full else '64Mi'}" in margs
    assert f"--chunk-size={'16Mi' if full else '64Mi'}" in cargs  # the chunkservers use the master's
    assert f"--replication={2 if full else 3}" in margs
    assert "--metadata-replication=sync" in margs and "--metadata-copies=2" in margs  # issue #16: sync by default
    if full:
        assert sts["master"]["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
        assert sts["chunkserver"]["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "100Gi"
        assert "--checkpoint-ops=50000" in margs and tsc[0]["whenUnsatisfiable"] == "DoNotSchedule"
        assert cs["affinity"]["nodeAffinity"] and cs["containers"][0]["resources"]["limits"]["cpu"] == "4"
        assert sts["master"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9400"

    # the node reader: get on nodes, nothing else, for the master and chunkserver accounts
    reader = one(objs, "ClusterRole", "node-reader")
    assert reader["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    rb = one(objs, "ClusterRoleBinding", "node-reader")
    assert {s["name"] for s in rb["subjects"]} == {"kubegfs-master", "kubegfs-chunkserver"}

    # services
    svc = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    assert svc["kubegfs-master"]["spec"]["type"] == "ClusterIP"
    assert svc["kubegfs-master"]["spec"]["ports"][0]["name"] == "http"
    assert svc["kubegfs-chunkserver"]["spec"]["clusterIP"] == "None"
    assert svc["kubegfs-operator"]["spec"]["ports"][0]["name"] == "metrics"

    # security: every pod restricted, no wildcard RBAC
    specs = pod_specs(objs)
    assert len(specs) == 5, specs.keys()  # operator, master, chunkserver, helm test pod, CRD upgrade Job
    for name, spec in specs.items():
        assert pss_restricted_violations(spec) == [], name
        assert spec["securityContext"]["runAsUser"] == 10001
    assert rbac_wildcards(objs) == []

    # network policies: a default deny for the release's pods and one per component
    nps = {n["metadata"]["labels"][COMPONENT]: n for n in by_kind(objs, "NetworkPolicy")}
    assert set(nps) == {"network", "operator", "master", "chunkserver", "test", "crds"}
    deny = nps["network"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kubegfs",
                                                  "app.kubernetes.io/instance": "kubegfs"}

    def ports_from(np, direction):
        out = []
        for rule in np["spec"].get(direction) or []:
            peers = rule.get("from" if direction == "ingress" else "to") or [{"any": True}]
            for p in rule["ports"]:
                for peer in peers:
                    comp = (peer.get("podSelector") or {}).get("matchLabels", {}).get(COMPONENT)
                    out.append((comp or ("ipBlock" if "ipBlock" in peer else "other"), p["port"]))
        return set(out)

    assert ports_from(nps["master"], "ingress") >= {("chunkserver", 9400), ("operator", 9400), ("test", 9400)}
    assert {p for _, p in ports_from(nps["master"], "ingress")} == {9400, 9401}  # API, lean stat/ls listener
    assert ports_from(nps["chunkserver"], "ingress") >= {("master", 9500), ("chunkserver", 9500), ("operator", 9500)}
    assert {p for _, p in ports_from(nps["chunkserver"], "ingress")} == {9500}
    assert ports_from(nps["chunkserver"], "egress") >= {("master", 9400), ("chunkserver", 9500), ("other", 53)}
    assert ports_from(nps["operator"], "egress") >= {("master", 9400), ("master", 9401), ("chunkserver", 9500),
                                                     ("other", 53)}
    assert {p for _, p in ports_from(nps["operator"], "ingress")} == {9090}
    api = 443
    for comp in ("operator", "master", "chunkserver"):
        assert any(p == api for _, p in ports_from(nps[comp], "egress")), comp
    if full:
        blocks = [r for r in nps["operator"]["spec"]["egress"] if any("ipBlock" in t for t in r.get("to", []))]
        assert [t["ipBlock"]["cidr"] for t in blocks[0]["to"]] == ["10.96.0.1/32", "192.168.0.0/24"]

    # monitoring
    cm = one(objs, "ConfigMap", "monitoring")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kubegfs.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())
    mon = {o["kind"]: o for o in objs if o["apiVersion"] == "monitoring.coreos.com/v1"}
    if not full:
        assert mon == {}
        return
    assert set(mon) == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    for kind, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        m = mon[kind]
        assert m["metadata"]["labels"]["release"] == "prom"
        assert m["spec"]["namespaceSelector"] == {"matchNames": ["store"]}
        eps = m["spec"][key]
        assert {e["port"] for e in eps} == {"metrics", "http"}
        for e in eps:
            assert e["path"] == "/metrics" and e["interval"] == "15s" and e["honorLabels"] is True
            assert e["authorization"] == {"type": "Bearer",
                                          "credentials": {"name": secret_name, "key": secret_key}}
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    rule = mon["PrometheusRule"]["spec"]
    assert [g["name"] for g in rule["groups"]] == [g["name"] for g in alerts["groups"]]
    exprs = {r["alert"]: r["expr"] for g in rule["groups"] for r in g["rules"]}
    orig = {r["alert"]: r["expr"] for g in alerts["groups"] for r in g["rules"]}
    assert exprs["KubegfsNoRecentSnapshot"].endswith("> 6 * 3600")
    # the same expressions, but the threshold from values and build_info narrowed to the release
    scoped = {k: v.replace("kubegfs_build_info{", 'kubegfs_build_info{namespace="store",') for k, v in orig.items()}
    assert {k: v for k, v in exprs.items() if k != "KubegfsNoRecentSnapshot"} == {
        k: v for k, v in scoped.items() if k != "KubegfsNoRecentSnapshot"}


@pytest.mark.parametrize("args, message", [
    (["--set", "chunkservers.replicas=-1"], "at '/chunkservers/replicas': minimum: got -1, want 1"),
    (["--set", "chunkservers.replicas=0"], "at '/chunkservers/replicas': minimum: got 0, want 1"),
    (["--set", "filesystem.chunkSize=64XB"], "at '/filesystem/chunkSize': '64XB' does not match pattern"),
    (["--set", "filesystem.chunkSize=64"], None),
    (["--set", "filesystem.chunkSize=64Mi"], None),
    # a quantity means what Kubernetes says it means; MiB is not one (and M is 10^6, never 2^20)
    (["--set", "filesystem.chunkSize=64MiB"], "at '/filesystem/chunkSize': '64MiB' does not match pattern"),
    (["--set", "filesystem.replication=17"], "at '/filesystem/replication': maximum: got 17, want 16"),
    (["--set", "master.port=70000"], "at '/master/port': maximum: got 70,000, want 65,535"),
    (["--set", "master.fastPort=-1"], "at '/master/fastPort': minimum: got -1, want 0"),
    (["--set", "master.fastSpinMicroseconds=20000"], "at '/master/fastSpinMicroseconds': maximum: got 20,000, want 10,000"),
    (["--set", "chunkservers.dataPort=-1"], "at '/chunkservers/dataPort': minimum: got -1, want 0"),
    (["--set", "chunkservers.topologySpread.whenUnsatisfiable=Maybe"], "at '/chunkservers/topologySpread/whenUnsatisfiable'"),
    (["--set", "chunkservers.persistence.size=lots"], "at '/chunkservers/persistence/size'"),
    (["--set", "chunkservers.blockCache=lots"], "at '/chunkservers/blockCache'"),
    (["--set", "chunkservers.blockCache=-1"], "at '/chunkservers/blockCache'"),
    (["--set", "operator.logFormat=xml"], "at '/operator/logFormat'"),
    (["--set", "master.metadataReplication.mode=maybe"], "at '/master/metadataReplication/mode'"),
    (["--set", "chunkserver.replicas=3"], "additional properties 'chunkserver' not allowed"),
])
def test_values_schema_rejects_bad_values(helm_cmd, args, message):
    r = helm_cmd("template", "kubegfs", str(CHART), *args, check=False)
    if message is None:  # a valid value for contrast (a plain number of bytes)
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode != 0
    assert "values don't meet the specifications of the schema" in r.stderr and message in r.stderr, r.stderr


def test_master_fast_listener_port_is_wired_through_pod_services_and_policy(render, helm_cmd):
    """The lean stat/ls listener: an argument, a named container port, a port on both Services
    (clients reach it wherever they reach the master) and an allowed ingress port; 0 turns all off."""

    def fast_parts(objs):
        sts = one(objs, "StatefulSet", "master")
        c = sts["spec"]["template"]["spec"]["containers"][0]
        args = [a for a in c["args"] if a.startswith("--fast-")]
        ports = [p["containerPort"] for p in c["ports"] if p["name"] == "fast"]
        svc = sorted(p["port"] for s in by_kind(objs, "Service", "master") for p in s["spec"]["ports"]
                     if p["name"] == "fast")
        pol = [p["port"] for r in one(objs, "NetworkPolicy", "master")["spec"]["ingress"] for p in r["ports"]]
        return args, ports, svc, pol

    args, ports, svc, pol = fast_parts(render())
    assert args == ["--fast-listen=0.0.0.0:9401", "--fast-spin-us=100"] and ports == [9401] and svc == [9401, 9401] and 9401 in pol
    args, *_ = fast_parts(render("--set", "master.fastSpinMicroseconds=0"))
    assert args == ["--fast-listen=0.0.0.0:9401", "--fast-spin-us=0"]
    args, ports, svc, pol = fast_parts(render("--set", "master.fastPort=0"))
    assert args == [] and ports == [] and svc == [] and pol == [9400]
    r = helm_cmd("template", "kubegfs", str(CHART), "--set", "master.fastPort=9400", check=False)
    assert r.returncode != 0 and "master.fastPort must differ from master.port" in r.stderr


def test_chunkserver_data_port_is_wired_through_pod_and_policies(render, helm_cmd):
    """The data port for written pieces (plain TCP, so only without TLS): an argument, a named
    container port and an allowed port into and out of chunkservers (forwards); 0 or TLS turns it off."""

    def data_parts(objs):
        sts = one(objs, "StatefulSet", "chunkserver")
        c = sts["spec"]["template"]["spec"]["containers"][0]
        args = [a for a in c["args"] if a.startswith("--data-listen")]
        ports = [p["containerPort"] for p in c["ports"] if p["name"] == "data"]
        pol = one(objs, "NetworkPolicy", "chunkserver")["spec"]
        into = [p["port"] for r in pol["ingress"] for p in r["ports"]]
        out = [p.get("port") for r in pol["egress"] for p in r.get("ports", [])]
        return args, ports, into, out

    args, ports, into, out = data_parts(render("--set", "tls.enabled=false"))
    assert args == ["--data-listen=0.0.0.0:9501"] and ports == [9501] and 9501 in into and 9501 in out
    for off in (["--set", "tls.enabled=false", "--set", "chunkservers.dataPort=0"], []):  # the default has TLS
        args, ports, into, out = data_parts(render(*off))
        assert args == ["--data-listen=off"] and ports == [] and 9501 not in into and 9501 not in out
    r = helm_cmd("template", "kubegfs", str(CHART), "--set", "chunkservers.dataPort=9500", check=False)
    assert r.returncode != 0 and "chunkservers.dataPort must differ from chunkservers.port" in r.stderr


def test_chunkserver_block_cache_is_an_argument(render):
    """The memory for recent directory blocks (delta bases): a quantity or a number of bytes, 0 for none."""

    def arg(objs):
        c = one(objs, "StatefulSet", "chunkserver")["spec"]["template"]["spec"]["containers"][0]
        return [a for a in c["args"] if a.startswith("--block-cache")]

    assert arg(render()) == ["--block-cache=128Mi"]
    assert arg(render("--set", "chunkservers.blockCache=0")) == ["--block-cache=0"]
    assert arg(render("--set", "chunkservers.blockCache=268435456")) == ["--block-cache=268435456"]
    assert arg(render("--set", "chunkservers.blockCache=64Mi")) == ["--block-cache=64Mi"]


# ------------------------------------------------------------------ against the real control plane

# ServiceMonitor, PodMonitor and PrometheusRule CRDs are not part of a bare control plane: the
# dry run installs minimal (schema-less) CRDs for them so every rendered object goes through the
# API server; their content is checked by test_render above.
MONITORING_CRDS = [("servicemonitors", "ServiceMonitor"), ("podmonitors", "PodMonitor"),
                   ("prometheusrules", "PrometheusRule")]


def _monitoring_crds() -> str:
    out = []
    for plural, kind in MONITORING_CRDS:
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"plural": plural, "kind": kind, "singular": kind.lower(), "listKind": kind + "List"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
        })
    return yaml.safe_dump_all(out)


def _label_restricted(kubectl, ns):
    kubectl("label", "namespace", ns, "--overwrite", "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted", "pod-security.kubernetes.io/audit=restricted")


def test_finalizer_policy_only_where_the_api_is_served(render):
    """The MutatingAdmissionPolicy that puts the operator's finalizer on new Snapshots and
    SnapshotSchedules: rendered only when the cluster serves its API (helm asks discovery), adds
    exactly the operator's finalizer, and follows watchNamespaces and the switches."""
    from kubegfs_operator import FINALIZER

    api = ("--api-versions", "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy")
    assert by_kind(render(), "MutatingAdmissionPolicy") == []  # a cluster without the API
    objs = render(*api, namespace="team")
    pol, bind = one(objs, "MutatingAdmissionPolicy", "operator"), one(objs, "MutatingAdmissionPolicyBinding", "operator")
    assert bind["spec"]["policyName"] == pol["metadata"]["name"] and "matchResources" not in bind["spec"]
    rules = pol["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [{"apiGroups": ["kubegfs.io"], "apiVersions": ["v1alpha1"], "operations": ["CREATE"],
                      "resources": ["snapshots", "snapshotschedules"]}]  # a Restore needs none
    [mutation] = pol["spec"]["mutations"]
    assert mutation["jsonPatch"]["expression"].count(f'"{FINALIZER}"') == 2
    assert f'"{FINALIZER}" in object.metadata.finalizers' in pol["spec"]["matchConditions"][0]["expression"]
    assert pol["spec"]["failurePolicy"] == "Ignore"  # kopf adds it itself when the policy cannot
    scoped = one(render(*api, "--set", "operator.watchNamespaces={a,b}"), "MutatingAdmissionPolicyBinding", "operator")
    assert scoped["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a", "b"]}]
    assert by_kind(render(*api, "--set", "operator.finalizerPolicy=false"), "MutatingAdmissionPolicy") == []
    assert by_kind(render(*api, "--set", "operator.enabled=false"), "MutatingAdmissionPolicy") == []


@pytest.mark.parametrize("values", ["default", "full"])
def test_dry_run_server(controlplane, k8s_namespace, kubectl, helm_cmd, values):
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=_monitoring_crds())
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            *[f"crd/{p}.monitoring.coreos.com" for p, _ in MONITORING_CRDS])
    _label_restricted(kubectl, k8s_namespace)
    extra = ["-f", FULL] if values == "full" else []
    rendered = helm_cmd("template", "kubegfs", str(CHART), "--namespace", k8s_namespace, *extra).stdout
    objs = docs(rendered)
    r = kubectl("apply", "--dry-run=server", "-n", k8s_namespace, "-f", "-", input=rendered, check=False)
    assert r.returncode == 0, r.stderr
    assert "would violate PodSecurity" not in r.stderr and "Warning" not in r.stderr, r.stderr
    applied = [line for line in r.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(objs), r.stdout


def _get(kubectl, *args):
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def test_install_upgrade_uninstall(controlplane, k8s_namespace, kubectl):
    ns = k8s_namespace
    rel = "kg"
    _label_restricted(kubectl, ns)
    controlplane.helm("install", rel, str(CHART), "--namespace", ns, "--set", "chunkservers.replicas=2")
    sel = f"app.kubernetes.io/instance={rel}"
    sts = {s["metadata"]["labels"][COMPONENT]: s for s in _get(kubectl, "statefulsets", "-n", ns, "-l", sel)["items"]}
    assert set(sts) == {"master", "chunkserver"} and sts["chunkserver"]["spec"]["replicas"] == 2
    deps = _get(kubectl, "deployments", "-n", ns, "-l", sel)["items"]
    assert [d["metadata"]["name"] for d in deps] == ["kg-kubegfs-operator"]
    names = {(o["kind"], o["metadata"]["name"]) for o in _get(
        kubectl, "services,serviceaccounts,secrets,networkpolicies,configmaps", "-n", ns, "-l", sel)["items"]}
    assert {("Service", "kg-kubegfs-master"), ("Service", "kg-kubegfs-chunkserver"), ("Service", "kg-kubegfs-operator"),
            ("ServiceAccount", "kg-kubegfs-operator"), ("ServiceAccount", "kg-kubegfs-master"),
            ("ServiceAccount", "kg-kubegfs-chunkserver"), ("Secret", "kg-kubegfs-token"),
            ("NetworkPolicy", "kg-kubegfs-default-deny"), ("ConfigMap", "kg-kubegfs-dashboard")} <= names

    # The local control plane runs no workload controllers (no kubelets either), so make the pods
    # the StatefulSet/Deployment controllers would make, from the templates the API server stored,
    # and create them (server dry run) in the namespace that enforces PSS "restricted": the API
    # server's PodSecurity admission refuses any violating pod. Plus the same checks locally.
    workloads = _get(kubectl, "statefulsets,deployments", "-n", ns, "-l", sel)["items"]
    assert len(workloads) == 3
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        for vct in w["spec"].get("volumeClaimTemplates") or []:  # what the StatefulSet controller adds
            claim = f"{vct['metadata']['name']}-{w['metadata']['name']}-0"
            spec["volumes"].append({"name": vct["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}})
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{w['metadata']['name']}-0", "labels": w["spec"]["template"]["metadata"]["labels"]},
               "spec": spec}
        r = kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(pod), check=False)
        assert r.returncode == 0 and "Warning" not in r.stderr, (w["metadata"]["name"], r.stderr)
        assert pss_restricted_violations(spec) == [], w["metadata"]["name"]
    # and a pod that breaks the profile is refused there (the check above is not vacuous)
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
           "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}}
    r = kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(bad), check=False)
    assert r.returncode != 0 and "violates PodSecurity" in r.stderr, r.stderr

    # RBAC as installed: no wildcards; the operator's rules are exactly operator/rbac.yaml
    roles = _get(kubectl, "clusterroles", "-l", sel)["items"]
    assert rbac_wildcards([dict(r, kind="ClusterRole") for r in roles]) == []
    by_comp = {r["metadata"]["labels"][COMPONENT]: r for r in roles}
    assert set(by_comp) == {"operator", "node-reader"}
    assert by_comp["operator"]["rules"] == RBAC["rules"]
    assert by_comp["node-reader"]["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = _get(kubectl, "clusterrolebinding", by_comp["operator"]["metadata"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kg-kubegfs-operator", "namespace": ns}]
    sa_cfg = controlplane.service_account_kubeconfig(ns, "kg-kubegfs-operator")
    can = kubectl("auth", "can-i", "patch", "snapshots.kubegfs.io", "--all-namespaces", kubeconfig=sa_cfg, check=False)
    assert can.stdout.strip() == "yes"
    cannot = kubectl("auth", "can-i", "get", "secrets", "-n", ns, kubeconfig=sa_cfg, check=False)
    assert cannot.stdout.strip() == "no"

    # upgrade: the generated token survives, the change applies
    token = _get(kubectl, "secret", "kg-kubegfs-token", "-n", ns)["data"]["token"]
    # (no Job controller nor kubelets here to run the CRD-upgrade hook's Job: its command and RBAC
    # are tested against this control plane in test_chart_crd_upgrade.py, the Job on real nodes)
    controlplane.helm("upgrade", rel, str(CHART), "--namespace", ns, "--set", "chunkservers.replicas=3",
                      "--set", "crds.upgradeJob.enabled=false")
    assert _get(kubectl, "secret", "kg-kubegfs-token", "-n", ns)["data"]["token"] == token
    assert _get(kubectl, "statefulset", "kg-kubegfs-chunkserver", "-n", ns)["spec"]["replicas"] == 3
    status = controlplane.helm("status", rel, "--namespace", ns).stdout
    assert "REVISION: 2" in status and "helm test kg" in status

    # uninstall: everything but the token Secret (resource-policy keep) goes, cluster roles too
    controlplane.helm("uninstall", rel, "--namespace", ns, "--wait", "--timeout", "60s")
    assert _get(kubectl, "clusterroles", "-l", sel)["items"] == []
    assert _get(kubectl, "statefulsets,deployments", "-n", ns, "-l", sel)["items"] == []
    assert _get(kubectl, "secret", "kg-kubegfs-token", "-n", ns)["data"]["token"] == token
