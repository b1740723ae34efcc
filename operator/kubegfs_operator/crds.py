"""``kubegfs-operator-crds DIR``: create or update the kubegfs CustomResourceDefinitions.

Helm installs a chart's ``crds/`` on ``helm install`` and never touches them again, so a chart
upgrade that changes a CRD (a new field, a printer column, a CEL rule) would leave the old schema
in place. The chart's pre-upgrade hook Job (``templates/crds/``, the way the Velero chart does it)
mounts the new chart's CRDs as JSON files and runs this command, which replaces each one:

- only ``apiextensions.k8s.io/v1`` CustomResourceDefinitions of the ``kubegfs.io`` group are
  accepted (a file of anything else is refused and nothing is applied), so the hook's
  ClusterRole can be limited to those names;
- an absent CRD is created, a present one replaced at its ``resourceVersion`` (retried on a
  conflict); labels and annotations others put on it are kept, the chart's win;
- the JSON files are the chart's (``fromYaml | toJson`` at render time): nothing is parsed as YAML.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import GROUP

log = logging.getLogger("kubegfs.operator.crds")
CRD_API_VERSION = "apiextensions.k8s.io/v1"
CONFLICT_RETRIES = 5


class BadCRD(ValueError):
    """A file that is not a kubegfs CustomResourceDefinition."""


def load(directory: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` in ``directory`` (sorted), each checked to be a kubegfs.io CRD."""
    out = []
    for f in sorted(directory.glob("*.json")):
        try:
            crd = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise BadCRD(f"{f.name}: not readable JSON: {exc}") from exc
        check(crd, f.name)
        out.append(crd)
    if not out:
        raise BadCRD(f"no *.json CRDs in {directory}")
    return out


def check(crd: Any, where: str) -> None:
    if not isinstance(crd, dict):
        raise BadCRD(f"{where}: not a JSON object")
    if crd.get("apiVersion") != CRD_API_VERSION or crd.get("kind") != "CustomResourceDefinition":
        raise BadCRD(f"{where}: not an {CRD_API_VERSION} CustomResourceDefinition")
    spec = crd.get("spec") or {}
    name = (crd.get("metadata") or {}).get("name", "")
    plural = (spec.get("names") or {}).get("plural", "")
    if spec.get("group") != GROUP or name != f"{plural}.{GROUP}":
        raise BadCRD(f"{where}: {name or 'a CRD'} is not a {GROUP} CRD named <plural>.{GROUP}")


def merged(existing: dict[str, Any] | None, desired: dict[str, Any]) -> dict[str, Any]:
    """The object to send: ``desired``, plus (when the CRD exists) its resourceVersion and the
    labels/annotations others added (the chart's own keys win)."""
    body = json.loads(json.dumps(desired))  # a deep copy
    if existing is None:
        return body
    meta_in, meta = existing.get("metadata") or {}, body.setdefault("metadata", {})
    for key in ("labels", "annotations"):
        both = {**(meta_in.get(key) or {}), **(meta.get(key) or {})}
        if both:
            meta[key] = both
    meta["resourceVersion"] = meta_in["resourceVersion"]
    return body


class Api:
    """The three calls made, so that the logic runs against a fake in the unit tests."""

    def __init__(self, ext: Any) -> None:
        self.ext = ext  # kubernetes.client.ApiextensionsV1Api

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.ext.api_client.sanitize_for_serialization(
                self.ext.read_custom_resource_definition(name))
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, body: dict[str, Any]) -> None:
        self.ext.create_custom_resource_definition(body)

    def replace(self, name: str, body: dict[str, Any]) -> None:
        self.ext.replace_custom_resource_definition(name, body)


def apply(api: Any, crds: list[dict[str, Any]], is_conflict: Callable[[Exception], bool]) -> list[str]:
    """Create or replace each CRD; returns one line per CRD saying what was done."""
    done = []
    for crd in crds:
        name = crd["metadata"]["name"]
        for attempt in range(CONFLICT_RETRIES):
            existing = api.get(name)
            try:
                if existing is None:
                    api.create(merged(None, crd))
                    done.append(f"created {name}")
                else:
                    api.replace(name, merged(existing, crd))
                    done.append(f"updated {name}")
                break
            except Exception as exc:
                if not is_conflict(exc) or attempt == CONFLICT_RETRIES - 1:
                    raise
                log.info("%s changed while being updated; again", name)
    return done


def _is_conflict(exc: Exception) -> bool:
    from kubernetes.client.exceptions import ApiException

    return isinstance(exc, ApiException) and exc.status in (409,)


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def main(directory: Path) -> None:
    """Create or update the kubegfs CRDs from the JSON files in DIRECTORY (the chart's
    pre-upgrade hook runs this; Helm never upgrades crds/ itself)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        crds = load(directory)
    except BadCRD as exc:
        click.echo(f"kubegfs-operator-crds: error: {exc}", err=True)
        sys.exit(2)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    try:
        for line in apply(Api(client.ApiextensionsV1Api()), crds, _is_conflict):
            click.echo(line)
    except ApiException as exc:
        click.echo(f"kubegfs-operator-crds: error: the API server refused: {exc.status} {exc.reason}: "
                   f"{(exc.body or '')[:500]}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
