#!/usr/bin/env bash
# Make a local Debian bookworm + python3 base image for the kubegfs images, without any registry:
#   debootstrap --variant=minbase bookworm  ->  a cached rootfs tarball  ->  buildah from scratch/add/commit
#
#   bash hack/images/base.sh [--image NAME] [--cache DIR] [--mirror URL] [--rebuild]
#
# The rootfs tarball is cached OUTSIDE the repository ($HOME/.cache/kubegfs/rootfs by default), so a
# fresh clone on the same machine reuses it; the image is re-imported only when the tarball changed.
# bookworm's python3 is 3.11, the same minor version as the host wheelhouse (cp311 wheels).
# The Debian mirror is the one apt is configured with on this machine (override: --mirror/DEBIAN_MIRROR).
# Prints the image name on the last line of stdout. Needs root (debootstrap), debootstrap and buildah.
set -euo pipefail

IMAGE=${KUBEGFS_BASE_IMAGE:-localhost/kubegfs-base:bookworm}
CACHE=${KUBEGFS_ROOTFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubegfs/rootfs}
MIRROR=${DEBIAN_MIRROR:-}
SUITE=bookworm
REBUILD=0
# python3-venv brings ensurepip (the builder stage makes /opt/kubegfs with it); ca-certificates so
# the operator can verify TLS to the API server with the system store as well as the SA's CA.
PACKAGES=python3,python3-venv,ca-certificates

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --image) IMAGE=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --mirror) MIRROR=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "base.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

log() { echo "== base: $*" >&2; }
die() { echo "base.sh: error: $*" >&2; exit 1; }

for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y $tool)"
done
[[ $(id -u) == 0 ]] || die "debootstrap needs root"

# The first "deb" URI apt uses for the main archive (deb822 .sources or one-line .list format),
# skipping -security/-updates-only entries. Falls back to deb.debian.org.
apt_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    uri=$(awk -v suite="$SUITE" '
      BEGIN { RS=""; FS="\n" }
      {
        types=""; uris=""; suites=""; enabled="yes"
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/)   { types=$i }
          if ($i ~ /^URIs:/)    { uris=$i }
          if ($i ~ /^Suites:/)  { suites=$i }
          if ($i ~ /^Enabled:/) { enabled=$i }
        }
        if (types ~ /(^|[ :])deb([ ]|$)/ && enabled !~ /no/ && suites ~ ("[ :]" suite "([ ]|$)")) {
          sub(/^URIs:[ ]*/, "", uris); split(uris, u, " "); print u[1]; exit
        }
      }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    uri=$(awk -v suite="$SUITE" '$1 == "deb" {
            i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            if ($(i+1) == suite) { print $i; exit } }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  echo "http://deb.debian.org/debian"
}
[[ -n $MIRROR ]] || MIRROR=$(apt_mirror)

mkdir -p "$CACHE"
TAR=$CACHE/$SUITE-python.tar
KEY="suite=$SUITE packages=$PACKAGES mirror=$MIRROR variant=minbase v=2"

if [[ $REBUILD == 1 || ! -s $TAR || "$(cat "$TAR.key" 2>/dev/null)" != "$KEY" ]]; then
  log "debootstrap --variant=minbase $SUITE from $MIRROR (once; cached as $TAR)"
  WORK=$(mktemp -d "$CACHE/.rootfs.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  start=$SECONDS
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/root" "$MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  R=$WORK/root
  # A base image needs no package indexes, caches, docs or man pages (copyright files stay).
  rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb \
         "$R"/var/log/* "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/tmp/* "$R"/var/tmp/*
  find "$R"/usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
  find "$R"/usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
  find "$R"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
  find "$R" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
  # apt inside the image should use the same mirror; no resolv.conf/hostname from this machine.
  printf 'deb %s %s main\n' "$MIRROR" "$SUITE" > "$R/etc/apt/sources.list"
  rm -f "$R/etc/resolv.conf" "$R/etc/hostname"
  # The checks the Dockerfiles rely on: python3 is 3.11 and `python3 -m venv` works.
  chroot "$R" /usr/bin/python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
  chroot "$R" /usr/bin/python3 -m venv /tmp/venv-check
  chroot "$R" /tmp/venv-check/bin/python -m pip --version >/dev/null
  rm -rf "$R/tmp/venv-check"
  find "$R" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
  tar --numeric-owner --xattrs -C "$R" -cf "$WORK/rootfs.tar" .
  mv -f "$WORK/rootfs.tar" "$TAR"
  echo "$KEY" > "$TAR.key"
  sha256sum "$TAR" | cut -d' ' -f1 > "$TAR.sha256"
  rm -rf "$WORK"; trap - EXIT
  log "rootfs ready in $((SECONDS - start))s: $(du -h "$TAR" | cut -f1)"
fi

SUM=$(cat "$TAR.sha256" 2>/dev/null || sha256sum "$TAR" | cut -d' ' -f1)
have=$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "io.kubegfs.rootfs.sha256"}}' "$IMAGE" 2>/dev/null || true)
if [[ $REBUILD == 1 || $have != "$SUM" ]]; then
  log "importing $TAR as $IMAGE"
  ctr=$(buildah from scratch)
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  buildah add "$ctr" "$TAR" / >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd /usr/bin/python3 \
    --label io.kubegfs.rootfs.sha256="$SUM" \
    --label org.opencontainers.image.title=kubegfs-base \
    --label org.opencontainers.image.description="Debian $SUITE minbase + python3 (debootstrap from $MIRROR)" \
    --os linux --arch "$(dpkg --print-architecture 2>/dev/null || echo amd64)" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
  trap - EXIT
else
  log "$IMAGE is up to date"
fi
echo "$IMAGE"
