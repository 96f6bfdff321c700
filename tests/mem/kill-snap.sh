#!/bin/bash
# SIGKILL at random moments (5..300 ms) while a child stores into a mapped
# image, persists ranges, and creates/deletes live snapshots in a loop; the
# same image goes through every round.  After each kill, with QEMU's tools:
#  - qemu-img check exits 0 or 3.  Corruption with the header's dirty bit
#    set is the accepted window (a kill inside a snapshot's metadata
#    update; QEMU has it too): counted, and a copy must come out of
#    `qemu-img check -r all` clean with the data intact.  Corruption
#    without the dirty bit is a bug.
#  - every range the child logged as persisted (logged after pms_persist
#    returned) holds that generation or a newer one (kill-snap-child verify
#    on a qemu-img convert dump; P slots whose only possible content is
#    the persisted pattern are also read with qemu-io -r "read -P").
#  - every snapshot logged as created (after pms_snapshot_create returned
#    0) is listed by qemu-img snapshot -l and its contents (qemu-img convert
#    -l snapshot.name=) are a consistent cut; every snapshot logged as
#    deleted is gone.
#  - the image reopens for writing (in turn: qemu-io, pmemsnap io, the
#    child itself) and is clean afterwards.
# KILL_SNAP_KIND=external: the same with external snapshots (layer files
# IMG@NAME, listed by the directory, dumped with qemu-img convert of the
# layer through its chain; every layer qemu-img check-clean after a kill).
# KILL_SNAP_SEED, KILL_SNAP_ROUNDS (40), KILL_SNAP_SECONDS (45) override.
# Kills at random milliseconds almost never land between two metadata
# writes of a snapshot; KILL_SNAP_STRACE=N (needs strace) instead kills the
# child on entry to its k-th pwrite64 or fdatasync, k random in 1..N
# (N=150: about one kill in twelve lands in the accepted window).
. "$(dirname "$0")/lib.sh"
CHILD=${KILLSNAP_CHILD:?KILLSNAP_CHILD not set}
PMS=${PMEMSNAP:?PMEMSNAP not set}
if [ -n "${PMS_SANITIZED:-}" ]; then     # the normal build runs the full length
    ROUNDS=${KILL_SNAP_ROUNDS:-16}; MIN_ROUNDS=12; BUDGET=${KILL_SNAP_SECONDS:-25}
else
    ROUNDS=${KILL_SNAP_ROUNDS:-40}; MIN_ROUNDS=30; BUDGET=${KILL_SNAP_SECONDS:-45}
fi
STRACE_N=${KILL_SNAP_STRACE:-}
if [ -n "$STRACE_N" ] && ! command -v strace >/dev/null; then
    echo "SKIP: KILL_SNAP_STRACE needs strace"; exit 77
fi
SEED=${KILL_SNAP_SEED:-$((RANDOM * 32768 + RANDOM))}
RANDOM=$SEED
echo "kill-snap: seed $SEED (KILL_SNAP_SEED=$SEED reproduces the delays and child seeds)"

keep() {
    local d
    d=$(mktemp -d /tmp/kill-snap-fail.XXXXXX)
    cp -a "$T"/. "$d"/
    echo "kill-snap: seed $SEED, round ${round:-0}; image, log and dumps kept in $d" >&2
}
bug() { echo "FAIL (bug): $*" >&2; keep; exit 1; }

img=$T/k.qcow2
LIVE=$img
KIND=${KILL_SNAP_KIND:-internal}
log=$T/log
qemu-img create -q -f qcow2 "$img" 8M
modes=()
for m in async sync; do
    rc=0
    "$CHILD" probe "$img" $m 2>"$T/probe.err" || rc=$?
    case $rc in
        0) modes+=("$m") ;;
        77) echo "kill-snap: no $m mode: $(cat "$T/probe.err")" ;;
        *) cat "$T/probe.err"; fail "probe $m exit $rc" ;;
    esac
