#!/bin/bash
# kill -9 at random points of external snapshot create, revert and delete
# (the CLI, SIGKILL after a random delay), then: the live path opens with
# qemu-img and holds the old or the new state, every snapshot left holds its
# content (qemu-img compare against QEMU's raw copy taken when it was made),
# every layer is qemu-img check clean (leaks allowed).
. "$(dirname "$0")/lib.sh"
ROUNDS=${EXTSNAP_KILL_ROUNDS:-60}
[ -n "${PMS_SANITIZED:-}" ] && ROUNDS=20
SZ=16M
LEAKS=1
RANDOM=${EXTSNAP_KILL_SEED:-4242}
qemu-img create -q -f qcow2 img.qcow2 $SZ
qemu-io -c "write -P 0x01 0 $SZ" img.qcow2 >/dev/null
n=0                      # snapshots made so far (names s1, s2, ...)
set +u                   # empty associative arrays count as unset
declare -A HAVE=()       # snapshot name -> 1 while it should exist
# the live image's expected content, as QEMU reads it
qemu-img convert -O raw img.qcow2 live.raw

# kill_run MAXDELAY_US CMD...: start CMD, SIGKILL it after a random delay
# (it may finish first); sets KILLED=1 when the kill landed
kill_run() {
    local max=$1; shift
    "$@" >/dev/null 2>&1 &
    local pid=$!
    local us=$(( (RANDOM * 32768 + RANDOM) % max ))
    sleep "$(printf '0.%06d' "$us")"
    KILLED=0
    kill -9 $pid 2>/dev/null && KILLED=1
    wait $pid 2>/dev/null
}

# an interrupted delete-by-commit leaves a marker: the next writable open
# finishes the delete
# an interrupted delete by commit is finished by the next writable open, or
# by deleting the same snapshot again (both ways, in turn)
FINISH_BY_DELETE=0
finish_marked() {
    local mk name
    mk=$(ls -a | grep -m1 '^\.img\.qcow2@.*\.deleting$') || return 0
    name=${mk#.img.qcow2@}; name=${name%.deleting}
    FINISH_BY_DELETE=$((1 - FINISH_BY_DELETE))
    if [ $FINISH_BY_DELETE = 1 ]; then
        run "$P" snapshot -d "$name" img.qcow2
        ls -a | grep -q '\.deleting$' && fail "delete marker left after deleting $name again"
    else
        run "$P" io -c "read 0 512" img.qcow2
        ls -a | grep -q '\.deleting$' && fail "delete marker left after an open"
    fi
}

verify() {
    local what=$1 f
    finish_marked
    if ! qemu-img info img.qcow2 >/dev/null 2>&1; then fail "$what: live image does not open"; return; fi
    check_clean img.qcow2
    for f in img.qcow2@*; do
        [ -e "$f" ] || continue
        local s=${f#img.qcow2@}
        check_clean "$f"
        if [ -z "${HAVE[$s]:-}" ]; then fail "$what: unexpected layer $f"; continue; fi
        same "$f" "ref-$s.raw"
    done
    for s in "${!HAVE[@]}"; do
        [ -e "img.qcow2@$s" ] || fail "$what: snapshot $s lost"
    done
    ls -a | grep -q 'extsnap-tmp' && { run "$P" io -c "read 0 512" img.qcow2;
        ls -a | grep -q 'extsnap-tmp' && fail "$what: temporary overlay left after an open"; }
}

# one operation: op 0 create, 1 revert, 2 delete; killed at a random
# instant, or at a named step (PMS_EXTSNAP_KILL_AT) when POINT is set
# (POINT "none": runs to the end)
do_op() {
    local op=$1 s=$2 point=${3:-}
    local env=(env)
    [ -n "$point" ] && env=(env PMS_EXTSNAP_KILL_AT=$point)
    case $op in
    0)  cp live.raw ref-$s.raw
        if [ -n "$point" ]; then "${env[@]}" "$P" snapshot -c $s --external img.qcow2 >/dev/null 2>&1; KILLED=$(( $? == 137 ))
        else kill_run 20000 "$P" snapshot -c $s --external img.qcow2; fi
        [ -e img.qcow2@$s ] && HAVE[$s]=1
        # an interrupted create may leave the layer as a second name of the
        # live inode: the next open removes it (the snapshot was not taken)
        if [ -e img.qcow2@$s ] && [ "$(stat -c %i img.qcow2@$s)" = "$(stat -c %i img.qcow2)" ]; then
            run "$P" io -c "read 0 512" img.qcow2
            [ -e img.qcow2@$s ] && fail "create leftover not removed"
            unset "HAVE[$s]"
        fi
        same img.qcow2 live.raw ;;
    1)  if [ -n "$point" ]; then "${env[@]}" "$P" snapshot -a $s img.qcow2 >/dev/null 2>&1; KILLED=$(( $? == 137 ))
        else kill_run 15000 "$P" snapshot -a $s img.qcow2; fi
        # old or new state
        if ! qemu-img compare -U img.qcow2 -F raw live.raw >/dev/null 2>&1 &&
           ! qemu-img compare -U img.qcow2 -F raw ref-$s.raw >/dev/null 2>&1; then
            fail "revert $s (killed=$KILLED): live is neither the old nor the new state"
        fi ;;
    2)  if [ -n "$point" ]; then "${env[@]}" "$P" snapshot -d $s img.qcow2 >/dev/null 2>kill-err.txt; KILLED=$(( $? == 137 ))
        else kill_run 80000 "$P" snapshot -d $s img.qcow2; fi
        finish_marked
        [ -e img.qcow2@$s ] || unset "HAVE[$s]"
        same img.qcow2 live.raw ;;
    esac
    CASE="op $op $s ${point:-random} killed=$KILLED"
    verify "$CASE"
    qemu-img convert -O raw img.qcow2 live.raw
}
store() {
    run "$P" io -c "write -P $(($1 % 200 + 2)) $(( (RANDOM % 16) * 1048576 + RANDOM )) 70000" img.qcow2
    qemu-img convert -O raw img.qcow2 live.raw
}

