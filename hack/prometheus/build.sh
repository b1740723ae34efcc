#!/usr/bin/env bash
# Build prometheus and promtool from their Go module, with Kubernetes service discovery (the
# Debian package leaves it out) and no other discovery plugin, for the monitoring tests that let
# Prometheus find the chart's pods itself.
#
# Usage: bash hack/prometheus/build.sh [CACHE_DIR]    (default $HOME/.cache/kubegfs/k8s)
#   dist/prometheus-<version>, dist/promtool-<version>   the binaries (never overwritten)
#   bin/prometheus, bin/promtool                         symlinks to them
#   src/prometheus-<version>/                            the throwaway Go module used to build them
# Override the version with PROMETHEUS_MODULE_VERSION (the module's v0.x tag for Prometheus 3.x).
set -euo pipefail

CACHE_DIR=${1:-${K8S_CACHE:-$HOME/.cache/kubegfs/k8s}}
VERSION=${PROMETHEUS_MODULE_VERSION:-v0.316.0}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[ -x "$GO" ] || { echo "!! prometheus-build FAILED: no Go toolchain (set GO=/path/to/go)" >&2; exit 1; }

mkdir -p "$CACHE_DIR/dist" "$CACHE_DIR/bin" "$CACHE_DIR/src"
exec 9>"$CACHE_DIR/.prometheus.lock"
flock 9

if [ -x "$CACHE_DIR/dist/prometheus-$VERSION" ] && [ -x "$CACHE_DIR/dist/promtool-$VERSION" ]; then
  echo "== prometheus-build: prometheus $VERSION already built" >&2
else
  src="$CACHE_DIR/src/prometheus-$VERSION"
  mkdir -p "$src"
  cd "$src"
  [ -f go.mod ] || "$GO" mod init kubegfs.local/prometheus-build >/dev/null 2>&1
  echo "== prometheus-build: fetching github.com/prometheus/prometheus@$VERSION" >&2
  "$GO" get "github.com/prometheus/prometheus/cmd/prometheus@$VERSION" \
    "github.com/prometheus/prometheus/cmd/promtool@$VERSION" >&2
  for tool in prometheus promtool; do
    echo "== prometheus-build: building $tool $VERSION (kubernetes SD only)" >&2
    nice "$GO" build -p "${BUILD_JOBS:-2}" -tags remove_all_sd,enable_kubernetes_sd \
      -o "$CACHE_DIR/dist/$tool-$VERSION.tmp" "github.com/prometheus/prometheus/cmd/$tool"
    mv "$CACHE_DIR/dist/$tool-$VERSION.tmp" "$CACHE_DIR/dist/$tool-$VERSION"
  done
fi
for tool in prometheus promtool; do
  ln -sfn "../dist/$tool-$VERSION" "$CACHE_DIR/bin/$tool"
done
echo "== prometheus-build: $CACHE_DIR/bin/prometheus -> prometheus $VERSION" >&2
