#!/bin/bash
# make demo: a word-count hash table kept in a qcow2 image mapped as memory,
# live snapshots while it runs, qemu-img looking at them, and a revert.
set -eu
BUILD=${1:-build}
DEMO=$BUILD/demo/pms-demo
dir=$(mktemp -d /tmp/pmemsnap-demo.XXXXXX)
trap 'rm -rf "$dir"' EXIT
img=$dir/pmem.qcow2
echo "== pmemsnap demo: persistent memory in a qcow2 image =="
echo
"$DEMO" run "$img" | tee "$dir/run.out"
echo
echo "== what QEMU sees: qemu-img snapshot -l =="
qemu-img snapshot -l "$img"
echo
echo "== qemu-img check =="
qemu-img check "$img" || true
echo
echo "== reading snap-2 with QEMU's own tools (qemu-img convert -l snapshot.name=snap-2) =="
qemu-img convert -f qcow2 -O raw -l snapshot.name=snap-2 "$img" "$dir/snap2.raw"
"$DEMO" inspect "$dir/snap2.raw" | tee "$dir/inspect.out"
a=$(grep -A2 "after revert" "$dir/run.out" | sed 's/^[^:]*://')
b=$(grep -A2 "snap-2:" "$dir/inspect.out" | sed 's/^[^:]*://')
echo
if [ "$a" = "$b" ]; then
    echo "RESULT: memory after the revert matches QEMU's reading of snap-2 exactly."
else
    echo "RESULT: MISMATCH between the reverted memory and snap-2"; exit 1
fi

# the VM scene: a guest whose NVDIMM pmemsnap serves (demo/vm.sh)
bash "$(dirname "$0")/vm.sh" "$BUILD"
