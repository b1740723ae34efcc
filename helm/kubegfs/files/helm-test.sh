# Run by the `helm test` pod (POSIX sh; needs the kubegfs CLI, KUBEGFS_MASTER and KUBEGFS_TOKEN).
# tests/packaging/test_monitoring.py runs this very script against real kubegfs processes.
set -eu
tmp="${TMPDIR:-/tmp}"
# (no `$$`: the script is a container arg, where Kubernetes turns `$$` into a literal `$`)
id="helm-test-$(date +%s)-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
dir="/$id"
echo "kubegfs helm test $id" > "$tmp/in"
kubegfs fs mkdir -p "$dir"
kubegfs fs put -q "$tmp/in" "$dir/file"
kubegfs snapshot create "$dir" --name "$id"
kubegfs fs rm "$dir/file"
kubegfs snapshot restore "$id"
kubegfs fs get -q "$dir/file" "$tmp/out"
if [ "$(cat "$tmp/in")" != "$(cat "$tmp/out")" ]; then
  echo "FAIL: the file read back after restoring snapshot $id differs" >&2
  exit 1
fi
kubegfs snapshot delete "$id"
kubegfs fs rm -r "$dir"
echo "OK: wrote, snapshotted, restored and read back $dir/file"