done
[ ${#modes[@]} -gt 0 ] || { echo "SKIP: userfaultfd unavailable"; exit 77; }
for m in "${modes[@]}"; do modes+=("$m-cap"); done     # the same under a memory cap

# qemu-io -r with "read -P" commands; any mismatch is a bug
qio_read() {
    local img=$1 what=$2; shift 2
    [ $# -gt 0 ] || return 0
    local args=() c out
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -r -f qcow2 "${args[@]}" "$img" 2>&1) || bug "$what: qemu-io: $out"
    if [[ $out == *[Ff]ail* || $out == *[Ee]rror* ]]; then bug "$what: qemu-io: $out"; fi
}

# $T/state of the log and image header (kill-snap-child state): sets
# dirty, last, lround, fatal; present/absent snapshots in the arrays
get_state() {
    "$CHILD" state "$log" "$1" >"$T/state" 2>&1 || bug "state: $(<"$T/state")"
    present=() absent=()
    local k v
    while read -r k v; do
        case $k in
            dirty) dirty=$v ;; last) last=$v ;; round) lround=$v ;; fatal) fatal=$v ;;
            present) present+=("$v") ;; absent) absent+=("$v") ;;
        esac
    done <"$T/state"
}

# the active image's persisted data
verify_active() {
    local img=$1 what=$2 cmds
    qemu-img convert -f qcow2 -O raw "$img" "$T/active.raw" 2>"$T/conv.err" ||
        bug "$what: qemu-img convert: $(<"$T/conv.err")"
    "$CHILD" verify "$log" "$T/active.raw" >"$T/reads" 2>"$T/verify.err" ||
        bug "$what: persisted data lost: $(<"$T/verify.err")"
    mapfile -t cmds <"$T/reads"
    [ -n "$marker" ] && cmds+=("read -P 0x77 7M 4k")     # the reopen's write
    qio_read "$img" "$what" "${cmds[@]}"
    nverify=$((nverify + 1))
}

