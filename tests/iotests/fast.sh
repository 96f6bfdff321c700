#!/bin/bash
# meson test (suite 'iotests'): a few of QEMU 7.2's iotests that pass with
# `pmemsnap io` as QEMU_IO_PROG (see run.sh for the whole set).  Exits 77
# when the QEMU source package cannot be fetched or QEMU's tools are absent.
set -u
. "$(dirname "$0")/lib.sh"
FAST=(001 004 029 033 039 052 069 098 103 114 137 154 179 187 214 226 250 268 305 313)
pms=${PMEMSNAP:?PMEMSNAP must name the pmemsnap binary}
for p in qemu-img qemu-io; do
    command -v $p >/dev/null || { echo "SKIP: $p not installed"; exit 77; }
done
src=$(iot_fetch) || { echo "SKIP: cannot fetch the QEMU 7.2 source package"; exit 77; }
w=$(mktemp -d "${TMPDIR:-/tmp}/iotests-fast-XXXXXX")   # no '.': see run.sh
trap 'rm -rf "$w"' EXIT
fail=0 n=0
while read -r t st; do
    n=$((n + 1))
    echo "$t $st"
    if [ "$st" != pass ]; then
        fail=1
        [ -f "$w/run/scratch/$t.out.bad" ] && diff -u "$src/$t.out" "$w/run/scratch/$t.out.bad" | head -n 40
    fi
done < <(iot_check "$src" "$w/run" "$pms" 1 "${FAST[@]}")
[ $n -eq ${#FAST[@]} ] || { echo "only $n of ${#FAST[@]} tests reported"; cat "$w/run/check.log"; exit 1; }
exit $fail
