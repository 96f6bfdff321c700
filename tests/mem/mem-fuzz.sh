#!/bin/bash
# Differential fuzzing of the memory device and snapshots (memfuzz.c): a
# few fixed seeds (MEMFUZZ_SEEDS, MEMFUZZ_OPS) against the model and QEMU's
# tools.  Last, the stall the fuzzer found under the smallest cap pms_map
# accepts (four 4 KiB chunks, synchronous tracking, prefetch, a 1 ms
# writeback period: seed 15, ops 16-18, 20, 21): with a dirty limit under a
# page every fault waited the whole dirty wait, and one store took minutes.
# Fixed by the limit's floor (DIRTY_MIN_SEQ_BYTES); on the commit before it
# the fuzzer's frozen copy hung 4 runs of 4, 0 of 4 after.
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
d=$T/tiny; mkdir -p "$d"
MF_CRASH=0 MF_TINYCAP=4 MF_ONLY=16,17,18,20,21 timeout 60 "$MEMFUZZ" 15 "$d" 21 >"$d/log" 2>&1 ||
    { tail -5 "$d/log" >&2; fail "memfuzz seed 15 under a 4-chunk cap (exit $?; 124: stalled)"; }
echo "seed 15 under a 4-chunk cap, ops 16-18 20 21: ok"
finish
