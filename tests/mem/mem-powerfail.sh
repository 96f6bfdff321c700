#!/bin/bash
# Power loss under a live mapping: mem-test powerfail stores random pages into
# a fresh image (every write-back allocates) through the fault-injecting
# driver, which loses power after a random number of writes and applies a
# random subset of the unflushed ones, torn at 512-byte sectors (SQLite's
# crash VFS).  Between persists the writeback and its metadata checkpoints
# (the write-out thread's background flush + L2 write-back) run.  Then, by
# QEMU's tools: no corruption (leaks allowed), and every 512-byte sector of
# every page holds a state the program produced: the content at the last
# persist that returned, or a later store to that page (the backing file's
# content only if the page was never stored before that persist).  The image
# is an overlay on a backing file holding "generation 0" of every page, so
# an L2 entry that reached the disk before its data shows: the cluster would
# read zeroes (or torn data) instead of the backing file's bytes.
. "$(dirname "$0")/lib.sh"
SEEDS=${POWERFAIL_SEEDS:-6}
verify() {   # RAW LOG
    python3 - "$1" "$2" <<'PY'
import struct, sys
raw, log = sys.argv[1], sys.argv[2]
stores = {}          # page -> list of gens, in order
persisted = 0
for line in open(log):
    f = line.split()
    if f[0] == "gen":
        stores.setdefault(int(f[2]), []).append(int(f[1]))
    elif f[0] == "persisted":
        persisted = int(f[1])
PG = 4096
data = open(raw, "rb").read()
bad = 0
for pg in range(len(data) // PG):
    gens = stores.get(pg, [])
    before = [g for g in gens if g <= persisted]
    ok = set(g for g in gens if g > persisted)
    if before:
        ok.add(before[-1])
    else:
        ok.add(0)                   # the backing file's page
    page = data[pg * PG:(pg + 1) * PG]
    for s in range(8):
        sec = page[s * 512:(s + 1) * 512]
        w = struct.unpack("<64Q", sec)
        if len(set(w)) == 1 and (w[0] & 0xffffffff) == pg:
            g = w[0] >> 32
        else:
            g = -1
        if g not in ok:
            bad += 1
            if bad <= 5:
                print(f"page {pg} sector {s}: holds gen {g}, expected one of {sorted(ok)} "
                      f"(last persist: round {persisted})")
print(f"{bad} bad sectors; {len(stores)} pages stored, last persist round {persisted}")
sys.exit(1 if bad else 0)
PY
}
# generation 0 of every page (word = page number), as the backing file
python3 -c '
import struct, sys
with open(sys.argv[1], "wb") as f:
    for pg in range(16 << 8):
        f.write(struct.pack("<Q", pg) * 512)' "$T/base.raw" || fail "base pattern"
qemu-img convert -q -f raw -O qcow2 "$T/base.raw" "$T/base.qcow2" || fail "qemu-img convert base"
crashes=0
for mode in async sync; do
  have_mode $mode || continue
  for seed in $(seq 1 "$SEEDS"); do
    img=$T/pf.qcow2
    rm -f "$img"
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$img" || fail "qemu-img create"
    after=$(( (seed * 7919) % 2500 + 30 ))
    spec="seed=$seed,crash_after=$after,mode=tear,flush_delay_us=3000"
    "$MEMTEST" powerfail "$img" $mode "$spec" "$seed" >"$T/log" 2>"$T/err" ||
        { cat "$T/err"; fail "$mode seed $seed: mem-test powerfail exit $?"; }
    grep -q '^crashed' "$T/log" && crashes=$((crashes + 1))
    check_img_after_kill "$img"
    qemu-img convert -f qcow2 -O raw "$img" "$T/pf.raw" || fail "qemu-img convert"
    out=$(verify "$T/pf.raw" "$T/log") || { echo "$out"; fail "$mode seed $seed ($spec): wrong content after the power loss"; }
    echo "$mode seed $seed ($spec, $(tail -1 "$T/log")): $out"
  done
done
[ "$NRAN" -eq 0 ] || [ "$crashes" -gt 0 ] || fail "the power loss never happened (crash_after too large)"
finish