# the snapshot list against the log (get_state first); the contents of the
# reported ones not checked yet, or of all of them with "all"
declare -A checked
verify_snaps() {
    local img=$1 what=$2 all=${3:-} id name rest args=()
    local -A listed=()
    if [ "$KIND" = external ]; then
        local f
        : >"$T/snl"
        for f in "$LIVE"@*; do           # a repaired copy shares the layers
            [ -f "$f" ] || continue
            listed[${f#"$LIVE"@}]=1
            echo "${f#"$LIVE"@}" >>"$T/snl"
        done
    else
        qemu-img snapshot -l "$img" >"$T/snl" 2>&1 || bug "$what: qemu-img snapshot -l: $(<"$T/snl")"
        while read -r id name rest; do
            [[ $id =~ ^[0-9]+$ ]] && listed[$name]=1
        done <"$T/snl"
    fi
    for name in "${absent[@]}"; do
        [ -z "${listed[$name]:-}" ] || bug "$what: snapshot $name was reported deleted but is listed"
    done
    for name in "${present[@]}"; do
        [ -n "${listed[$name]:-}" ] ||
            bug "$what: snapshot $name was reported created but is not listed: $(<"$T/snl")"
        [ -z "$all" ] && [ -n "${checked[$name]:-}" ] && continue
        if [ "$KIND" = external ]; then
            qemu-img convert -f qcow2 -O raw "$LIVE@$name" "$T/snap-$name.raw" 2>"$T/conv.err"
        else
            qemu-img convert -f qcow2 -O raw -l "snapshot.name=$name" "$img" "$T/snap-$name.raw" \
                2>"$T/conv.err"
        fi || bug "$what: convert snapshot $name: $(<"$T/conv.err")"
        args+=("$T/snap-$name.raw" "$name")
        [ -n "${checked[$name]:-}" ] || nsnapck=$((nsnapck + 1))
        checked[$name]=1
    done
    [ ${#args[@]} -gt 0 ] || return 0
    "$CHILD" verify-snap "$log" "${args[@]}" 2>"$T/verify.err" ||
        bug "$what: snapshot inconsistent: $(<"$T/verify.err")"
    rm -f "$T"/snap-*.raw
}

check_rc() {    # image -> $rc of qemu-img check, output in $T/check.out
    rc=0
    qemu-img check "$1" >"$T/check.out" 2>&1 || rc=$?
    [ "$KIND" = external ] || return 0
    local f lrc                        # and every layer: clean or leaks only
    for f in "$LIVE"@*; do
        [ -f "$f" ] || continue
        lrc=0
        qemu-img check "$f" >"$T/lcheck.out" 2>&1 || lrc=$?
        [ $lrc = 0 ] || [ $lrc = 3 ] || { rc=$lrc; { echo "layer $f:"; cat "$T/lcheck.out"; } >>"$T/check.out"; }
    done
}

marker=
exec {sleepfd}<> <(:)       # read -t on it: a sleep without a process
: >"$log"
nwindow=0 ndirtyok=0 nverify=0 nsnapck=0 nin_create=0 nin_delete=0 nin_open=0
declare -A nmode
start=$SECONDS
round=0
while [ $round -lt "$ROUNDS" ]; do
    if [ $round -ge $MIN_ROUNDS ] && [ $((SECONDS - start)) -ge "$BUDGET" ]; then break; fi
    round=$((round + 1))
    mode=${modes[RANDOM % ${#modes[@]}]}
    nmode[$mode]=$(( ${nmode[$mode]:-0} + 1 ))
    delay=$((5 + RANDOM % 296))
    cseed=$((RANDOM * 32768 + RANDOM))
    if [ -z "$STRACE_N" ]; then
        "$CHILD" run "$img" $round $cseed $mode "$log" 2>"$T/child.err" &
        pid=$!
        read -r -t "$(printf '0.%03d' $delay)" -u $sleepfd || :
        kill -9 $pid 2>/dev/null
        when="kill at $delay ms"
    else                # SIGKILL on entry to the child's Nth pwrite64/fdatasync
        sys=pwrite64; [ $((RANDOM % 4)) = 0 ] && sys=fdatasync
        n=$((1 + RANDOM % STRACE_N))
        strace -f -qq -o /dev/null -e trace=$sys -e inject=$sys:signal=SIGKILL:when=$n \
            "$CHILD" run "$img" $round $cseed $mode "$log" 2>"$T/child.err" &
        pid=$!
        for w in {1..40}; do kill -0 $pid 2>/dev/null || break; read -r -t 0.05 -u $sleepfd || :; done
        kill -0 $pid 2>/dev/null &&      # not reached in 2 s: kill the child itself
            kill -9 "$(sed -n "s/^round $round seed .* pid //p" "$log")" 2>/dev/null
        when="kill at $sys #$n"
    fi
    st=0
    wait $pid 2>/dev/null || st=$?
    # SIGKILL can cut the child's last write(2) short (an "sn" line is
    # several KiB, and the kernel stops copying at a page when a fatal signal
    # is pending): that line was never logged, as if the kill came just
    # before it; drop it, or the next round's first line is glued to it
    if [ -s "$log" ] && [ -n "$(tail -c1 "$log")" ]; then
        truncate -s $(( $(stat -c %s "$log") - $(tail -n1 "$log" | wc -c) )) "$log"
    fi
    [ $st = 137 ] || bug "round $round: child ($mode, seed $cseed) ended by itself with status $st" \
        "before the $when: $(<"$T/child.err")"

    # 1. consistency
    get_state "$img"
    [ "$fatal" = 0 ] || bug "round $round: the child logged a failure: $(grep '^fatal' "$log")"
    if [ "$lround" != $round ] || [ "$last" = round ]; then
        nin_open=$((nin_open + 1)); last=open
    fi
    case $last in
        sc) nin_create=$((nin_create + 1)) ;;
        sd) nin_delete=$((nin_delete + 1)) ;;
    esac
    check_rc "$img"
    repaired=
    case $rc in
        0|3) [ "$dirty" = 1 ] && ndirtyok=$((ndirtyok + 1)) ;;
        2)  [ "$dirty" = 1 ] || bug "round $round ($mode, $when, last log line" \
                "'$last'): qemu-img check reports corruption without the dirty bit: $(<"$T/check.out")"
            nwindow=$((nwindow + 1))
            echo "kill-snap: round $round: accepted window ($when, last log line '$last')"
            cp "$img" "$T/window.qcow2"
            cp "$T/check.out" "$T/window-check.out"
            qemu-img check -r all "$T/window.qcow2" >"$T/repair.out" 2>&1
            check_rc "$T/window.qcow2"
            [ $rc = 0 ] || [ $rc = 3 ] ||
                bug "round $round: qemu-img check -r all left corruption: $(<"$T/check.out")"
            repaired=$T/window.qcow2 ;;
        *)  bug "round $round: qemu-img check exit $rc: $(<"$T/check.out")" ;;
    esac
    was_dirty=$dirty

    # 2. persisted data and reported snapshots (read-only opens)
    verify_active "$img" "round $round"
    verify_snaps "$img" "round $round"
    if [ -n "$repaired" ]; then
        verify_active "$repaired" "round $round, copy repaired by qemu-img"
        verify_snaps "$repaired" "round $round, copy repaired by qemu-img" all
    fi

    # 3. writable reopen, in turn by qemu-io, pmemsnap io, or the next child
    case $((round % 3)) in
        0) out=$(qemu-io -f qcow2 -c "write -P 0x77 7M 4k" "$img" 2>&1) ||
               bug "round $round: qemu-io cannot reopen for writing: $out"
           [[ $out == *[Ff]ail* || $out == *[Ee]rror* ]] && bug "round $round: qemu-io write: $out" ;;
        1) wrc=0
           out=$("$PMS" io -f qcow2 -c "write -P 0x77 7M 4k" "$img" 2>&1) || wrc=$?
           [ $wrc = 0 ] || bug "round $round: pmemsnap io cannot reopen for writing (exit $wrc): $out" ;;
        2) continue ;;
    esac
    check_rc "$img"
    [ $rc = 0 ] || [ $rc = 3 ] ||
        bug "round $round: after a writable reopen qemu-img check exit $rc: $(<"$T/check.out")"
    get_state "$img"
    [ "$dirty" = 0 ] || bug "round $round: dirty bit still set after a writable reopen"
    marker=1
    if [ "$was_dirty" = 1 ]; then       # the reopen repaired it: data and snapshots again
        verify_active "$img" "round $round, after the repairing reopen"
        verify_snaps "$img" "round $round, after the repairing reopen" all
    fi
