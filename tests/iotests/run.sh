#!/bin/bash
# make iotests: QEMU 7.2's own iotests (tests.txt) with our `pmemsnap io` as
# QEMU_IO_PROG, and the same set with QEMU's qemu-io on this machine as the
# reference, then the table: test, QEMU's result, ours, ours expected
# (tests.txt's last column).  Exit 1 when a test expected to pass fails
# with ours while it passes with QEMU's qemu-io.
#
#   run.sh [BUILD_DIR] [TEST...]      (default build, the whole set)
#   IOTESTS_JOBS=N    parallel tests (default 2)
#   IOTESTS_REF=recorded   skip QEMU's run, use tests.txt's recorded column
#   IOTESTS_WORK=DIR  work directories (default $TMPDIR/pms-iotests-UID; kept
#                     for the *.out.bad diffs, replaced by the next run)
set -u
. "$(dirname "$0")/lib.sh"
build=${1:-build}
shift || true
[ "${build#/}" = "$build" ] && build=$IOT_REPO/$build
pms=$build/tools/pmemsnap
[ -x "$pms" ] || { iot_log "no $pms: build first (make)"; exit 1; }
for p in qemu-io qemu-img; do
    command -v $p >/dev/null || { iot_log "$p not found (apt-get install qemu-utils)"; exit 1; }
done
src=$(iot_fetch) || exit 1
jobs=${IOTESTS_JOBS:-2}
if [ $# -gt 0 ]; then set=("$@"); else mapfile -t set < <(iot_set); fi

# Work directories: some tests refuse a TEST_DIR with characters outside
# [-_a-zA-Z0-9/] (197, 215: "Suspicious TEST_DIR"), so not under .cache.
work=${IOTESTS_WORK:-${TMPDIR:-/tmp}/pms-iotests-$(id -u)}
ours_w=$work/ours
ref_w=$work/qemu
iot_log "${#set[@]} tests with pmemsnap io ($pms), $jobs at a time"
declare -A ours ref rec exp
while read -r t st; do ours[$t]=$st; done < <(iot_check "$src" "$ours_w" "$pms" "$jobs" "${set[@]}")
while read -r t q b e; do rec[$t]=$q; exp[$t]=$e; done < <(sed -e 's/#.*//' -e '/^\s*$/d' "$IOT_DIR/tests.txt")
if [ "${IOTESTS_REF:-}" = recorded ]; then
    for t in "${set[@]}"; do ref[$t]="${rec[$t]:-?}"; done
    refname="qemu-io (recorded)"
else
    iot_log "the same tests with QEMU's qemu-io ($(command -v qemu-io))"
    while read -r t st; do ref[$t]=$st; done < <(iot_check "$src" "$ref_w" "$(command -v qemu-io)" "$jobs" "${set[@]}")
    refname="qemu-io"
fi

printf '%-22s %-20s %-10s %s\n' test "$refname" ours "ours expected"
np=0 nq=0 both=0 bad=0
for t in "${set[@]}"; do
    q=${ref[$t]:-?} o=${ours[$t]:-?} e=${exp[$t]:-?}
    mark=
    [ "$q" = pass ] && nq=$((nq + 1))
    [ "$o" = pass ] && np=$((np + 1))
    [ "$q" = pass ] && [ "$o" = pass ] && both=$((both + 1))
    if [ "$e" = pass ] && [ "$o" != pass ] && [ "$q" = pass ]; then mark="  <- REGRESSION"; bad=$((bad + 1)); fi
    [ "$e" != pass ] && [ "$o" = pass ] && mark="  (newly passing: update tests.txt)"
    printf '%-22s %-20s %-10s %s%s\n' "$t" "$q" "$o" "$e" "$mark"
done
echo "pass: qemu-io $nq of ${#set[@]}, pmemsnap io $np of ${#set[@]}; $both of the $nq that pass with qemu-io pass with ours"
echo "output diffs: $ours_w/scratch/*.out.bad (ours), $ref_w/scratch (qemu-io); logs: */check.log"
[ $bad -eq 0 ] || { echo "$bad test(s) expected to pass failed"; exit 1; }
