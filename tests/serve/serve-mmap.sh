#!/bin/bash
# Snapshots of a file other processes map: dirty pages of a mapping that
# was never msync'ed are in the snapshot; a writer storing during the
# snapshot leaves a snapshot where every word was stored before it (a crash
# at one instant); revert shows the snapshot's bytes to a reader that had
# the page mapped.  Snapshots are read back with qemu-img convert.
. "$SRCDIR/serve/lib.sh"
img=$T/m.qcow2
qemu-img create -q -f qcow2 "$img" 64M
start "$img" m
F=$T/m.file S=$T/m.sock
snap_raw() {   # snap_raw NAME OUT: the snapshot's bytes as a raw file
    qemu-img convert -U -f qcow2 -O raw -l "snapshot.name=$1" "$img" "$2" || fail "convert $1"
}

# 1. stores through a mapping, no msync, the storing process gone
"$SERVETEST" fill "$F" 1M 2M 0xaa || fail "fill"
"$P" snapshot -c s1 --socket "$S" || fail "snapshot s1"
snap_raw s1 "$T/s1.raw"
cmp <(dd if="$T/s1.raw" bs=1M skip=1 count=2 status=none) <(head -c 2M /dev/zero | tr '\0' '\252') ||
    fail "s1 lacks the unsynced mapped stores"
cmp <(head -c 1M "$T/s1.raw") <(head -c 1M /dev/zero) || fail "s1: bytes before the range"
ok "never-msynced stores of an exited mapper are in the snapshot"

# 2. a writer storing during the snapshot: every word it stored before the
#    request is there (>= generation 1), nothing torn or invented
mkfifo "$T/w.in" "$T/w.out"
"$SERVETEST" writer "$F" 16M <"$T/w.in" >"$T/w.out" &
wpid=$!
exec 7>"$T/w.in" 8<"$T/w.out"
read -r -u 8 line && [ "$line" = ready ] || fail "writer: $line"
for i in 1 2 3; do
    "$P" snapshot -c "live$i" --socket "$S" || fail "snapshot live$i"
done
echo stop >&7
read -r -u 8 lastgen || fail "writer did not finish"
wait "$wpid" || fail "writer failed"
exec 7>&- 8<&-
for i in 1 2 3; do
    snap_raw "live$i" "$T/live.raw"
    out=$("$SERVETEST" gens "$T/live.raw" 16M) || fail "live$i: $out"
    max=${out##* }
    [ "$max" -le "$lastgen" ] || fail "live$i holds generation $max > $lastgen"
    rm -f "$T/live.raw"
    echo "  live$i: $out (writer reached $lastgen)"
done
"$P" stats --socket "$S" | grep -E "last-(snapshot|precopy|final-flush|commit)-us"
ok "snapshots while a writer stores: complete up to the request, never beyond the writer"

# 3. revert with a mapped reader
"$SERVETEST" fill "$F" 32M 4k 0x11 || fail "fill 0x11"
"$P" snapshot -c r1 --socket "$S" || fail "snapshot r1"
"$SERVETEST" fill "$F" 32M 4k 0x22 || fail "fill 0x22"
mkfifo "$T/r.in" "$T/r.out"
"$SERVETEST" reader "$F" 32M 0x22 <"$T/r.in" >"$T/r.out" &
rpid=$!
exec 7>"$T/r.in" 8<"$T/r.out"
read -r -u 8 line && [ "$line" = mapped ] || fail "reader: $line"
"$P" snapshot -a r1 --socket "$S" || fail "revert r1"
echo go >&7
read -r -u 8 seen || fail "reader died"
wait "$rpid" || fail "reader failed"
exec 7>&- 8<&-
[ "$seen" = "0x11 whole" ] || fail "mapped reader sees '$seen' after the revert, expected 0x11"
ok "revert: a reader with the page mapped sees the snapshot's bytes"

# 4. external snapshots (--kind external): the layer file beside the image
#    holds the unsynced mapped stores; revert shows the layer to a mapped reader
ei=$T/e.qcow2
qemu-img create -q -f qcow2 "$ei" 16M
start "$ei" e
"$SERVETEST" fill "$T/e.file" 0 64k 0x44 || fail "fill 0x44"
"$P" snapshot -c x1 --kind external --socket "$T/e.sock" || fail "external snapshot"
"$SERVETEST" fill "$T/e.file" 0 64k 0x55 || fail "fill 0x55"
qio_ro "$ei@x1" "read -P 0x44 0 64k"
# --external, as the local form spells it, is the same
"$P" snapshot -c x2 --external --socket "$T/e.sock" || fail "snapshot --external --socket"
[ -f "$ei@x2" ] || fail "--external over the socket made no layer"
"$P" snapshot -d x2 --socket "$T/e.sock" || fail "delete x2"
"$P" snapshot -c x3 --external --kind internal --socket "$T/e.sock" 2>/dev/null &&
    fail "--external with --kind internal accepted"
"$P" snapshot -l --socket "$T/e.sock" | grep -q " x1 .*external" || fail "list: $("$P" snapshot -l --socket "$T/e.sock")"
mkfifo "$T/e.in" "$T/e.out"
"$SERVETEST" reader "$T/e.file" 0 0x55 <"$T/e.in" >"$T/e.out" &
rpid=$!
exec 7>"$T/e.in" 8<"$T/e.out"
read -r -u 8 line && [ "$line" = mapped ] || fail "reader: $line"
"$P" snapshot -a x1 --socket "$T/e.sock" || fail "external revert"
echo go >&7
read -r -u 8 seen || fail "reader died"
wait "$rpid" || fail "reader failed"
exec 7>&- 8<&-
[ "$seen" = "0x44 whole" ] || fail "after the external revert the reader sees '$seen'"
stop e
check_img "$ei"
check_img "$ei@x1"
qio "$ei" "read -P 0x44 0 64k"
ok "external snapshot of unsynced mapped stores; external revert seen by a mapped reader"

stop m
check_img "$img"
qio "$img" "read -P 0x11 32M 4k" "read -P 0 33M 1M"
ok "after quit: image clean, reverted bytes persisted"
echo "serve-mmap: all passed"
