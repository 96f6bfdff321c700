#!/bin/bash
# Persist survives kill -9: a child persists 1 MiB rounds and keeps storing
# afterwards; we kill it at random moments, then check with QEMU's tools that
# every range reported persisted is intact and the image is not corrupt.
. "$(dirname "$0")/lib.sh"
for mode in async sync; do
  have_mode $mode || continue
  img=$T/c-$mode.qcow2
  qemu-img create -q -f qcow2 "$img" 32M || fail "qemu-img create"
  for round in 1 2 3; do
    "$MEMTEST" crash "$img" $mode >"$T/out" 2>"$T/err" &
    pid=$!
    # wait for the first persisted round (slow under sanitizers / load),
    # then kill at a random later moment
    for i in $(seq 1200); do
        grep -q persisted "$T/out" 2>/dev/null && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.05
    done
    sleep 0.$((RANDOM % 5 + 1))
    kill -9 $pid 2>/dev/null; st=0; wait $pid 2>/dev/null || st=$?
    [ $st = 137 ] || { cat "$T/err"; fail "$mode round $round: mem-test crash ended by itself (status $st)"; }
    n=$(grep -c persisted "$T/out")
    [ "$n" -ge 1 ] || { cat "$T/err"; fail "$mode round $round: nothing persisted"; }
    check_img_after_kill "$img"
    cmds=()
    for k in $(sed -n 's/persisted //p' "$T/out"); do
        cmds+=("read -P $(printf 0x%x $((0x10 + k))) ${k}M 1M")
    done
    qio "$img" "${cmds[@]}"
    echo "crash $mode round $round: $n persisted ranges intact"
  done
  # a writable open repairs nothing but leaks; a clean close leaves none
  "$PMEMSNAP" check -r leaks "$img" >"$T/repair.out" 2>&1 || { cat "$T/repair.out"; fail "pmemsnap check -r leaks"; }
  check_img "$img"
done
finish
