#!/usr/bin/env bash
# Build the kubegfs container images (master, chunkserver, operator) from a local wheelhouse.
#
#   bash hack/images/build.sh [--base IMAGE] [--tool docker|podman|buildah] [--push] [COMPONENT...]
#
#   --base IMAGE     base for both stages (default python:3.11-slim-bookworm; offline/CI:
#                    `--base "$(bash hack/images/base.sh)"` = localhost/kubegfs-base:bookworm)
#   --tool T         force docker, podman or buildah (default: the first that works, in that order)
#   --push           push after building (same as PUSH=1); needs REGISTRY
#   --wheels-only    prepare the wheelhouse and stop
#   COMPONENT        master, chunkserver, operator (default: all three)
#
# Environment: REGISTRY (tags become $REGISTRY/kubegfs/<component>:<version>), PUSH=1, VERSION
# (default: pyproject's), PYTHON (a Python 3.11 for `pip wheel`; default .venv/bin/python),
# BUILDAH_ISOLATION (default chroot, for buildah/podman), SOURCE_URL (the source label),
# KEEP_OLD_IMAGES=1 (buildah/podman: keep superseded images of earlier builds).
#
# The wheelhouse (`pip wheel` of the project and its dependencies; `.[operator]` for the operator
# image) goes under .cache/images/ (git-ignored) and is reused while pyproject.toml is unchanged;
# only the kubegfs wheel is rebuilt when its sources change, so a warm run needs no network. The
# image builds themselves never use the network (`pip install --no-index` inside).
# Prints one "IMAGE SIZE" line per image at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
CACHE=$ROOT/.cache/images
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
TOOL=${CONTAINER_TOOL:-}
PUSH=${PUSH:-0}
WHEELS_ONLY=0
ISOLATION=${BUILDAH_ISOLATION:-chroot}
COMPONENTS=()

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --base) BASE_IMAGE=$2; shift 2 ;;
    --base=*) BASE_IMAGE=${1#*=}; shift ;;
    --tool) TOOL=$2; shift 2 ;;
    --tool=*) TOOL=${1#*=}; shift ;;
    --push) PUSH=1; shift ;;
    --wheels-only) WHEELS_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    master|chunkserver|operator) COMPONENTS+=("$1"); shift ;;
    *) echo "build.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ ${#COMPONENTS[@]} -gt 0 ]] || COMPONENTS=(master chunkserver operator)

log() { echo "== images: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------ version, labels
VERSION=${VERSION:-$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -1)}
[[ -n $VERSION ]] || die "no version in pyproject.toml"
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $REVISION != unknown && -n $(git status --porcelain -- kubegfs operator pyproject.toml images 2>/dev/null) ]]; then
  REVISION=$REVISION-dirty
