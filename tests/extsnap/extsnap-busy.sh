#!/bin/bash
# Deletes of every kind while the live image is written and read
# (extsnap-api busy), then QEMU checks what they left: every file check
# clean, the remaining snapshot and the live image equal to the expected
# bytes, the deleted snapshots' layers gone.  Also run by the
# ThreadSanitizer build (suite tsan).
. "$(dirname "$0")/lib.sh"
begin busy
"$EXTSNAP_API" busy "$T" || fail "extsnap-api busy"
for s in a b d; do [ -e img.qcow2@$s ] && fail "deleted snapshot $s still has its layer"; done
same img.qcow2@c ref-c.raw; check_clean img.qcow2@c
same img.qcow2 ref-live.raw; check_clean img.qcow2
[ -z "$(qemu-img info -U img.qcow2@c | grep '^backing file:')" ] ||
    fail "c still has a backing file after its parents were deleted"
ok
finish
