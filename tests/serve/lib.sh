# Shared helpers for the serve tests: a scratch dir, a daemon per test,
# QEMU's tools as the oracle.
set -u
[ -e /dev/fuse ] || { echo "SKIP: /dev/fuse is absent"; exit 77; }
command -v fusermount3 >/dev/null || { echo "SKIP: fusermount3 is not installed"; exit 77; }
# fusectl lets cleanup abort a dead daemon's connection (nothing hangs on it)
[ -e /sys/fs/fuse/connections/ ] && ! grep -q " /sys/fs/fuse/connections " /proc/mounts &&
    mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-serve.XXXXXX")
DAEMONS=()
cleanup() {
    local p
    for p in "${DAEMONS[@]}"; do kill -9 "$p" 2>/dev/null; done
    unmount_ours

    rm -rf "$T"
}
# Abort and detach the FUSE mounts under $T (a killed daemon's), so nothing
# waits on them; only ours: the connection is named by the mount's device.
unmount_ours() {
    local dev m
    while read -r _ _ dev _ m _; do
        case $m in "$T"/*) ;; *) continue ;; esac
        echo 1 > "/sys/fs/fuse/connections/${dev#0:}/abort" 2>/dev/null
        umount -l "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null
    done < /proc/self/mountinfo
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
P=$PMEMSNAP
# qio IMG CMD...: qemu-io commands, fail on a mismatch or an error
qio() {
    local img=$1; shift
    local args=() c out
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -f qcow2 "${args[@]}" "$img" 2>&1) || fail "qemu-io: $out"
    if grep -q -i "fail\|error\|mismatch" <<<"$out"; then fail "qemu-io $img: $out"; fi
}
qio_ro() {   # the same, read-only and shared (an image a daemon has open)
    local img=$1; shift
    local args=() c out
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -r -U -f qcow2 "${args[@]}" "$img" 2>&1) || fail "qemu-io: $out"
    if grep -q -i "fail\|error\|mismatch" <<<"$out"; then fail "qemu-io $img: $out"; fi
}
check_img() {   # exit 0 only: after a clean shutdown nothing may leak either
    local rc=0
    qemu-img check "$1" >"$T/check.out" 2>&1 || rc=$?
    [ $rc = 0 ] || [ "${2:-}" = leaks-ok -a $rc = 3 ] || { cat "$T/check.out"; fail "qemu-img check $1 exit $rc"; }
}
# start IMG NAME [OPTIONS...]: daemon serving IMG on $T/NAME.file, socket $T/NAME.sock
start() {
    local img=$1 n=$2; shift 2
    "$P" serve "$img" --fuse "$T/$n.file" --socket "$T/$n.sock" --pidfile "$T/$n.pid" \
        --log "$T/$n.log" "$@" || fail "serve $img did not start"
    local pid; pid=$(cat "$T/$n.pid")
    DAEMONS+=("$pid")
    eval "PID_$n=$pid"
}
# stop NAME: quit over the socket, wait for the process to end
stop() {
    local n=$1 pid; pid=$(cat "$T/$n.pid")
    qmp "$T/$n.sock" '{"execute":"quit"}' >/dev/null || fail "quit"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && fail "daemon $n did not exit after quit"
    # in the sanitizer build the daemon's reports (leaks at exit too) land in its log
    if grep -q "Sanitizer\|runtime error" "$T/$n.log"; then
        cat "$T/$n.log" >&2
        fail "daemon $n: sanitizer report"
    fi
    return 0
}
# qmp SOCK JSON...: negotiate, send each command, print each reply (one line each)
qmp() {
    python3 "$SRCDIR/serve/qmp-send.py" "$@"
}
