#!/usr/bin/env bash
# Fail when helm/kubegfs/README.md is not what helm-docs generates now (run from `make lint-chart`).
# Usage: bash hack/helm-docs/check.sh HELM_DOCS_BINARY
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:?usage: check.sh HELM_DOCS_BINARY}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r helm/kubegfs "$tmp/kubegfs"
"$bin" --chart-search-root "$tmp" --log-level warning >/dev/null
if ! diff -u helm/kubegfs/README.md "$tmp/kubegfs/README.md"; then
  echo "!! helm/kubegfs/README.md is stale: run \`make chart-readme\` and commit it" >&2
  exit 1
fi
echo "helm/kubegfs/README.md is up to date"
