#!/bin/bash
# bench: qemu-img bench's header line for the same options, the completion
# line, failure on out-of-range requests, and that a write bench leaves a
# consistent image with the requested pattern.
. "$(dirname "$0")/lib.sh"
command -v qemu-img >/dev/null || { echo "SKIP: no qemu-img"; exit 77; }
truncate -s 16M r.raw
for o in "-c 100" "-c 50 -d 4 -s 64k" "-c 10 -S 1M -s 4k -o 64k" "-c 20 -w --pattern=7 -d 2" \
         "-c 40 -w -d 4 --flush-interval=8" "-c 5 -t none -n -i threads" "-c 10 -s 0" \
         "-c 10 -s 0 -w -o 16M"; do
    # shellcheck disable=SC2086
    "$P" bench -f raw $o r.raw > p.out 2>&1; prc=$?
    # shellcheck disable=SC2086
    qemu-img bench -f raw $o r.raw > q.out 2>&1; qrc=$?
    [ $prc -eq $qrc ] || fail "bench $o: exit $prc vs $qrc"
    head -n -1 p.out > p.h; head -n -1 q.out > q.h
    same "bench $o header" p.h q.h
    tail -1 p.out | grep -qE '^Run completed in [0-9]+\.[0-9]{3} seconds\.$' ||
        fail "bench $o: last line '$(tail -1 p.out)'"
done
expect_rc 1 "bench beyond end" "$P" bench -f raw -c 1 -o 32M r.raw
grep -q "^pmemsnap: Failed request: " err || fail "failed-request message: $(cat err)"
expect_rc 1 "flush interval < depth" "$P" bench -f raw -w -d 8 --flush-interval=2 r.raw
grep -q "Flush interval can't be smaller than depth" err || fail "flush interval message"
expect_rc 1 "--pattern without -w" "$P" bench -f raw --pattern=3 r.raw
expect_rc 1 "-w on read-only open attempt with -U" "$P" bench -f raw -w -U r.raw

"$P" create -f qcow2 w.qcow2 4M >/dev/null 2>&1 && "$P" info w.qcow2 >/dev/null 2>&1 || { finish; }
expect_rc 0 "qcow2 write bench depth 16" "$P" bench -w -c 2000 -d 16 -s 4k --pattern=0x5c -S 8k w.qcow2
qemu-img check -q w.qcow2 && pass "image consistent after parallel writes" || fail "check after bench"
qemu-io -c 'read -P 0x5c 0 4k' -c 'read -P 0 4k 4k' -c 'read -P 0x5c 4088k 4k' w.qcow2 | grep -q 'verification failed' &&
    fail "bench data wrong" || pass "bench wrote the pattern at the right offsets"
finish
