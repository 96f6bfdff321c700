#!/bin/bash
# Hardening scenarios of the memory device (mem-hard.c), judged by QEMU's
# tools: swapped-out dirty pages are written back; block I/O while mapped
# returns EIO instead of raising SIGBUS; discard while mapped; racing API
# calls on one handle.  HARD_CASES selects a subset (the TSan build runs
# "race" only).
. "$(dirname "$0")/lib.sh"
cases=${HARD_CASES:-swap eio discard eintr revert storeread snapio race}

# -- swap: a swap file and a memory cgroup smaller than the working set ------
run_swap() {
    [ "$(id -u)" = 0 ] || { echo "SKIP swap: needs root (swapon, cgroups)"; return; }
    local img=$T/s.qcow2 sw=${TMPDIR:-/var/tmp}/pms-swap.$$ cg= mb=96 rc=0
    qemu-img create -q -f qcow2 "$img" 128M
    fallocate -l 256M "$sw" && chmod 600 "$sw" && mkswap "$sw" >/dev/null &&
        swapon "$sw" || { rm -f "$sw"; echo "SKIP swap: swapon refused here"; return; }
    if [ -d /sys/fs/cgroup/memory ]; then                         # cgroup v1
        cg=/sys/fs/cgroup/memory/pms-swap.$$
        mkdir "$cg" && echo 48M >"$cg/memory.limit_in_bytes" && echo 100 >"$cg/memory.swappiness" || cg=
    elif grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then   # v2
        cg=/sys/fs/cgroup/pms-swap.$$
        mkdir "$cg" && echo 48M >"$cg/memory.max" || cg=
    fi
    if [ -n "$cg" ]; then
        sh -c 'echo $$ >"$1/cgroup.procs" && exec "$2" swap "$3" "$4"' sh "$cg" "$HARD" "$img" $mb || rc=$?
    else
        echo "no memory cgroup: swapping with MADV_PAGEOUT"
        SWAP_PAGEOUT=1 "$HARD" swap "$img" $mb || rc=$?
    fi
    [ -n "$cg" ] && rmdir "$cg" 2>/dev/null
    swapoff "$sw"; rm -f "$sw"
    [ $rc = 77 ] && { echo "SKIP swap (see above)"; return; }
    [ $rc = 0 ] || fail "swap scenario exit $rc"
    local cmds=() i
    for ((i = 0; i < mb; i++)); do cmds+=("read -P $((0x10 + i % 0xe0)) $((i << 20)) 1M"); done
    qio "$img" "${cmds[@]}"
    check_img "$img"
    echo "swap ok"
}

# -- EIO: read errors injected on the file under guest offset 2M -------------
run_eio() {
    local img=$T/e.qcow2
    qemu-img create -q -f qcow2 "$img" 16M
    qemu-io -f qcow2 -c "write -P 0x5a 0 8M" "$img" >/dev/null
    local host
    host=$(host_offset "$img" 2097152)
    [ -n "$host" ] || fail "no host offset"
    "$HARD" eio "$img" 2097152 "$host" || fail "eio scenario"
    qio "$img" "read -P 0x5a 0 2M" "read -P 0x5a 2101248 1044480" "read -P 0x61 3145728 1" \
        "read -P 0x62 3145729 1" "read -P 0x63 3145730 1" "read -P 9 4194304 1"
    check_img "$img"
    echo "eio ok"
}

run_discard() {
    local img=$T/d.qcow2
    qemu-img create -q -f qcow2 "$img" 16M
    "$HARD" discard "$img" || fail "discard scenario"
    qio "$img" "read -P 0x77 0 1M" "read -P 0 1M 4M" "read -P 0x77 5M 1M" \
        "read -P 0x77 6M 1M"
    check_img "$img"
    echo "discard ok"
}

run_eintr() {
    local img=$T/i.qcow2
    qemu-img create -q -f qcow2 "$img" 256M
    "$HARD" eintr "$img" || fail "eintr scenario"
    check_img "$img"
    echo "eintr ok"
}

run_revert() {
    local mode img
    for mode in auto sync; do
        img=$T/v-$mode.qcow2
        qemu-img create -q -f qcow2 "$img" 32M
        "$HARD" revert "$img" $mode || fail "revert scenario ($mode)"
        check_img "$img"
        qemu-img snapshot -l "$img" | grep -q '\bb\b' || fail "snapshot b missing"
    done
    echo "revert ok"
}

run_storeread() {
    local img=$T/sr.qcow2 rc=0
    qemu-img create -q -f qcow2 "$img" 64M
    timeout 60 "$HARD" storeread "$img" 5 || rc=$?
    [ $rc = 124 ] && fail "storeread: hung (pms_pread while stores fault pages in)"
    [ $rc = 0 ] || fail "storeread scenario (exit $rc)"
    check_img "$img"
    echo "storeread ok"
}

run_snapio() {
    local img=$T/si.qcow2 rc=0
    qemu-img create -q -f qcow2 "$img" 32M
    timeout 60 "$HARD" snapio "$img" 40 || rc=$?
    [ $rc = 124 ] && fail "snapio: hung (pms_pwrite beside sync-tracked stores and snapshots)"
    [ $rc = 77 ] && { echo "snapio skipped (no sync write-protect)"; return; }
    [ $rc = 0 ] || fail "snapio scenario (exit $rc)"
    check_img "$img"
    echo "snapio ok"
}

run_race() {
    local img=$T/r.qcow2
    qemu-img create -q -f qcow2 "$img" 32M
    "$HARD" race "$img" "${RACE_SECONDS:-5}" || fail "race scenario"
    check_img "$img"
    echo "race ok"
}

for c in $cases; do "run_$c"; done
echo ok
