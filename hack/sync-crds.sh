#!/usr/bin/env bash
# Copy the files the Helm chart must keep identical to their sources outside the chart (a chart
# cannot read files outside itself): the CRDs and the operator's ClusterRole.
# tests/packaging/test_helm.py fails when they differ; run this after editing crds/ or operator/rbac.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
chart=helm/kubegfs
rm -f "$chart"/crds/*.yaml
cp crds/*.yaml "$chart/crds/"
cp operator/rbac.yaml "$chart/files/operator-rbac.yaml"
echo "synced crds/ and operator/rbac.yaml into $chart"
