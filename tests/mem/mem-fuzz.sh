#!/bin/bash
# Differential fuzzing of the memory device and snapshots (memfuzz.c): a
# few fixed seeds (MEMFUZZ_SEEDS, MEMFUZZ_OPS) against the model and QEMU's
# tools.  (Known open: under the smallest cap pms_map accepts, four 4 KiB
# chunks, with synchronous tracking, prefetch and a 1 ms writeback period,
# seed 15 with MF_TINYCAP=4 MF_ONLY=16,17,18,20,21 stalls: one store keeps
# taking write-protect faults on the page it was given.)
. "$(dirname "$0")/lib.sh"
have_mode auto || { echo "SKIP: no userfaultfd write protection"; exit 77; }
seeds=${MEMFUZZ_SEEDS:-1 2 3 4 5 6 7 8}
ops=${MEMFUZZ_OPS:-40}
for s in $seeds; do
    d=$T/s$s; mkdir -p "$d"
    MF_CRASH=0 timeout 300 "$MEMFUZZ" "$s" "$d" "$ops" >"$d/log" 2>&1 ||
        { tail -5 "$d/log" >&2; fail "memfuzz seed $s (exit $?): $(grep -m1 BUG "$d/log")"; }
    echo "seed $s: $(grep -m1 '^config' "$d/log"), $ops ops: ok"
    rm -rf "$d"
done
finish
