"""The chart's security as rendered, and its generated certificate used by real kubegfs processes:
TLS on by default (certificates generated with the chart's own CA, from cert-manager, or from a
Secret the user names), every client verifying, and one token per role."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubegfs.client import Client
from kubegfs.errors import Unavailable
from kubegfs.tls import ClientTLS
from kubegfs_dev.util import free_port, wait_http


def containers(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for o in objs:
        spec = o["spec"]["template"]["spec"] if o["kind"] in ("Deployment", "StatefulSet") else o.get("spec")
        if o["kind"] in ("Deployment", "StatefulSet", "Pod"):
            out[o["metadata"]["labels"]["app.kubernetes.io/component"]] = {"c": spec["containers"][0], "spec": spec}
    return out


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c["env"]}


def test_tls_is_on_by_default_and_every_client_verifies(render):
    objs = render(namespace="store", release="kg")
    (secret,) = [o for o in objs if o["kind"] == "Secret" and o["type"] == "kubernetes.io/tls"]
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    comps = containers(objs)
    name = "kg-kubegfs.store.kubegfs"
    for comp in ("master", "chunkserver", "operator"):
        e = env(comps[comp]["c"])
        assert e["KUBEGFS_TLS_CERT"] == "/etc/kubegfs/tls/tls.crt" and e["KUBEGFS_CACERT"] == "/etc/kubegfs/tls/ca.crt"
        assert e["KUBEGFS_TLS_SERVER_NAME"] == name, comp
        vols = {v["name"]: v for v in comps[comp]["spec"]["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert env(comps["operator"]["c"])["KUBEGFS_SCHEME"] == "https"
    assert "--advertise=https://$(POD_IP):9500" in comps["chunkserver"]["c"]["args"]
    test_env = env(comps["test"]["c"])
    assert test_env["KUBEGFS_MASTER"].startswith("https://") and "KUBEGFS_TLS_CERT" not in test_env
    assert test_env["KUBEGFS_TLS_SERVER_NAME"] == name


def test_plain_http_when_disabled(render):
    objs = render("--set", "tls.enabled=false")
    assert not [o for o in objs if o["kind"] == "Secret" and o["type"] == "kubernetes.io/tls"]
    comps = containers(objs)
    assert "KUBEGFS_TLS_CERT" not in env(comps["master"]["c"])
    assert env(comps["operator"]["c"])["KUBEGFS_SCHEME"] == "http"


def test_cert_manager_and_existing_secret(render, helm_cmd):
    objs = render("--set", "tls.certManager.enabled=true", "--set", "tls.certManager.issuerRef.name=ca-issuer",
                  "--set", "tls.certManager.issuerRef.kind=ClusterIssuer", namespace="store", release="kg")
    (cert,) = [o for o in objs if o["kind"] == "Certificate"]
    assert cert["spec"]["issuerRef"] == {"name": "ca-issuer", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert "kg-kubegfs.store.kubegfs" in cert["spec"]["dnsNames"] and cert["spec"]["secretName"] == "kg-kubegfs-tls"
    assert not [o for o in objs if o["kind"] == "Secret" and o["type"] == "kubernetes.io/tls"]
    r = helm_cmd("template", "kg", str(Path(__file__).resolve().parents[2] / "helm" / "kubegfs"),
                 "--set", "tls.certManager.enabled=true", check=False)
    assert r.returncode != 0 and "issuerRef" in r.stderr  # an issuer must be named
    objs = render("--set", "tls.existingSecret=my-tls")
    assert not [o for o in objs if o.get("type") == "kubernetes.io/tls" or o["kind"] == "Certificate"]
    vols = {v["name"]: v for v in containers(objs)["master"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "my-tls"


def test_separate_role_tokens(render):
    objs = render("--set", "metrics.serviceMonitor.enabled=true", namespace="store", release="kg")
    (tokens,) = [o for o in objs if o["kind"] == "Secret" and o["type"] == "Opaque"]
    vals = {k: base64.b64decode(v) for k, v in tokens["data"].items()}
    assert set(vals) == {"token", "internal-token", "metrics-token"} and len(set(vals.values())) == 3
    comps = containers(objs)
    for comp in ("master", "chunkserver"):
        args = comps[comp]["c"]["args"]
        assert {"--token-file=/etc/kubegfs/token", "--internal-token-file=/etc/kubegfs/internal-token",
                "--metrics-token-file=/etc/kubegfs/metrics-token"} <= set(args)
    (sm,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    for ep in sm["spec"]["endpoints"]:
        assert ep["authorization"]["credentials"]["key"] == "metrics-token"  # a scrape cannot write
        assert ep["scheme"] == "https" and ep["tlsConfig"]["serverName"] == "kg-kubegfs.store.kubegfs"


def test_the_generated_certificate_serves_a_real_master(render, tmp_path):
    """The chart's own CA and certificate (genCA/genSignedCert) work with kubegfs's TLS: a master
    serves with them, a client verifying the release's name gets through, another name does not."""
    objs = render(namespace="store", release="kg")
    (secret,) = [o for o in objs if o["kind"] == "Secret" and o["type"] == "kubernetes.io/tls"]
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    port = free_port()
    log = open(tmp_path / "master.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "kubegfs", "master", "--listen", f"127.0.0.1:{port}",
                          "--data", str(tmp_path / "data"), "--token", "t" * 32,
                          "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key")],
                         stdout=log, stderr=log)
    try:
        wait_http(f"https://127.0.0.1:{port}/healthz", timeout=30,
                  context=ClientTLS(str(tmp_path / "ca.crt"), "kg-kubegfs.store.kubegfs").context())
        ok = Client(f"https://127.0.0.1:{port}", "t" * 32,
                    tls=ClientTLS(str(tmp_path / "ca.crt"), "kg-kubegfs.store.kubegfs"))
        assert ok.status()["files"] == 0
        wrong = Client(f"https://127.0.0.1:{port}", "t" * 32,
                       tls=ClientTLS(str(tmp_path / "ca.crt"), "other-release.store.kubegfs"))
        with pytest.raises(Unavailable, match="SSLCertVerificationError"):
            wrong.status()
    finally:
        p.terminate()
        p.wait(timeout=20)
        log.close()


