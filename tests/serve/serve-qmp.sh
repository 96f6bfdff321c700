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

# names from the image need not be UTF-8 (qemu-img takes any bytes); what
# the daemon sends stays valid JSON (the bad bytes become U+FFFD)
qemu-img snapshot -c "$(printf 'bad\xff\xfename')" "$img"
start "$img" q
out=$(qmp "$T/q.sock" '{"execute":"snapshot-list"}') || fail "snapshot-list with a non-UTF-8 name: $out"
python3 -c 'import json,sys; l=json.loads(sys.argv[1])["return"]
assert any(s["name"] == "bad\ufffd\ufffdname" for s in l), l' "$out" || fail "list: $out"
stop q
qemu-img snapshot -d "$(printf 'bad\xff\xfename')" "$img"
ok "a snapshot name that is not UTF-8 is listed as valid JSON"

# VM QMP peers that go wrong: one that accepts and never says a word, one
# that talks garbage, one that never accepts (its backlog fills), one whose
# replies have the wrong shapes (objects for lists, null for strings)
cat > "$T/peer.py" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(0 if sys.argv[2] == "noaccept" else 8)
if sys.argv[2] == "noaccept":
    time.sleep(3600)
while True:
    c, _ = s.accept()
    if sys.argv[2] == "garbage":
        c.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        c.recv(4096)
        c.sendall(b'this is not json\r\n')
    elif sys.argv[2] == "wrongshape":
        c.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        for line in c.makefile('rb'):
            m = json.loads(line); cmd = m['execute']
            r = {"running": True} if cmd == 'query-status' else \
                [{"drv": None, "ro": "no", "node-name": 7}] if cmd == 'query-named-block-nodes' else \
                7 if cmd == 'query-jobs' else {}
            c.sendall(json.dumps({"return": r, "id": m.get("id")}).encode() + b'\r\n')
    time.sleep(0.1)
PY
for mode in silent garbage noaccept wrongshape; do
    python3 "$T/peer.py" "$T/vm-$mode.sock" $mode & peer=$!
    DAEMONS+=("$peer")
    for _ in $(seq 50); do [ -S "$T/vm-$mode.sock" ] && break; sleep 0.1; done
    start "$img" v --qmp "$T/vm-$mode.sock" --qmp-timeout 1000
    t0=$(date +%s%N)
    "$P" snapshot -c "vm-$mode" --vm --socket "$T/v.sock" 2>"$T/vm.err" && fail "$mode peer: snapshot succeeded"
    # (the wrong-shape peer answers stop and cont well: an NVDIMM-only
    # snapshot works with it, so it is only asked for a whole-VM one)
    [ $mode = wrongshape ] || { "$P" snapshot -c "nvd-$mode" --socket "$T/v.sock" 2>>"$T/vm.err" &&
                                fail "$mode peer: snapshot succeeded"; }
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    grep -q "VM" "$T/vm.err" || fail "$mode peer: $(cat "$T/vm.err")"
    [ "$ms" -lt 8000 ] || fail "$mode peer: took $ms ms"
    "$P" snapshot -l --socket "$T/v.sock" | grep -q -- "vm-$mode\|nvd-$mode" && fail "$mode peer: image changed"
    "$P" stats --socket "$T/v.sock" >/dev/null || fail "$mode peer: daemon not serving"
    stop v
    kill "$peer"
    ok "$mode VM QMP peer: errors in $ms ms ($(head -1 "$T/vm.err")), image unchanged, daemon serving"
done
check_img "$img"
echo "serve-qmp: all passed"