# every named step once: a tree where base has a layer child (c1) and the
# live image as children, so a delete streams into both
n=0
store 1; n=$((n + 1)); do_op 0 s$n none
for point in create-overlay create-link create-rename; do
    store $n; n=$((n + 1)); do_op 0 s$n $point
    [ "$KILLED" = 1 ] || fail "no kill at $point"
done
store 5; n=$((n + 1)); do_op 0 s$n none
do_op 1 s1 revert-overlay
[ "$KILLED" = 1 ] || fail "no kill at revert-overlay"
do_op 1 s1 none
[ "$KILLED" = 0 ] || fail "revert killed"
store 7
for point in delete-streaming delete-streamed-layer delete-rebased-layer delete-streamed-live \
             delete-unlink; do
    do_op 2 s1 $point
    [ "$KILLED" = 1 ] || fail "no kill at $point: $(cat kill-err.txt)"
done
do_op 2 s1 none
[ -e img.qcow2@s1 ] && fail "s1 still there after a full delete"
# delete by commit: a parent whose only child is a smaller layer
for point in delete-commit-marker delete-committing delete-committed delete-commit-renamed none; do
    run "$P" io -c "write -P 9 0 3M" img.qcow2; qemu-img convert -O raw img.qcow2 live.raw
    n=$((n + 1)); par=s$n; do_op 0 $par none
    store $n; n=$((n + 1)); chd=s$n; do_op 0 $chd none
    ino=$(stat -c %i img.qcow2@$par)
    do_op 2 $par $point
    [ "$point" = none ] || [ "$KILLED" = 1 ] || fail "no kill at $point: $(cat kill-err.txt)"
    [ -e img.qcow2@$par ] && fail "$par still there after the delete was finished"
    [ "$(stat -c %i img.qcow2@$chd)" = "$ino" ] || fail "$point: not deleted by commit (the child's file is not the parent's)"
done

kills=0
for ((round = 1; round <= ROUNDS; round++)); do
    # some stores first, so that every state differs
    store $round
    op=$((RANDOM % 3))
    [ ${#HAVE[@]} -eq 0 ] && op=0
    [ ${#HAVE[@]} -ge 6 ] && op=2
    names=("${!HAVE[@]}")
    if [ $op = 0 ]; then n=$((n + 1)); s=s$n; else s=${names[RANDOM % ${#names[@]}]}; fi
    do_op $op $s
    kills=$((kills + KILLED))
done
CASE=summary
echo "$ROUNDS rounds, $kills killed before finishing"
[ $kills -ge 1 ] || fail "none of $ROUNDS random kills landed before the end (delays too long?)"
ok
finish
