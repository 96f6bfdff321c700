#!/bin/bash
# Argument handling: usage errors exit 1 with one "pmemsnap: " line on
# stderr, nothing is created or written after a refusal, --help/--version.
. "$(dirname "$0")/lib.sh"

expect_rc 0 "--help" "$P" --help && grep -q '^Usage: ' out || fail "--help text"
expect_rc 0 "--version" "$P" --version && grep -q 'pmemsnap version' out || fail "--version text"
expect_rc 0 "io --help" "$P" io --help

oneline() { # stderr is exactly one line starting with "pmemsnap: "
    [ "$(wc -l < err)" -eq 1 ] && grep -q '^pmemsnap: ' err || fail "$1: stderr not one 'pmemsnap: ' line: $(cat err)"
}
for args in "" "frob" "info" "info a b" "check" "map" "snapshot x" "snapshot -l -c s x" \
            "convert onlyone" "create" "io -Z x" "bench" "bench -d 0 x" "bench -c -1 x" \
            "info --output=xml x" "check -r foo x" "create -f vmdk x 1M" "io -t bogus x" \
            "io -i bogus x" "bench -s 0 x" "bench --pattern=300 -w x" "create -f qcow2 x 1Q" \
            "map --start-offset=zz x" "resize" "resize x" "resize x 1Q"; do
    # shellcheck disable=SC2086
    expect_rc 1 "usage error: '$args'" "$P" $args && oneline "$args"
    [ -e x ] && fail "'$args' created a file"
done

# create: bad options never leave a file behind
expect_rc 1 "create unknown -o" "$P" create -f qcow2 -o foo=bar c.qcow2 1M
grep -q "Invalid parameter 'foo'" err || fail "unknown -o message: $(cat err)"
[ -e c.qcow2 ] && fail "create with bad -o left a file"
expect_rc 1 "create raw with qcow2 option" "$P" create -f raw -o cluster_size=4k c.raw 1M
expect_rc 1 "create without size" "$P" create -f qcow2 c.qcow2
grep -q "needs a size" err || fail "size message"
expect_rc 1 "create: missing backing file" "$P" create -f qcow2 -b nope.qcow2 -F qcow2 c.qcow2
[ -e c.qcow2 ] && fail "create with missing backing left a file"

# opening failures: exit 1, one line, the file is not created/modified
for cmd in "info" "check" "map" "snapshot -l" "snapshot -c s" "io -c flush" "bench -c 1"; do
    # shellcheck disable=SC2086
    expect_rc 1 "$cmd on missing file" "$P" $cmd missing.img && oneline "$cmd"
    [ -e missing.img ] && fail "$cmd created missing.img"
done

# garbage that is not an image: probed as raw by info, refused as qcow2
head -c 70000 /dev/urandom > junk
cp junk junk.orig
expect_rc 1 "-f qcow2 on junk" "$P" info -f qcow2 junk && oneline "info -f qcow2 junk"
expect_rc 1 "io -f qcow2 write on junk" "$P" io -f qcow2 -c "write 0 4k" junk
expect_rc 1 "snapshot -c on junk as qcow2" "$P" snapshot -f qcow2 -c s junk
cmp -s junk junk.orig || fail "refused image was modified"

# a qcow2 header claiming an absurd size / bad cluster bits: refused, no crash
"$P" create -f qcow2 bad.qcow2 1M >/dev/null || fail "create bad.qcow2"
printf '\x3f' | dd of=bad.qcow2 bs=1 seek=23 conv=notrunc status=none  # cluster_bits=63
cp bad.qcow2 bad.orig
for cmd in "info" "check" "map" "io -c map" "snapshot -l"; do
    # shellcheck disable=SC2086
    "$P" $cmd bad.qcow2 >out 2>err
    rc=$?
    { [ "$rc" -ne 0 ] && [ "$rc" -lt 128 ]; } || fail "$cmd on bad cluster_bits: rc=$rc"
done
cmp -s bad.qcow2 bad.orig || fail "corrupt image was modified by a read-only command"

# check on raw: qemu-img exit code 63
"$P" create -f raw r.raw 1M >/dev/null
expect_rc 63 "check on raw -> 63" "$P" check r.raw
grep -q "does not support checks" err || fail "check raw message"
# writes to a read-only open are refused by io
expect_rc 1 "io -r write" "$P" io -r -c "write 0 4k" r.raw
grep -q "read-only" err || fail "io -r message: $(cat err)"
finish
