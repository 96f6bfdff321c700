#!/bin/bash
# The safepoint's signal versus the application's own handlers, and a stop
# that fails (sp-signal.c, one case per process); the snapshots taken are
# checked with qemu-img.
. "$(dirname "$0")/lib.sh"
SPSIGNAL=${SPSIGNAL:-$(dirname "$MEMTEST")/sp-signal}
run() {     # run CASE NSNAP [ENV=VALUE]
    local c=$1 ns=$2 img=$T/$1.qcow2 rc=0
    qemu-img create -q -f qcow2 "$img" 16M
    env -u PMEMSNAP_SIGNAL ${3:+"$3"} "$SPSIGNAL" "$c" "$img" || rc=$?
    [ $rc = 77 ] && { echo "SKIP $c"; return; }
    [ $rc = 0 ] || fail "case $c exit $rc"
    out=$(qemu-img check "$img" 2>&1) || fail "qemu-img check after $c: $out"
    n=$(qemu-img snapshot -l "$img" | grep -c '^[0-9]')
    [ "$n" = "$ns" ] || fail "$c: $n snapshots in the image, want $ns"
}
run own 3
run blocked 3
run env 2 PMEMSNAP_SIGNAL=RTMAX-2
run env-taken 0 PMEMSNAP_SIGNAL=RTMIN+6
run env-bad 0 PMEMSNAP_SIGNAL=bogus
run replaced 1
run procfail 1
echo ok
