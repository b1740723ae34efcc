"""A CRD with a status subresource and a CEL rule is enforced by the real API server."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from kubegfs_dev.pytest_plugin import Kubectl
from kubegfs_dev.util import wait_for

GROUP = "test.kubegfs.io"
PLURAL = "widgets"
CEL_MESSAGE = "minReplicas must not exceed replicas"

CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [{
            "name": "v1",
            "served": True,
            "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["replicas"],
                        "properties": {
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "color": {"type": "string"},
                        },
                        "x-kubernetes-validations": [{
                            "rule": "!has(self.minReplicas) || self.minReplicas <= self.replicas",
                            "message": CEL_MESSAGE,
                        }],
                    },
                    "status": {
                        "type": "object",
                        "properties": {"phase": {"type": "string"},
                                       "observedReplicas": {"type": "integer"}},
                    },
                },
            }},
        }],
    },
}


def _established(ext: client.ApiextensionsV1Api) -> bool:
    crd = ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    conds = (crd.status.conditions or []) if crd.status else []
    return any(c.type == "Established" and c.status == "True" for c in conds)


@pytest.fixture(scope="module")
def widget_crd(k8s_api: client.ApiClient) -> str:
    ext = client.ApiextensionsV1Api(k8s_api)
    try:
        ext.create_custom_resource_definition(CRD)
    except ApiException as e:
        if e.status != 409:
            raise
    wait_for(lambda: _established(ext), what="the Widget CRD to be Established")
    # Discovery may lag Established by a moment: wait until the resource can be listed.
    co = client.CustomObjectsApi(k8s_api)

    def listable() -> bool:
        try:
            co.list_cluster_custom_object(GROUP, "v1", PLURAL)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    wait_for(listable, what="the Widget resource to be served")
    return f"{PLURAL}.{GROUP}"


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def test_cel_rule_rejects_bad_object(widget_crd: str, k8s_api: client.ApiClient, k8s_namespace: str) -> None:
    co = client.CustomObjectsApi(k8s_api)
    with pytest.raises(ApiException) as exc:
        co.create_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL,
                                           widget("bad", replicas=1, minReplicas=3))
    assert exc.value.status == 422
    assert CEL_MESSAGE in (exc.value.body or "")
    # The OpenAPI schema is enforced too (not only CEL).
    with pytest.raises(ApiException) as exc2:
        co.create_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL,
                                           widget("negative", replicas=-1))
    assert exc2.value.status == 422
    # Nothing was stored.
    items = co.list_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL)["items"]
    assert items == []


def test_cel_rule_rejects_bad_update(widget_crd: str, k8s_api: client.ApiClient, k8s_namespace: str) -> None:
    co = client.CustomObjectsApi(k8s_api)
    co.create_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL,
                                       widget("w", replicas=3, minReplicas=2))
    with pytest.raises(ApiException) as exc:
        co.patch_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "w",
                                          {"spec": {"replicas": 1}})
    assert exc.value.status == 422
    assert CEL_MESSAGE in (exc.value.body or "")
    obj = co.get_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "w")
    assert obj["spec"]["replicas"] == 3


def test_status_subresource(widget_crd: str, k8s_api: client.ApiClient, k8s_namespace: str) -> None:
    co = client.CustomObjectsApi(k8s_api)
    created = co.create_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL,
                                                 widget("s", replicas=2))
    assert created["metadata"]["generation"] == 1
    # status sent to the main resource is ignored when the status subresource is enabled ...
    body = widget("s", replicas=2)
    body["status"] = {"phase": "Ignored"}
    co.patch_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "s", body)
    assert "status" not in co.get_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "s")
    # ... and only the status subresource writes it, without bumping the generation.
    co.patch_namespaced_custom_object_status(GROUP, "v1", k8s_namespace, PLURAL, "s",
                                             {"status": {"phase": "Ready", "observedReplicas": 2}})
    obj = co.get_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "s")
    assert obj["status"] == {"phase": "Ready", "observedReplicas": 2}
    assert obj["metadata"]["generation"] == 1
    # A spec change bumps the generation; the status stays.
    co.patch_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "s",
                                      {"spec": {"replicas": 5, "color": "blue"}})
    obj = co.get_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "s")
    assert obj["metadata"]["generation"] == 2
    assert obj["spec"] == {"replicas": 5, "color": "blue"}
    assert obj["status"]["phase"] == "Ready"


def test_watch_sees_create_patch_delete(widget_crd: str, k8s_api: client.ApiClient,
                                        k8s_namespace: str) -> None:
    co = client.CustomObjectsApi(k8s_api)
    rv = co.list_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL)["metadata"]["resourceVersion"]
    events: list[tuple[str, str, Any]] = []
    done = threading.Event()
    w = watch.Watch()

    def consume() -> None:
        for ev in w.stream(co.list_namespaced_custom_object, GROUP, "v1", k8s_namespace, PLURAL,
                           resource_version=rv, timeout_seconds=120):
            obj = ev["object"]
            events.append((ev["type"], obj["metadata"]["name"], obj.get("spec", {}).get("color")))
            if ev["type"] == "DELETED":
                break
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    co.create_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL,
                                       widget("watched", replicas=1, color="red"))
    co.patch_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "watched",
                                      {"spec": {"color": "green"}})
    co.delete_namespaced_custom_object(GROUP, "v1", k8s_namespace, PLURAL, "watched")
    done.wait(timeout=120)
    w.stop()
    assert events == [("ADDED", "watched", "red"), ("MODIFIED", "watched", "green"),
                      ("DELETED", "watched", "green")]


def test_kubectl_apply_custom_objects(widget_crd: str, kubectl: Kubectl, k8s_namespace: str) -> None:
    good = f"""\
apiVersion: {GROUP}/v1
kind: Widget
metadata:
  name: from-kubectl
spec:
  replicas: 3
  minReplicas: 1
"""
    out = kubectl("apply", "-n", k8s_namespace, "-f", "-", input=good).stdout
    assert "widget.test.kubegfs.io/from-kubectl created" in out
    got = kubectl("get", "widgets", "-n", k8s_namespace, "-o",
                  "jsonpath={.items[*].metadata.name}={.items[*].spec.replicas}").stdout
    assert got == "from-kubectl=3"
    bad = good.replace("minReplicas: 1", "minReplicas: 9")
    r = kubectl("apply", "-n", k8s_namespace, "-f", "-", input=bad, check=False)
    assert r.returncode != 0
    assert CEL_MESSAGE in r.stderr
    # The rejected update left the stored object alone.
    assert kubectl("get", "widget", "from-kubectl", "-n", k8s_namespace, "-o",
                   "jsonpath={.spec.minReplicas}").stdout == "1"
