# Shared helpers for the mem test scripts.
set -u
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-mem.XXXXXX")
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
# qio_f FMT IMG CMD...: run qemu-io commands; fail when qemu-io cannot open
# the image or exits non-zero, or on any pattern mismatch or error message
qio_f() {
    local fmt=$1 img=$2; shift 2
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    local out
    out=$(qemu-io -f "$fmt" "${args[@]}" "$img" 2>&1) || fail "qemu-io $img (exit $?): $out"
    if grep -q -i "fail\|error\|can't\|cannot" <<<"$out"; then fail "qemu-io $img: $out"; fi
}
qio() { qio_f qcow2 "$@"; }
# check_img IMG: after a clean close an image is clean: no corruption and
# no leaked clusters (qemu-img check exit 0)
check_img() {
    local rc=0
    qemu-img check "$1" >"$T/check.out" 2>&1 || rc=$?
    [ $rc = 0 ] || { cat "$T/check.out"; fail "qemu-img check $1 exit $rc (leaks or corruption after a clean close)"; }
}
# check_img_after_kill IMG: after a kill -9 leaked clusters are allowed
# (exit 3: allocations not yet referenced); corruption is not
check_img_after_kill() {
    local rc=0
    qemu-img check "$1" >"$T/check.out" 2>&1 || rc=$?
    [ $rc = 0 ] || [ $rc = 3 ] || { cat "$T/check.out"; fail "qemu-img check $1 exit $rc after a kill"; }
}
# have_mode MODE: 0 when the kernel has what dirty-tracking MODE (async,
# sync, auto; ro for a read-only mapping) needs (mem-test probe, kfeat.h);
# else prints the SKIP line naming the missing feature and returns 1.
# Scripts run the mode only then, and treat any other non-zero exit of the
# scenario, 77 included, as a failure.
NRAN=0
have_mode() {
    local rc=0 msg
    msg=$("${MEMTEST:?MEMTEST not set}" probe "$1" 2>&1) || rc=$?
    case $rc in
        0) NRAN=$((NRAN + 1)); return 0 ;;
        77) echo "SKIP $1: $msg"; return 1 ;;
        *) fail "mem-test probe $1 exit $rc: $msg" ;;
    esac
}
# finish: "ok", or exit 77 when every mode was skipped
finish() {
    [ "$NRAN" -gt 0 ] || { echo "SKIP: no dirty-tracking mode available on this kernel"; exit 77; }
    echo ok
}
# host_offset IMG OFF: the file offset holding guest offset OFF of a qcow2
# image (where the fault-injecting driver must put its errors)
host_offset() {
    qemu-img map --output=json -f qcow2 "$1" | python3 -c '
import json,sys
off = int(sys.argv[1])
for e in json.load(sys.stdin):
    if e["start"] <= off < e["start"] + e["length"] and e.get("offset") is not None:
        print(e["offset"] + off - e["start"]); break' "$2"
}
