# Shared helpers for the mem test scripts.
set -u
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-mem.XXXXXX")
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
# qio IMG CMD...: run qemu-io commands, fail on any pattern mismatch
qio() {
    local img=$1; shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    local out
    out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) || fail "qemu-io: $out"
    if grep -q -i "fail\|error" <<<"$out"; then fail "qemu-io: $out"; fi
}
check_img() {   # no corruption (0 = clean, 3 = leaks only)
    local rc=0
    qemu-img check "$1" >"$T/check.out" 2>&1 || rc=$?
    [ $rc = 0 ] || [ $rc = 3 ] || { cat "$T/check.out"; fail "qemu-img check $1 exit $rc"; }
}
uffd_wp_async() {   # exits 77 in the caller's place when a mode is missing
    :
}
