#!/bin/bash
# `pmemsnap io` against the real qemu-io: the same command list runs on two
# copies of an image; stdout and stderr must be identical after removing the
# timing numbers, the exit codes equal, and the resulting images identical.
. "$(dirname "$0")/lib.sh"
command -v qemu-io >/dev/null || { echo "SKIP: no qemu-io"; exit 77; }

cmds=(
 'write -P 0xab 0 64k' 'write -z 1M 64k' 'read -P 0xab 0 64k' 'read -P 0xac 0 4k'
 'read -v 0 40' 'read -q 0 4k' 'read 0 8M' 'read -P 0x100 0 4k' 'read 0' 'read x 4k'
 'write 1M 4k 5' 'foo' 'read -z 0 4k' 'read 0 -1' 'write -P 1 -z 0 4k' 'read 1 4k'
 'write 3 5' 'read 0 0' 'discard 0 8M' 'write -P 7 128k 64k' 'discard 128k 64k'
 'read 0 1.5M' 'read 0 3000000' 'flush' 'flush 1' 'length' 'map'
 'read -P 0xab -s 4k -l 4k 0 64k' 'read -P 0xcd -s 4k -l 4k 0 64k' 'read -l 4 0 64'
 'read -C 0 4k' 'write -q 0 1' 'read 0 3G' 'write 0 3G' 'read 4M 0' 'read 0x1000 0x10'
 'read 1k 1.5k' 'read 2.5 1' 'read 1KiB 1' 'read 99999999999999999999999 1'
 'write -P 0x5a 2M 1M' 'read -P 0x5a 2M 1M' 'read -v 2M 17' 'map'
 'writev -P 3 0 4k 8k' 'readv -P 3 0 4k 8k' 'readv -P 4 0 4k 8k' 'readv 0' 'readv -v 0 8 8'
 'alloc 0 128k' 'alloc 64k' 'alloc 0' 'alloc 3M 2M' 'alloc 5M' 'alloc 1000 1000' 'alloc x'
 'alloc' 'a 1M 4k' 'info' 'i' 'aio_write -P 9 3M 4k' 'aio_flush' 'aio_read -P 9 3M 4k'
 'truncate 1000' 'truncate' 'truncate 6M' 'length' 'read -P 0 5M 1M' 'alloc 4M 2M'
 'write -u 0 4k' 'write -n 0 4k' 'write -f -c 0 64k' 'write -f -b 0 512' 'write -b -z 0 512'
)
args=()
for c in "${cmds[@]}"; do args+=(-c "$c"); done

run_pair() { # run_pair FMT IMAGE
    local fmt=$1 img=$2
    cp "$img" p.img; cp "$img" q.img
    "$P" io -f "$fmt" "${args[@]}" p.img > p.out 2> p.err; prc=$?
    qemu-io -f "$fmt" "${args[@]}" q.img > q.out 2> q.err; qrc=$?
    [ "$prc" -eq "$qrc" ] && pass "$fmt: exit code $prc" || fail "$fmt: exit $prc vs qemu-io $qrc"
    norm_io < p.out > p.n; norm_io < q.out > q.n; same "$fmt: stdout" p.n q.n
    norm_io < p.err > p.e; norm_io < q.err > q.e; same "$fmt: stderr" p.e q.e
    if [ "$fmt" = raw ]; then
        cmp -s p.img q.img && pass "raw: images identical" || fail "raw: images differ"
    else
        qemu-img compare -q p.img q.img && pass "$fmt: image contents identical" ||
            fail "$fmt: contents differ"
        qemu-img check -q p.img || fail "$fmt: pmemsnap-written image fails qemu-img check"
    fi
}

truncate -s 4M base.raw
run_pair raw base.raw
if qemu-img create -q -f qcow2 base.qcow2 4M && "$P" info base.qcow2 >/dev/null 2>&1; then
    run_pair qcow2 base.qcow2
fi

# stdin mode: the qemu-io prompt and the same lines
printf 'write -P 9 0 4k\nread -P 9 0 4k\nread -P 8 0 4k\n' > script
cp base.raw p.img; cp base.raw q.img
"$P" io -f raw p.img < script > p.out 2>&1; prc=$?
qemu-io -f raw q.img < script > q.out 2>&1; qrc=$?
[ "$prc" -eq "$qrc" ] || fail "stdin mode exit $prc vs $qrc"
norm_io < p.out > p.n; norm_io < q.out > q.n; same "stdin mode output" p.n q.n

# quit stops processing; -r refuses writes like qemu-io; no file open
for a in "-c quit -c 'read 0 1'" "-r -c 'write 0 4k' -c 'discard 0 4k'" "-c close -c 'read 0 1'"; do
    cp base.raw p.img; cp base.raw q.img
    eval "\"$P\" io -f raw $a p.img" > p.out 2> p.err; prc=$?
    eval "qemu-io -f raw $a q.img" > q.out 2> q.err; qrc=$?
    [ "$prc" -eq "$qrc" ] && pass "io $a: exit $prc" || fail "io $a: exit $prc vs $qrc"
    norm_io < p.err > p.e; norm_io < q.err > q.e; same "io $a: stderr" p.e q.e
    cmp -s p.img base.raw || fail "io $a modified the image"
done

# a raw file whose length is not a whole sector: QEMU sees it rounded up
# to 512 bytes (reads past the end are zeroes, a write there extends it)
head -c 1000 /dev/urandom > odd.raw
cp odd.raw p.img; cp odd.raw q.img
"$P" info -f raw p.img | grep "^virtual size" > p.out
qemu-img info -f raw q.img | grep "^virtual size" > q.out
same "1000-byte raw file: virtual size" p.out q.out
"$P" map -f raw --output=json p.img > p.out; qemu-img map -f raw --output=json q.img > q.out
same "1000-byte raw file: map" p.out q.out
io_odd=(-c "read -v 960 64" -c "write -P 0x33 1010 14" -c "read -P 0x33 1010 14" -c "read 1020 8")
"$P" io -f raw "${io_odd[@]}" p.img > p.out 2>&1; prc=$?
qemu-io -f raw "${io_odd[@]}" q.img > q.out 2>&1; qrc=$?
[ "$prc" -eq "$qrc" ] || fail "1000-byte raw file: io exit $prc vs $qrc"
norm_io < p.out > p.n; norm_io < q.out > q.n; same "1000-byte raw file: io output" p.n q.n
cmp -s p.img q.img && pass "1000-byte raw file: the same file after the write" ||
    fail "1000-byte raw file: files differ after the write ($(stat -c %s p.img) vs $(stat -c %s q.img) bytes)"
# zeroes that may unmap over the partial sector keep the length (a hole),
# and a resize to the rounded size truncates the file to it, as QEMU does
head -c 4097 /dev/urandom > odd.raw
for op in "io -f raw -c 'write -z -u 4096 512'" "io -f raw -c 'write -z -u 0 4608'" \
          "resize -f raw @ 4608" "resize -f raw @ 8192"; do
    cp odd.raw p.img; cp odd.raw q.img
    pc=${op/@/p.img}; qc=${op/@/q.img}
    case $op in *@*) ;; *) pc="$pc p.img"; qc="$qc q.img" ;; esac
    eval "\"$P\" $pc" >/dev/null 2>&1
    case $op in io*) eval "qemu-io ${qc#io }" ;; *) eval "qemu-img $qc" ;; esac >/dev/null 2>&1
    cmp -s p.img q.img && pass "4097-byte raw file, $op: same file as QEMU's" ||
        fail "4097-byte raw file, $op: $(stat -c %s p.img) bytes vs QEMU's $(stat -c %s q.img)"
done
finish
