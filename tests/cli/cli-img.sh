#!/bin/bash
# info / map / check / snapshot -l / create output vs qemu-img 7.2, on raw and
# qcow2 images written by qemu and by pmemsnap.  JSON is compared byte for
# byte (pmemsnap prints keys in QEMU's QDict order) and also parsed with
# python3 to give a readable key-level diff when it fails.
. "$(dirname "$0")/lib.sh"
command -v qemu-img >/dev/null || { echo "SKIP: no qemu-img"; exit 77; }

jsondiff() { # jsondiff DESC A B: byte comparison; on mismatch a semantic diff
    if cmp -s "$2" "$3"; then pass "$1"; return; fi
    if ! python3 - "$2" "$3" <<'PY'
import json, sys
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
if a != b:
    print("JSON differs:\n ours=%s\n qemu=%s" % (a, b)); sys.exit(1)
PY
    then fail "$1 (values)"; return; fi
    same "$1 (bytes, key order)" "$2" "$3"
}

cmp_cmd() { # cmp_cmd DESC IMG ARGS...: pmemsnap vs qemu-img, same args
    local desc=$1 img=$2; shift 2
    "$P" "$@" "$img" > p.out 2> p.err; prc=$?
    qemu-img "$@" "$img" > q.out 2> q.err; qrc=$?
    [ "$prc" -eq "$qrc" ] || fail "$desc: exit $prc vs qemu-img $qrc"
    sed -i 's/^qemu-img: /pmemsnap: /' q.err
    case " $* " in
        *json*) jsondiff "$desc" p.out q.out ;;
        *) same "$desc" p.out q.out ;;
    esac
}

# --- raw, with holes and data
truncate -s 4M h.raw
qemu-io -f raw -c 'write -P 1 64k 64k' -c 'write -P 0 1M 128k' h.raw >/dev/null
truncate -s 0 empty.raw
for img in h.raw empty.raw; do
    cmp_cmd "info json $img" "$img" info -f raw --output=json
    cmp_cmd "info human $img" "$img" info -f raw
    cmp_cmd "map json $img" "$img" map -f raw --output=json
    cmp_cmd "map human $img" "$img" map -f raw
done
cmp_cmd "check raw" h.raw check -f raw

# --- qcow2 images (skip if the qcow2 driver is not there yet)
qemu-img create -q -f qcow2 q.qcow2 4M
if ! "$P" info q.qcow2 >/dev/null 2>&1; then echo "SKIP qcow2 part: $($P info q.qcow2 2>&1)"; finish; fi
qemu-io -c 'write -P 3 0 64k' -c 'write -z 128k 64k' -c 'write 1M 128k' \
        -c 'write -P 4 200k 4k' q.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b q.qcow2 -F qcow2 top.qcow2
qemu-io -c 'write 2M 64k' -c 'write -z 1M 64k' -c 'discard 0 64k' top.qcow2 >/dev/null
qemu-img snapshot -c snap1 q.qcow2
qemu-img snapshot -c 'second snapshot' q.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on,refcount_bits=8,lazy_refcounts=on e.qcow2 8M
qemu-io -c 'write 4k 4k' -c 'write -z 64k 8k' e.qcow2 >/dev/null
mkdir sub; qemu-img create -q -f qcow2 -b ../q.qcow2 -F qcow2 sub/rel.qcow2
"$P" create -f qcow2 ours.qcow2 3M >/dev/null
"$P" io -c 'write -P 9 0 96k' -c 'write -z 1M 64k' ours.qcow2 >/dev/null
"$P" snapshot -c mine ours.qcow2
for img in v2.qcow2 sub/rel.qcow2; do
    cmp_cmd "info json $img" "$img" info --output=json
    cmp_cmd "info human $img" "$img" info
done
for img in q.qcow2 top.qcow2 e.qcow2 ours.qcow2; do
    cmp_cmd "info json $img" "$img" info --output=json
    cmp_cmd "info human $img" "$img" info
    cmp_cmd "map json $img" "$img" map --output=json
    cmp_cmd "map human $img" "$img" map
    cmp_cmd "check human $img" "$img" check
    cmp_cmd "check json $img" "$img" check --output=json
    cmp_cmd "snapshot -l $img" "$img" snapshot -l
    # sequentially: both open the image read-write and take QEMU's locks
    "$P" io -c map "$img" > p.out 2>&1; qemu-io -c map "$img" > q.out 2>&1
    same "io map $img" p.out q.out
