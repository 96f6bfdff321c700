#!/bin/bash
# A libpmemobj program keeps a transactional counter and list in a pool on
# the FUSE file; snapshots while it runs; each snapshot, read with
# qemu-img convert, passes pmempool check and holds a committed state no
# older than what was committed before the request; revert, and the program
# continues from the snapshot.
. "$SRCDIR/serve/lib.sh"
[ -n "${PMDKCOUNTER:-}" ] || { echo "SKIP: built without libpmemobj"; exit 77; }
command -v pmempool >/dev/null || { echo "SKIP: pmempool (pmdk-tools) is not installed"; exit 77; }
export PMEM_IS_PMEM_FORCE=0
img=$T/p.qcow2
qemu-img create -q -f qcow2 "$img" 32M
start "$img" p
F=$T/p.file S=$T/p.sock
"$PMDKCOUNTER" create "$F" || fail "pmemobj_create on the FUSE file"
"$PMDKCOUNTER" run "$F" 20 "$T/progress" >/dev/null || fail "first transactions"

mkfifo "$T/run.in"
"$PMDKCOUNTER" run "$F" 0 "$T/progress" <"$T/run.in" >"$T/run.out" &
rpid=$!
exec 7>"$T/run.in"
declare -A before
for i in 1 2 3; do
    sleep 0.3
    before[$i]=$(cat "$T/progress")
    "$P" snapshot -c "tx$i" --socket "$S" || fail "snapshot tx$i"
done
echo stop >&7
exec 7>&-
wait "$rpid" || fail "the program failed while snapshotted: $(cat "$T/run.out")"
read -r _ final _ rate < "$T/run.out"
echo "  program: counter $final, $rate transactions/s through the FUSE file"
for i in 1 2 3; do
    qemu-img convert -U -f qcow2 -O raw -l "snapshot.name=tx$i" "$img" "$T/tx$i.raw" || fail "convert tx$i"
    rc=0; pmempool check -v "$T/tx$i.raw" > "$T/check.out" 2>&1 || rc=$?
    [ $rc = 0 ] || fail "pmempool check tx$i exit $rc: $(cat "$T/check.out")"
    grep -q consistent "$T/check.out" || fail "pmempool check tx$i: $(cat "$T/check.out")"
    c=$("$PMDKCOUNTER" check "$T/tx$i.raw") || fail "tx$i: $c"
    c=${c#counter }
    [ "$c" -ge "${before[$i]}" ] && [ "$c" -le "$final" ] ||
        fail "tx$i holds counter $c; committed before the request: ${before[$i]}, final $final"
    echo "  tx$i: pmempool check consistent, counter $c (committed before the request: ${before[$i]})"
    [ $i = 2 ] && c2=$c
    rm -f "$T/tx$i.raw"
done
ok "snapshots of a running libpmemobj program are consistent pools with every committed transaction"

"$P" snapshot -a tx2 --socket "$S" || fail "revert tx2"
c=$("$PMDKCOUNTER" check "$F") || fail "after revert: $c"
[ "$c" = "counter $c2" ] || fail "after revert the pool says '$c', the snapshot $c2"
out=$("$PMDKCOUNTER" run "$F" 25 "$T/progress") || fail "continue after revert"
[ "${out%% tx/s*}" = "counter $((c2 + 25))" ] || fail "after 25 more: $out"
ok "revert to tx2 (counter $c2), the program continues: $out"
stop p
check_img "$img"
qemu-img convert -f qcow2 -O raw "$img" "$T/final.raw"
pmempool check -v "$T/final.raw" | grep -q consistent || fail "final pool"
[ "$("$PMDKCOUNTER" check "$T/final.raw")" = "counter $((c2 + 25))" ] || fail "final counter"
ok "after quit: image clean, pool consistent, counter $((c2 + 25))"
echo "serve-pmdk: all passed"
