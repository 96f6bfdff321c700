#!/bin/bash
# Whole-VM snapshots against a VM monitor that goes wrong (fake-qemu.py):
# whatever QMP does, a guest the daemon stopped is resumed (or the error
# says it is paused), the image gets a snapshot only when QEMU saved its
# half, replies are matched to their commands, job ids are never reused,
# and a SIGTERM during a job that never ends stops the daemon at once.
. "$SRCDIR/serve/lib.sh"
TMO=1000
PEER=
# vmstart MODE: a fake VM in MODE, a daemon on a fresh image that talks to it
vmstart() {
    rm -f "$T/vm.sock" "$T/state"
    python3 "$SRCDIR/serve/fake-qemu.py" "$T/vm.sock" "$1" "$T/state" "$(awk "BEGIN{print $TMO/1000}")" &
    PEER=$!
    DAEMONS+=("$PEER")
    for _ in $(seq 50); do [ -S "$T/vm.sock" ] && break; sleep 0.1; done
    qemu-img create -q -f qcow2 "$T/i.qcow2" 16M
    start "$T/i.qcow2" v --qmp "$T/vm.sock" --qmp-timeout $TMO
}
vmstop() { stop v; kill "$PEER" 2>/dev/null; wait "$PEER" 2>/dev/null; }
vmstate() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$T/state" "$1"; }
img_has() { qemu-img snapshot -l -U "$T/i.qcow2" | awk 'NR > 2 {print $2}' | grep -qx "$1"; }
running() { [ "$(vmstate running)" = True ] || fail "$1: the VM is left paused (log $(vmstate log))"; }

# 1. stop answered after the timeout, or the connection closing after it:
#    the guest may be stopped, so it is resumed (over a new connection)
for mode in stop_slow stop_close; do
    vmstart $mode
    "$P" snapshot -c a --vm --socket "$T/v.sock" 2>"$T/err" && fail "$mode: snapshot succeeded"
    running "$mode"
    img_has a && fail "$mode: the image has the snapshot"
    vmstop
    ok "$mode: error ($(cat "$T/err")), VM running, image unchanged"
done

# 2. the connection breaks during snapshot-save: resumed, error names the step
vmstart save_close
"$P" snapshot -c a --vm --socket "$T/v.sock" 2>"$T/err" && fail "save_close: snapshot succeeded"
grep -q "snapshot-save" "$T/err" || fail "save_close: error does not name the step: $(cat "$T/err")"
running save_close
img_has a && fail "save_close: the image has the snapshot"
vmstop
ok "connection lost in snapshot-save: $(cat "$T/err"); VM running"

# 3. stray replies and events before every answer: ignored; the NVDIMM-only
#    snapshot stops and resumes the guest, the whole-VM one works
vmstart noise
"$P" snapshot -c n1 --socket "$T/v.sock" || fail "noise: NVDIMM-only snapshot"
log=$(vmstate log)
[[ $log == *"'stop'"*"'cont'"* ]] || fail "noise: the guest was not stopped around the flush: $log"
"$P" snapshot -c n2 --vm --socket "$T/v.sock" || fail "noise: whole-VM snapshot"
img_has n1 && img_has n2 || fail "noise: snapshots missing"
running noise
vmstop
ok "stray replies and events are not taken for answers"

# 4. wrong shapes: query-status as a list, a job error as an object
vmstart status_wrongtype
"$P" snapshot -c a --socket "$T/v.sock" 2>"$T/err" && fail "status_wrongtype: snapshot succeeded"
grep -q "query-status" "$T/err" || fail "status_wrongtype: $(cat "$T/err")"
vmstop
vmstart job_errtype
"$P" snapshot -c a --vm --socket "$T/v.sock" 2>"$T/err" && fail "job_errtype: a failed job counted as success"
img_has a && fail "job_errtype: the image has a snapshot QEMU does not"
running job_errtype
vmstop
ok "replies of the wrong shape are errors"

# 5. a job query that times out: the job is dismissed, the next --vm
#    snapshot is not refused with "Job ID ... already in use"
vmstart jobs_slow_once
"$P" snapshot -c a --vm --socket "$T/v.sock" 2>/dev/null && fail "jobs_slow_once: first snapshot succeeded"
"$P" snapshot -c b --vm --socket "$T/v.sock" 2>"$T/err" || fail "second snapshot: $(cat "$T/err")"
img_has b || fail "jobs_slow_once: snapshot b missing"
[ "$(vmstate jobs)" = "{}" ] || fail "jobs left in QEMU: $(vmstate jobs)"
running jobs_slow_once
vmstop
ok "a timed-out job is dismissed; job ids are not reused"

# 6. cont refused after the commit: the snapshot exists and the error says
#    it does and that the VM is paused
vmstart cont_err
"$P" snapshot -c a --vm --socket "$T/v.sock" 2>"$T/err" && fail "cont_err: no error"
grep -q "was created" "$T/err" && grep -q "paused" "$T/err" || fail "cont_err: $(cat "$T/err")"
img_has a || fail "cont_err: the image lacks the snapshot the error says was created"
vmstop
ok "cont refused: $(cat "$T/err")"

# 7. SIGTERM while a snapshot-save job never ends: the daemon stops within
#    seconds, the job is cancelled and dismissed, the guest resumed
vmstart save_never
"$P" snapshot -c a --vm --socket "$T/v.sock" 2>"$T/err" & cl=$!
for _ in $(seq 50); do [[ $(vmstate log) == *query-jobs* ]] && break; sleep 0.1; done
kill -TERM "$PID_v"
t0=$(date +%s)
for _ in $(seq 100); do kill -0 "$PID_v" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID_v" 2>/dev/null && fail "the daemon is still running 10 s after SIGTERM"
wait $cl && fail "save_never: the snapshot succeeded"
running save_never
[ "$(vmstate jobs)" = "{}" ] || fail "save_never: job left in QEMU: $(vmstate jobs)"
img_has a && fail "save_never: the image has the snapshot"
kill "$PEER" 2>/dev/null; wait "$PEER" 2>/dev/null
unmount_ours
check_img "$T/i.qcow2"
ok "SIGTERM during an endless job: stopped in $(( $(date +%s) - t0 )) s, $(cat "$T/err")"
echo "serve-vmfail: all passed"
