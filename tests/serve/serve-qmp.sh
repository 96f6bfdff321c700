#!/bin/bash
# The control socket under bad input (serve-qmp.py), a VM QMP peer that
# never answers or answers garbage (--qmp): errors, the image unchanged, the
# daemon keeps serving; then quit, and QEMU's tools find the image clean.
. "$SRCDIR/serve/lib.sh"
img=$T/q.qcow2
qemu-img create -q -f qcow2 "$img" 16M
qio "$img" "write -P 0x5c 0 1M"
start "$img" q
python3 "$SRCDIR/serve/serve-qmp.py" "$T/q.sock" || fail "serve-qmp.py"
stop q
check_img "$img"
qio "$img" "read -P 0x5c 0 1M"
n=$(qemu-img snapshot -l "$img" | tail -n +3 | awk '{print $2}' | sort | tr '\n' ' ')
[ "$n" = "ev mid " ] || fail "snapshots after the bad-input run: '$n'"
ok "quit after the bad-input run: image clean, data and snapshots there"

# a VM QMP peer that accepts and never says a word, then one that talks garbage
cat > "$T/peer.py" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)
while True:
    c, _ = s.accept()
    if sys.argv[2] == "garbage":
        c.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        c.recv(4096)
        c.sendall(b'this is not json\r\n')
    time.sleep(0.1)
PY
for mode in silent garbage; do
    python3 "$T/peer.py" "$T/vm-$mode.sock" $mode & peer=$!
    DAEMONS+=("$peer")
    for _ in $(seq 50); do [ -S "$T/vm-$mode.sock" ] && break; sleep 0.1; done
    start "$img" v --qmp "$T/vm-$mode.sock" --qmp-timeout 1000
    t0=$(date +%s%N)
    "$P" snapshot -c "vm-$mode" --vm --socket "$T/v.sock" 2>"$T/vm.err" && fail "$mode peer: snapshot succeeded"
    "$P" snapshot -c "nvd-$mode" --socket "$T/v.sock" 2>>"$T/vm.err" && fail "$mode peer: snapshot succeeded"
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    grep -q "VM QMP socket" "$T/vm.err" || fail "$mode peer: $(cat "$T/vm.err")"
    [ "$ms" -lt 8000 ] || fail "$mode peer: took $ms ms"
    "$P" snapshot -l --socket "$T/v.sock" | grep -q -- "-$mode" && fail "$mode peer: image changed"
    "$P" stats --socket "$T/v.sock" >/dev/null || fail "$mode peer: daemon not serving"
    stop v
    kill "$peer"
    ok "$mode VM QMP peer: errors in $ms ms ($(head -1 "$T/vm.err")), image unchanged, daemon serving"
done
check_img "$img"
echo "serve-qmp: all passed"