done

# the end: the last state reopens, every remaining snapshot once more
out=$("$PMS" io -f qcow2 -c "write -P 0x77 7M 4k" "$img" 2>&1) || bug "final reopen: $out"
check_rc "$img"
[ $rc = 0 ] || [ $rc = 3 ] || bug "final qemu-img check exit $rc: $(cat "$T/check.out")"
get_state "$img"
verify_active "$img" "final"
verify_snaps "$img" "final" all
ncreated=$(grep -c '^sn ' "$log")
nfailed=$(grep -c '^sf ' "$log") || :
echo "kill-snap: $round kills in $((SECONDS - start)) s (modes:$(for m in "${!nmode[@]}"; do
    printf ' %s=%s' "$m" "${nmode[$m]}"; done)); $ncreated snapshots created" \
    "($nfailed refused), $nsnapck snapshot dumps checked, $nverify active-image checks"
echo "kill-snap: kills inside pms_snapshot_create: $nin_create, inside pms_snapshot_delete:" \
    "$nin_delete, before the child's open+map finished: $nin_open"
echo "kill-snap: accepted window (corruption with the dirty bit set, repaired by" \
    "qemu-img check -r all, data intact): $nwindow of $round kills;" \
    "dirty bit set but consistent: $ndirtyok"
echo ok
