#!/usr/bin/env bash
# Build helm-docs (github.com/norwoodj/helm-docs) from its Go module, for `make chart-readme` and
# `make lint-chart` (which fails when helm/kubegfs/README.md is not what helm-docs makes of
# values.yaml and README.md.gotmpl).
#
# Usage: bash hack/helm-docs/build.sh [CACHE_DIR]    (default $HOME/.cache/kubegfs/k8s)
#   dist/helm-docs-<version>   the binary (never overwritten)
#   bin/helm-docs              a symlink to it
#   src/helm-docs-<version>/   the throwaway Go module used to build it
# Override the version with HELM_DOCS_VERSION.
set -euo pipefail

CACHE_DIR=${1:-${K8S_CACHE:-$HOME/.cache/kubegfs/k8s}}
VERSION=${HELM_DOCS_VERSION:-v1.14.2}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[ -x "$GO" ] || { echo "!! helm-docs-build FAILED: no Go toolchain (set GO=/path/to/go)" >&2; exit 1; }

mkdir -p "$CACHE_DIR/dist" "$CACHE_DIR/bin" "$CACHE_DIR/src"
exec 9>"$CACHE_DIR/.helm-docs.lock"
flock 9

if [ -x "$CACHE_DIR/dist/helm-docs-$VERSION" ]; then
  echo "== helm-docs-build: helm-docs $VERSION already built" >&2
else
  src="$CACHE_DIR/src/helm-docs-$VERSION"
  mkdir -p "$src"
  cd "$src"
  [ -f go.mod ] || "$GO" mod init kubegfs.local/helm-docs-build >/dev/null 2>&1
  echo "== helm-docs-build: fetching github.com/norwoodj/helm-docs@$VERSION" >&2
  "$GO" get "github.com/norwoodj/helm-docs/cmd/helm-docs@$VERSION" >&2
  echo "== helm-docs-build: building helm-docs $VERSION" >&2
  CGO_ENABLED=0 nice "$GO" build -trimpath -p "${BUILD_JOBS:-2}" -ldflags "-s -w" \
    -o "$CACHE_DIR/dist/helm-docs-$VERSION.tmp" github.com/norwoodj/helm-docs/cmd/helm-docs
  mv "$CACHE_DIR/dist/helm-docs-$VERSION.tmp" "$CACHE_DIR/dist/helm-docs-$VERSION"
fi
ln -sfn "../dist/helm-docs-$VERSION" "$CACHE_DIR/bin/helm-docs"
echo "== helm-docs-build: $CACHE_DIR/bin/helm-docs -> helm-docs $VERSION" >&2