fi
CREATED=$(git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)
SOURCE_URL=${SOURCE_URL:-$(git remote get-url origin 2>/dev/null || echo https://github.com/kubegfs/kubegfs)}

# ------------------------------------------------------------------------------ wheelhouse
PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
  for p in "$ROOT/.venv/bin/python" python3.11 python3; do
    if command -v "$p" >/dev/null; then PYTHON=$p; break; fi
  done
fi
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# The images run CPython 3.11 (python:3.11-slim, Debian bookworm): the wheels must be cp311 ones.
[[ $PYVER == 3.11 ]] || die "$PYTHON is Python $PYVER; the wheelhouse needs 3.11 (set PYTHON=...)"
PYTAG=$("$PYTHON" -c 'import platform, sys; print(sys.implementation.name, platform.machine(), platform.libc_ver()[1])')

mkdir -p "$CACHE"
BUILDENV=$CACHE/buildenv
if [[ ! -x $BUILDENV/bin/python ]] || ! "$BUILDENV/bin/python" -c 'import setuptools, wheel' 2>/dev/null; then
  log "creating the wheel-building venv $BUILDENV (setuptools, wheel)"
  rm -rf "$BUILDENV"
  "$PYTHON" -m venv "$BUILDENV"
  "$BUILDENV/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=68" wheel
fi
PIP=("$BUILDENV/bin/python" -m pip --disable-pip-version-check)

# A clean export of what the wheel is built from (tracked + new, non-ignored files only), so stale
# build/ or egg-info folders in the work tree never leak into the image.
SRC=$CACHE/src
mapfile -d '' files < <(git ls-files -z -c -o --exclude-standard --deduplicate -- \
  pyproject.toml README.md 'LICENSE*' setup.py setup.cfg MANIFEST.in kubegfs operator)
existing=()
for f in "${files[@]}"; do [[ -f $f ]] && existing+=("$f"); done
[[ ${#existing[@]} -gt 0 ]] || die "no sources found (is this a git checkout?)"
SRC_HASH=$(printf '%s\0' "${existing[@]}" | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
PROJECT=$CACHE/project
if [[ "$(cat "$PROJECT/.stamp" 2>/dev/null)" != "$SRC_HASH $VERSION" ]]; then
  log "building the kubegfs $VERSION wheel (sources $SRC_HASH)"
  rm -rf "$SRC" "$PROJECT"
  mkdir -p "$SRC" "$PROJECT"
  printf '%s\0' "${existing[@]}" | tar --null -T - -cf - | tar -xf - -C "$SRC"
  if [[ $VERSION != "$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -1)" ]]; then
    sed -i "s/^version *= *\"[^\"]*\"/version = \"$VERSION\"/" "$SRC/pyproject.toml"
  fi
  # Reproducible: the same sources give the same wheel bytes (and so a layer-cache hit).
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
    "${PIP[@]}" wheel -q --no-deps --no-build-isolation --no-index -w "$PROJECT" "$SRC"
  rm -rf "$SRC/build" "$SRC"/*.egg-info
  echo "$SRC_HASH $VERSION" > "$PROJECT/.stamp"
fi
WHEEL=$(ls "$PROJECT"/kubegfs-"$VERSION"-*.whl)

DEPS_KEY="$(sha256sum pyproject.toml | cut -c1-16) $PYTAG"
for set in core operator; do
  deps=$CACHE/deps-$set
  if [[ "$(cat "$deps/.stamp" 2>/dev/null)" != "$DEPS_KEY" ]]; then
    req=$WHEEL; [[ $set == operator ]] && req="$WHEEL[operator]"
    log "pip wheel: dependencies of kubegfs${req#"$WHEEL"} into $deps (network; once per pyproject change)"
    rm -rf "$deps"; mkdir -p "$deps"
    "${PIP[@]}" wheel -q --prefer-binary -w "$deps" --find-links "$PROJECT" "$req"
    rm -f "$deps"/kubegfs-*.whl
    echo "$DEPS_KEY" > "$deps/.stamp"
  fi
  # The build context: wheels/ (dependencies) and project/ (kubegfs), copied in two steps so a
  # source change only redoes the second. Hard links (or copies keeping mtimes) and pinned folder
  # mtimes (part of buildah's COPY cache key) keep the layer cache warm.
  ctx=$CACHE/$set
  rm -rf "$ctx"; mkdir -p "$ctx/wheels" "$ctx/project"
  cp -lp "$deps"/*.whl "$ctx/wheels/" 2>/dev/null || cp -p "$deps"/*.whl "$ctx/wheels/"
  cp -lp "$WHEEL" "$ctx/project/" 2>/dev/null || cp -p "$WHEEL" "$ctx/project/"
  touch -d @315532800 "$ctx/wheels" "$ctx/project" "$ctx"
done
mkdir -p "$CACHE/empty"; touch -d @315532800 "$CACHE/empty"
log "wheelhouse ready: kubegfs + $(find "$CACHE/core/wheels" -name '*.whl' | wc -l) dependency wheels (core), $(find "$CACHE/operator/wheels" -name '*.whl' | wc -l) (operator)"
[[ $WHEELS_ONLY == 1 ]] && exit 0

# ------------------------------------------------------------------------------ container tool
works() {
  case $1 in
    docker) command -v docker >/dev/null && docker info >/dev/null 2>&1 ;;
    podman) command -v podman >/dev/null && podman info >/dev/null 2>&1 ;;
    buildah) command -v buildah >/dev/null && buildah --version >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}
if [[ -n $TOOL ]]; then
  works "$TOOL" || die "--tool $TOOL: not installed or not working"
else
  for t in docker podman buildah; do
    if works "$t"; then TOOL=$t; break; fi
  done
  [[ -n $TOOL ]] || die "no working docker, podman or buildah (CI: apt-get install -y buildah)"
fi
log "building with $TOOL on $BASE_IMAGE"

build() {  # build IMAGES-SUBDIR TAG CONTEXT [EXTRA ARGS...]
  local args=(-f "images/$1/Dockerfile" -t "$2" "${@:4}"
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION"
    --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED" --build-arg "SOURCE=$SOURCE_URL")
  case $TOOL in
    docker) docker build "${args[@]}" "$3" ;;
    # --format docker keeps HEALTHCHECK (the OCI image config has no such field).
    podman) podman build --format docker --layers --isolation "$ISOLATION" "${args[@]}" "$3" ;;
    buildah) buildah bud --format docker --layers --isolation "$ISOLATION" "${args[@]}" "$3" ;;
  esac
}
size() {
  case $TOOL in
    docker) docker image inspect --format '{{.Size}}' "$1" ;;
    podman) podman image inspect --format '{{.Size}}' "$1" ;;
    buildah) buildah images --format '{{.Size}}' --filter "reference=$1" | head -1 ;;
  esac
}

# Every image is a thin layer (title, port, entrypoint) on a shared runtime (images/runtime/: the
# venv, user, health check), built first and never pushed: localhost/kubegfs/runtime for the
# servers, localhost/kubegfs/runtime-operator (the `operator` extra) for the operator.
runtime_of() { [[ $1 == operator ]] && echo "localhost/kubegfs/runtime-operator:$VERSION" || echo "localhost/kubegfs/runtime:$VERSION"; }
build_runtime() {  # build_runtime SET
  local tag args=()
  tag=$(runtime_of "$1")
  [[ $1 == operator ]] && args=(--build-arg "EXTRAS=[operator]" --build-arg DATA=no --build-arg WORKDIR=/home/kubegfs
    --build-arg "CHECK=zstandard, kopf, croniter, kubernetes.client, kubernetes.config, kubegfs_operator.main, kubegfs_operator.crds")
  local start=$SECONDS
  log "runtime ($1) -> $tag"
  if [[ $TOOL != docker ]]; then
    # Tag the builder stage too: it keeps that stage's layers out of the dangling-image prune
    # below, so the next build reuses them (a cache hit here; the main build then hits it too).
    build runtime "localhost/kubegfs/build-cache:$1" "$CACHE/$1" --target builder "${args[@]}" >&2
  fi
  build runtime "$tag" "$CACHE/$1" "${args[@]}" >&2
  log "runtime ($1) built in $((SECONDS - start))s"
}
BUILT_RUNTIMES=" "

TAGS=()
for c in "${COMPONENTS[@]}"; do
  set=core; [[ $c == operator ]] && set=operator
  if [[ $BUILT_RUNTIMES != *" $set "* ]]; then build_runtime "$set"; BUILT_RUNTIMES+="$set "; fi
  tag=${REGISTRY:+$REGISTRY/}kubegfs/$c:$VERSION
  start=$SECONDS
  log "$c -> $tag"
  # FROM the runtime only: an empty context
  build "$c" "$tag" "$CACHE/empty" --build-arg "RUNTIME=$(runtime_of "$c")" >&2
  log "$c built in $((SECONDS - start))s"
  TAGS+=("$tag")
done

if [[ $PUSH == 1 ]]; then
  [[ -n ${REGISTRY:-} ]] || die "PUSH=1 needs REGISTRY=host[:port][/path]"
  for tag in "${TAGS[@]}"; do
    log "pushing $tag"
    case $TOOL in
      docker) docker push "$tag" ;;
      podman) podman push "$tag" ;;
      buildah) buildah push "$tag" "docker://$tag" ;;
    esac >&2
  done
fi

# buildah/podman keep every superseded image of earlier builds: drop the dangling ones that came
# from these Dockerfiles (labelled by them or by the kubegfs base), never anything else.
if [[ $TOOL != docker && ${KEEP_OLD_IMAGES:-0} != 1 ]]; then
  for _ in 1 2 3 4 5 6 7 8; do
    mapfile -t old < <(for l in org.opencontainers.image.vendor=kubegfs io.kubegfs.rootfs.sha256; do
      "$TOOL" images --filter dangling=true --filter "label=$l" --format '{{.ID}}'; done | sort -u)
    [[ ${#old[@]} -gt 0 ]] || break
    "$TOOL" rmi "${old[@]}" >/dev/null 2>&1 || true
  done
fi

for tag in "${TAGS[@]}"; do echo "$tag $(size "$tag")"; done