done
cmp_cmd "info --backing-chain human" sub/rel.qcow2 info --backing-chain
cmp_cmd "info --backing-chain json" top.qcow2 info --backing-chain --output=json
cmp_cmd "info options after the file name" top.qcow2 info --output=json -U
cmp_cmd "map --start-offset/--max-length" top.qcow2 map --output=json --start-offset=64k --max-length=1M
# a backing loop: like qemu-img, nothing on stdout, one error line
qemu-img create -q -f qcow2 la.qcow2 1M
qemu-img create -q -f qcow2 -b la.qcow2 -F qcow2 lb.qcow2
qemu-img rebase -u -b lb.qcow2 -F qcow2 la.qcow2
for o in "" "--output=json"; do
    # shellcheck disable=SC2086
    "$P" info --backing-chain $o lb.qcow2 > p.out 2> p.err && fail "info --backing-chain $o of a loop: exit 0"
    [ -s p.out ] && fail "info --backing-chain $o of a loop printed: $(head -c 200 p.out)"
    [ "$(wc -l < p.err)" = 1 ] || fail "info --backing-chain $o of a loop: $(head -3 p.err)"
done

# a leaked cluster: exit 3, same report; -r leaks repairs it like qemu-img
"$P" create -f qcow2 leak.qcow2 1M >/dev/null
python3 - <<'PY'
import struct
f = open('leak.qcow2', 'r+b'); h = f.read(104)
rt = struct.unpack('>Q', h[48:56])[0]; f.seek(rt); rb = struct.unpack('>Q', f.read(8))[0]
f.seek(rb + 2 * 5); f.write(struct.pack('>H', 1)); f.seek(6 * 65536 - 1); f.write(b'\0')
PY
cmp_cmd "check leaked human" leak.qcow2 check
same "check leaked stderr" p.err q.err
cmp_cmd "check leaked json" leak.qcow2 check --output=json
cp leak.qcow2 leak2.qcow2; cp leak.qcow2 leak0.qcow2
"$P" check -r leaks leak.qcow2 > p.out 2>/dev/null; prc=$?
qemu-img check -r leaks leak2.qcow2 > q.out 2>/dev/null; qrc=$?
[ $prc -eq $qrc ] || fail "check -r leaks exit $prc vs $qrc"
same "check -r leaks output" p.out q.out
qemu-img check -q leak.qcow2 && pass "repaired image is clean for qemu-img" || fail "repair"
# --output=json after a repair keeps the first pass's *-fixed counts
for r in leaks all; do
    cp leak0.qcow2 lj.qcow2; "$P" check -r $r --output=json lj.qcow2 > p.out 2>/dev/null; prc=$?
    cp leak0.qcow2 lj.qcow2; qemu-img check -r $r --output=json lj.qcow2 > q.out 2>/dev/null; qrc=$?
    [ $prc -eq $qrc ] || fail "check -r $r --output=json exit $prc vs $qrc"
    jsondiff "check -r $r --output=json" p.out q.out
done

# create: the Formatting line matches qemu-img's for the same options
for o in "" "-o cluster_size=4k" "-o compat=0.10" "-o extended_l2=on,cluster_size=32k" \
         "-o refcount_bits=8,lazy_refcounts=on" "-o preallocation=off" "-b q.qcow2 -F qcow2"; do
    # shellcheck disable=SC2086
    "$P" create -f qcow2 $o c1.qcow2 2M > p.out 2>&1
    # shellcheck disable=SC2086
    qemu-img create -f qcow2 $o c1.qcow2 2M > q.out 2>&1
    sed -i 's/^qemu-img: /pmemsnap: /' q.out
    same "create line '$o'" p.out q.out
    "$P" create -f qcow2 $o c2.qcow2 2M >/dev/null 2>&1   # ours, to check
    qemu-img check -q c2.qcow2 && pass "qemu-img check on create '$o'" || fail "create '$o' image"
done
"$P" create -f raw r1.raw 1M > p.out; qemu-img create -f raw r1.raw 1M > q.out
same "create line raw" p.out q.out
# raw sizes are rounded up to a whole sector, as qemu-img's file-posix does
for o in "" "-o preallocation=full"; do
    # shellcheck disable=SC2086
    "$P" create -f raw $o r1.raw 1000 > p.out; qemu-img create -f raw $o r2.raw 1000 > q.out
    sed -i 's/r2\.raw/r1.raw/' q.out
    same "create raw '$o' 1000: Formatting line" p.out q.out
    same "create raw '$o' 1000: same bytes as qemu-img" r1.raw r2.raw