def test_api_server_egress_is_narrowed_to_the_api_server(controlplane, helm_cmd):
    """Installed against a cluster (lookup works), the API-server egress names the kubernetes
    Service's IP and its endpoints instead of any address on 443/6443."""
    import json

    from kubernetes import client

    api = controlplane.api_client()
    svc = client.CoreV1Api(api).read_namespaced_service("kubernetes", "default")
    want = {f"{svc.spec.cluster_ip}/32"}
    try:  # the API servers' own addresses, where the harness's API server publishes them
        eps = client.DiscoveryV1Api(api).read_namespaced_endpoint_slice("kubernetes", "default")
        want |= {f"{ip}/32" for e in eps.endpoints or [] for ip in e.addresses}
    except client.exceptions.ApiException as exc:
        assert exc.status == 404
    r = helm_cmd("template", "kg", str(Path(__file__).resolve().parents[2] / "helm" / "kubegfs"),
                 "--dry-run=server", "--kubeconfig", str(controlplane.kubeconfig), "--namespace", "default")
    import yaml

    policies = [d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "NetworkPolicy"]
    seen = 0
    for np in policies:
        for rule in np["spec"].get("egress", []):
            if {p["port"] for p in rule.get("ports", [])} == {443, 6443}:
                seen += 1
                assert {t["ipBlock"]["cidr"] for t in rule["to"]} == want, json.dumps(rule)
    assert seen == 4  # operator, master, chunkservers (topologyFromNode), the CRD-upgrade hook
