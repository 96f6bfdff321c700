#!/bin/bash
# The file protocol driver (lib/block/drivers/file.c):
#  - cache modes none and directsync open the image with O_DIRECT (strace),
#    writeback does not; unaligned requests (odd offsets, lengths and the
#    qcow2 metadata's small updates) still give QEMU's bytes: the same
#    writes through `qemu-io -t none` on a copy, then qemu-img compare, and
#    qemu-io read -P on ours; qemu-img check clean.
#  - no fstat per write: 200 single-page writes make a handful of
#    newfstatat calls (the open's), not one or more per write.
# Scratch files live in TMPDIR (/tmp by default), a file system that
# accepts O_DIRECT (ext4/xfs/btrfs; tmpfs since Linux 6.6).
set -u
PMS=${PMEMSNAP:?PMEMSNAP not set}
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v strace >/dev/null || { echo "SKIP: strace not installed (apt-get install strace)"; exit 77; }
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-file.XXXXXX")
trap 'rm -rf "$T"' EXIT
# does this file system take O_DIRECT at all?  (QEMU would refuse too)
qemu-img create -q -f raw "$T/probe" 4096
if ! qemu-io -t none -f raw -c "read 0 512" "$T/probe" >/dev/null 2>&1; then
    echo "SKIP: $T does not accept O_DIRECT (qemu-io -t none fails too)"; exit 77
fi
qio() {     # qio IMG FMT CMD...: qemu-io, any failure or mismatch fails
    local img=$1 fmt=$2; shift 2
    local args=() c out
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -f "$fmt" "${args[@]}" "$img" 2>&1) || fail "qemu-io $img: $out"
    grep -qi "fail\|error\|can't" <<<"$out" && fail "qemu-io $img: $out"
    return 0
}

# 1. O_DIRECT on open for none/directsync only
qemu-img create -q -f qcow2 "$T/a.qcow2" 16M
for mode in none directsync writeback writethrough; do
    ASAN_OPTIONS=${ASAN_OPTIONS:-}:detect_leaks=0 strace -f -qq -e trace=openat -o "$T/st" "$PMS" io -t $mode -f qcow2 -c "write -P 1 0 4k" \
        "$T/a.qcow2" >/dev/null 2>"$T/err" || fail "pmemsnap io -t $mode: $(cat "$T/err")"
    line=$(grep 'a.qcow2", O_RDWR' "$T/st") || fail "-t $mode: no read-write open in strace: $(cat "$T/st")"
    case $mode in
        none|directsync) [[ $line == *O_DIRECT* ]] || fail "-t $mode opened without O_DIRECT: $line" ;;
        *) [[ $line != *O_DIRECT* ]] || fail "-t $mode opened with O_DIRECT: $line" ;;
    esac
    echo "-t $mode: ${line#*, }"
done

# 2. unaligned writes under -t none: QEMU's bytes
ops=("write -P 0x11 1000 3000" "write -P 0x22 65000 1100" "write -P 0x33 131072 512"
     "write -P 0x44 200001 70001" "write -z 70000 5000" "write -P 0x55 16776832 384"
     "write -P 0x66 1048576 1048576" "write -P 0x77 3 1")
for fmt in qcow2 raw; do
    img=$T/d.$fmt ref=$T/ref.$fmt
    qemu-img create -q -f $fmt "$img" 16M
    cp "$img" "$ref"
    args=(); for c in "${ops[@]}"; do args+=(-c "$c"); done
    out=$("$PMS" io -t none -f $fmt "${args[@]}" "$img" 2>&1) || fail "pmemsnap io -t none ($fmt): $out"
    out=$(qemu-io -t none -f $fmt "${args[@]}" "$ref" 2>&1) || fail "qemu-io -t none ($fmt): $out"
    qemu-img compare -f $fmt -F $fmt "$img" "$ref" >"$T/cmp" 2>&1 ||
        fail "$fmt written with -t none differs from qemu-io's: $(cat "$T/cmp")"
    qio "$img" $fmt "read -P 0x11 1000 3000" "read -P 0 0 3" "read -P 0x77 3 1" "read -P 0 4 996" \
        "read -P 0x22 65000 1100" "read -P 0x44 200001 70001" "read -P 0 70000 5000" \
        "read -P 0x55 16776832 384" "read -P 0x66 1048576 1048576"
    [ $fmt = qcow2 ] && { qemu-img check -q "$img" || fail "qemu-img check after -t none writes"; }
    [ "$(stat -c %s "$img")" = "$(stat -c %s "$ref")" ] || [ $fmt = qcow2 ] ||
        fail "raw file size $(stat -c %s "$img") != qemu-io's $(stat -c %s "$ref")"
    # and read back unaligned through our own -t none path
    out=$("$PMS" io -t directsync -f $fmt -c "read -P 0x22 65000 1100" -c "read -P 0x44 200001 70001" \
        "$img" 2>&1) || fail "pmemsnap io -t directsync read ($fmt): $out"
    echo "-t none ($fmt): same bytes as qemu-io -t none"
done

# 3. no fstat per write
qemu-img create -q -f qcow2 "$T/f.qcow2" 64M
args=(); for i in $(seq 0 199); do args+=(-c "write -P 3 $((i * 8192)) 4096"); done
ASAN_OPTIONS=${ASAN_OPTIONS:-}:detect_leaks=0 strace -f -qq -c -e trace=newfstatat,fstat,statx -o "$T/sc" "$PMS" io -f qcow2 "${args[@]}" \
    "$T/f.qcow2" >/dev/null 2>"$T/err" || fail "pmemsnap io: $(cat "$T/err")"
n=$(awk '$NF ~ /^(newfstatat|fstat|statx)$/ { s += $4 } END { print s + 0 }' "$T/sc")
[ "$n" -le 20 ] || fail "$n stat calls for 200 page writes (the write path stats the file): $(cat "$T/sc")"
qio "$T/f.qcow2" qcow2 "read -P 3 0 4096" "read -P 0 4096 4096" "read -P 3 1630208 4096"
qemu-img check -q "$T/f.qcow2" || fail "qemu-img check after the page writes"
echo "200 page writes: $n stat calls"
echo ok
