# Helpers for the external-snapshot tests: QEMU's tools are the oracle.
set -u
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null ||
    { echo "qemu-img/qemu-io not installed"; exit 77; }
P=${PMEMSNAP:?PMEMSNAP not set}
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-extsnap.XXXXXX")
trap 'rm -rf "$T"' EXIT
cd "$T" || exit 1
FAILS=0
CASE=-
fail() { FAILS=$((FAILS + 1)); echo "FAIL [$CASE]: $*"; }
ok() { echo "ok   [$CASE]${1:+ $1}"; }
begin() { CASE=$1; }
finish() {
    if [ $FAILS -ne 0 ]; then echo "$FAILS failure(s)"; exit 1; fi
    echo "all passed"; exit 0
}
# run CMD...: must succeed; output shown on failure.
run() {
    local out
    out=$("$@" 2>&1) || { fail "command failed: $* :: $(echo "$out" | tail -n 3)"; return 1; }
}
# refuse CMD...: must fail with exactly one line of error output, no crash.
refuse() {
    local out rc
    out=$("$@" 2>&1); rc=$?
    if [ $rc -eq 0 ]; then fail "accepted: $*"; return 1; fi
    if [ $rc -ge 128 ]; then fail "crashed ($rc): $* :: $out"; return 1; fi
    if [ "$(printf '%s\n' "$out" | wc -l)" -ne 1 ]; then
        fail "not a one-line error: $* :: $out"; return 1; fi
    echo "     refused: $out"
}
# check_clean IMG: qemu-img check finds no corruption (leaks allowed with
# LEAKS=1: exit status 3).
check_clean() {
    local out rc
    out=$(qemu-img check -U "$1" 2>&1); rc=$?
    if [ $rc -eq 0 ] || { [ "${LEAKS:-0}" = 1 ] && [ $rc -eq 3 ]; }; then return 0; fi
    fail "qemu-img check $1 ($rc): $(echo "$out" | head -n 5)"; return 1
}
# same IMG RAW: QEMU reads IMG with its chain as the bytes of RAW.
same() {
    local out
    out=$(qemu-img compare -U "$1" -F raw "$2" 2>&1) ||
        { fail "qemu-img compare $1 $2: $out"; return 1; }
}
# snap_ref NAME: QEMU's raw copy of the live image (the state a snapshot
# taken now must keep).
snap_ref() { qemu-img convert -U -O raw img.qcow2 "ref-$1.raw"; }