done
# a 0-byte qcow2 image has no L1 table (offset 0), as qemu-img makes it;
# growing it gives one and leaks nothing
for o in "" "-o preallocation=metadata" "-o cluster_size=512,compat=0.10"; do
    # shellcheck disable=SC2086
    "$P" create -q -f qcow2 $o z-p.qcow2 0; qemu-img create -q -f qcow2 $o z-q.qcow2 0
    same "create '$o' size 0: same bytes as qemu-img" z-p.qcow2 z-q.qcow2
    expect_rc 0 "resize the size-0 '$o' image" "$P" resize -q z-p.qcow2 1M
    qemu-img check -q z-p.qcow2 || fail "check after growing the size-0 '$o' image"
done

# resize: grow qcow2 (relative and absolute), shrink needs --shrink
"$P" create -f qcow2 rs.qcow2 1M >/dev/null
"$P" io -c 'write -P 0x42 960k 64k' rs.qcow2 >/dev/null
expect_rc 0 "resize +1M" "$P" resize rs.qcow2 +1M && grep -qx 'Image resized.' out || fail "resize message"
expect_rc 0 "resize 5M" "$P" resize rs.qcow2 5M
[ "$(qemu-img info --output=json rs.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = 5242880 ] &&
    pass "qemu-img sees the new size" || fail "size after resize"
qemu-io -c 'read -P 0x42 960k 64k' -c 'read -P 0 1M 4M' rs.qcow2 | grep -q 'verification failed' &&
    fail "data after resize" || pass "data kept, new space reads zero"
qemu-img check -q rs.qcow2 || fail "check after resize"
expect_rc 1 "resize shrink without --shrink" "$P" resize rs.qcow2 -- -1M
grep -q -- '--shrink' err || fail "shrink message"
# shrink qcow2 as qemu-img does: same contents, same file length, check clean
for o in "" "-o extended_l2=on" "-o cluster_size=4k" "-o compat=0.10" snap; do
    oo=$o; [ "$o" = snap ] && oo=""
    # shellcheck disable=SC2086
    qemu-img create -q -f qcow2 $oo sh.qcow2 256M
    qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 100M 2M' -c 'write -P 3 250M 6M' \
            -c 'write -z 101M 64k' sh.qcow2 >/dev/null
    if [ "$o" = snap ]; then
        qemu-img snapshot -c s1 sh.qcow2
        qemu-io -c 'write -P 4 100M 512k' sh.qcow2 >/dev/null
    fi
    cp sh.qcow2 shq.qcow2; cp sh.qcow2 sh0.qcow2
    expect_rc 0 "resize --shrink qcow2 '$o'" "$P" resize --shrink sh.qcow2 100900k
    qemu-img resize -q --shrink shq.qcow2 100900k
    qemu-img check -q sh.qcow2 || fail "check after shrink '$o'"
    qemu-img compare -q sh.qcow2 shq.qcow2 || fail "contents after shrink '$o' differ from qemu-img's"
    # (not longer than qemu-img's: QEMU may allocate an empty L2 table for
    # the L1 entry that holds the new end, which we do not)
    [ "$(stat -c %s sh.qcow2)" -le "$(stat -c %s shq.qcow2)" ] &&
        [ "$(stat -c %s sh.qcow2)" -lt "$(stat -c %s sh0.qcow2)" ] ||
        fail "file length after shrink '$o': $(stat -c %s sh.qcow2), qemu-img $(stat -c %s shq.qcow2)"
    # grow again: the cut tail reads as qemu-img shows it (zeroes past the
    # partial last cluster)
    "$P" resize sh.qcow2 256M >/dev/null; qemu-img resize -q shq.qcow2 256M
    qemu-img compare -q sh.qcow2 shq.qcow2 || fail "contents after shrink+grow '$o' differ"
    if [ "$o" = snap ]; then
        "$P" snapshot -a s1 sh.qcow2; qemu-img snapshot -a s1 shq.qcow2
        qemu-img compare -q sh.qcow2 shq.qcow2 || fail "snapshot after shrink differs"
        qemu-img check -q sh.qcow2 || fail "check after applying the snapshot"
    fi
done
qemu-img create -q -f qcow2 -o compat=0.10 sh.qcow2 1M; qemu-img snapshot -c s sh.qcow2
expect_rc 1 "shrink a v2 image with snapshots" "$P" resize --shrink sh.qcow2 512k
grep -q "v2 image which has snapshots" err || fail "v2 snapshot resize message: $(cat err)"
qemu-img create -q -f qcow2 sh.qcow2 1M
expect_rc 1 "shrink to a size not a multiple of 512" "$P" resize --shrink sh.qcow2 1000
truncate -s 1M rs.raw
expect_rc 0 "resize --shrink raw" "$P" resize -f raw --shrink rs.raw 512k
[ "$(stat -c %s rs.raw)" = 524288 ] || fail "raw shrink size"
finish
