#!/bin/bash
# Hostile and wrong invocations.  Every refusal must exit 1 (the class
# qemu-img / qemu-io exit with for the same arguments, checked against the
# real tools where pmemsnap promises compatibility), print exactly one
# "pmemsnap: " line on stderr, not crash or trip a sanitizer, not hang, and
# leave every image byte-identical.  Covers bad sizes and -o options, wrong
# formats, missing/odd files, images locked by a running qemu-io, read-only
# files, snapshot names, io requests, convert onto its own source, resize.
. "$(dirname "$0")/lib.sh"
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null ||
    { echo "SKIP: no qemu-img/qemu-io"; exit 77; }
QPID=
RUNAS=()
# shellcheck disable=SC2086
trap '[ -n "$QPID" ] && kill $QPID 2>/dev/null; rm -rf "$T"' EXIT

# Leak checking at every exit costs more than the run of a refused command;
# the other cli tests keep it.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"

qemu-img create -q -f qcow2 base.qcow2 1M
qemu-io -c 'write -q -P 1 0 64k' base.qcow2 >/dev/null
qemu-img snapshot -c snap1 base.qcow2
qemu-img create -q -f raw base.raw 1M
mkdir adir
: > empty
printf 'abc' > three
# Q/ mirrors the scratch dir: qemu-img runs there, beside pmemsnap, on the
# same relative names
mkdir Q Q/adir
cp base.qcow2 base.raw empty three Q/

IMAGES="img.qcow2 img.raw empty"
fresh() {
    cp base.qcow2 img.qcow2; cp base.raw img.raw; : > empty
    cp base.qcow2 Q/img.qcow2; cp base.raw Q/img.raw; : > Q/empty
    cp base.qcow2 Q/base.qcow2; cp base.raw Q/base.raw
}
digests() { # DIG="ours|qemu's" digests of the images: one sha256sum process
    local f list=() d a="" b=""
    for f in $IMAGES; do list+=("$f"); done
    for f in $IMAGES; do list+=("Q/$f"); done
    sha256sum "${list[@]}" > dig 2>/dev/null
    mapfile -t d < dig
    for f in "${!d[@]}"; do
        if [ "$f" -lt $((${#list[@]} / 2)) ]; then a+=${d[f]%% *}; else b+=${d[f]%% *}; fi
    done
    DIG="$a|$b"
}
fresh
digests; CLEAN=$DIG

# The checks use shell builtins only: a process costs more than the command
# under test on a slow machine.
# check_refusal DESC RC: exit 1, not a signal/timeout, no sanitizer report
check_refusal() {
    local desc=$1 rc=$2 ok=1
    mapfile -t ERR < err
    if [ "$rc" -ne 1 ]; then
        fail "$desc: exit $rc, want 1 (${ERR[*]:0:3})"; ok=0
    fi
    case "${ERR[*]}" in
        *Sanitizer*|*"runtime error"*) fail "$desc: sanitizer report: ${ERR[*]:0:3}"; ok=0 ;;
    esac
    return $((1 - ok))
}
oneline() { # stderr is exactly one line starting with "pmemsnap: "
    if [ "${#ERR[@]}" -ne 1 ] || [[ "${ERR[0]}" != "pmemsnap: "* ]]; then
        fail "$1: stderr is not one 'pmemsnap: ' line: ${ERR[*]:0:3}"
        return 1
    fi
}

# run_case CLASS DESC ONELINE ARGS...: pmemsnap ARGS here and, unless CLASS
# is x, the QEMU tool in Q/ at the same time.  Sets rc, qrc, ok; restores
# the images (after failing the case) if pmemsnap modified any.
run_case() {
    local class=$1 desc=$2 one=$3; shift 3
    compgen -G 'out.*' >/dev/null || compgen -G 'Q/out.*' >/dev/null && rm -rf out.* Q/out.*
    qrc=1
    if [ "$class" != x ]; then
        ( cd Q || exit 99
          if [ "$class" = io ]; then exec timeout 30 "${RUNAS[@]}" qemu-io "${@:2}"
          else exec timeout 30 "${RUNAS[@]}" qemu-img "$@"; fi ) >/dev/null 2>&1 &
        qjob=$!
    fi
    timeout 30 "${RUNAS[@]}" "$P" "$@" >out 2>err
    rc=$?
    if [ "$class" != x ]; then wait "$qjob"; qrc=$?; fi
    ok=1
    check_refusal "$desc" "$rc" || ok=0
    if [ "$one" = 1 ]; then oneline "$desc" || ok=0; fi
    digests
    if [ "$DIG" != "$CLEAN" ]; then
        [ "${DIG%|*}" = "${CLEAN%|*}" ] || { fail "$desc: a refused command modified an image"; ok=0; }
        fresh
        digests; CLEAN=$DIG            # report a modification once
    fi
    compgen -G 'out.*' >/dev/null && { fail "$desc: left $(compgen -G 'out.*')"; ok=0; }
    if [ "$class" != x ] && [ "$qrc" -ne "$rc" ]; then
        fail "$desc: exit $rc, qemu-$class exits $qrc"; ok=0
    fi
    return 0
}

# refused CLASS DESC ARGS...: pmemsnap ARGS must be refused: exit 1, one
# "pmemsnap: " line, images unchanged, no out.* created.  CLASS img: qemu-img
# ARGS exits 1 too; io: so does qemu-io (ARGS without "io"); x: pmemsnap
# refuses on purpose where QEMU goes ahead (not compared).
refused() {
    local class=$1 desc=$2; shift 2
    [ "$class" = q ] && class=img
    run_case "$class" "$desc" 1 "$@"
    [ $ok -eq 1 ] && pass "$desc"
}

# io_refused DESC CMD...: an io command refused (exit 1 like qemu-io, image
# unchanged; qemu-io's own command errors go to stdout, so no one-line rule)
io_refused() {
    local desc=$1; shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    run_case io "io $desc" 0 io "${args[@]}" img.qcow2
    [ $ok -eq 1 ] && pass "io $desc"
}

# ---- argument errors -------------------------------------------------------
refused q "create: no size"                  create -f qcow2 out.q
refused q "create: extra argument"           create -f qcow2 out.q 1M extra
refused q "create: unknown short option"     create -Z out.q 1M
refused q "create: unknown long option"      create --bogus out.q 1M
refused q "create: long option without arg"  create out.q 1M --object
refused q "info: -f without argument"        info -f
refused q "info: --output without argument"  info img.qcow2 --output
refused q "info: flag given an argument"     info --force-share=1 img.qcow2
refused q "info: unknown option in a group"  info -Uz img.qcow2
refused q "check: extra argument"            check img.qcow2 extra
refused q "snapshot: -l and -a"              snapshot -l -a x img.qcow2
# a control character in an argument must not break the one-line rule
refused q "info: newline in a file name"     info $'no\nsuch'
refused q "info: newline as an option"       info $'-\n' img.qcow2

# ---- sizes -----------------------------------------------------------------
for s in -1 99999999999T 15.99E 1.5 1.5e3k 1.5e400k 0x1.8k ' 1M'; do
    class=q
    case $s in                         # qemu skips leading blanks; and reads
        ' 1M'|1.5e400k) class=x ;;     # 1.5e400k as 1 (an overflow it misses)
    esac
    refused $class "create: size '$s'" create -f qcow2 out.q "$s"
done
refused q "create: -o size overflow"         create -f qcow2 -o size=8E out.q
refused q "create: -o size and a size"       create -f qcow2 -o size=2M out.q 1M
refused q "create raw: -o size and a size"   create -f raw -o size=1M out.q 1M
refused q "map: negative offset"             map --start-offset=-1 img.qcow2
refused q "map: garbage offset"              map --start-offset=1x img.qcow2
refused q "map: negative length"             map --max-length=-5 img.qcow2
refused q "map: offset 2^63"                 map --start-offset=8E img.qcow2
refused q "map: offset 2^64-1"               map --start-offset=18446744073709551615 img.qcow2
refused q "map: length 2^63"                 map --max-length=8E img.qcow2
grep -q "Invalid max length specified. Must be between 0 and 9223372036854775807." err ||
    fail "map length 2^63 message: $(cat err)"
refused q "bench: garbage count"             bench -c x img.qcow2
refused q "bench: request past the end"      bench -c 1 -o 2M img.qcow2

# ---- create -o -------------------------------------------------------------
for o in foo=bar cluster_size=3000 cluster_size=4M cluster_size=0 cluster_size=1.5k \
         refcount_bits=0 refcount_bits=3 refcount_bits=8,compat=0.10 \
         extended_l2=on,cluster_size=4k lazy_refcounts=on,compat=0.10 '' , cluster_size=4k,; do
    refused q "create -o '$o'" create -f qcow2 -o "$o" out.q 1M
done
refused q "create: -o compat=0.10 then lazy_refcounts" \
    create -f qcow2 -o compat=0.10 -o lazy_refcounts=on out.q 1M
refused q "create: compression_type=lz4"     create -f qcow2 -o compression_type=lz4 out.q 1M
refused q "create: zstd with compat=0.10"    create -f qcow2 -o compression_type=zstd,compat=0.10 out.q 1M
refused q "create: backing without -F"       create -f qcow2 -b img.qcow2 out.q 1M
refused q "create: bogus backing format"     create -f qcow2 -b img.qcow2 -F bogus out.q
refused q "create: image backed by itself"   create -f qcow2 -b img.qcow2 -F qcow2 img.qcow2 1M
refused x "create: image backed by ./itself" create -f qcow2 -b ./img.qcow2 -F qcow2 img.qcow2 1M
refused q "create: bogus format"             create -f bogus out.q 1M
refused q "create: a directory"              create -f qcow2 adir 1M
refused q "create: missing directory"        create -f qcow2 /nonexistent/x.q 1M

# ---- files and formats -----------------------------------------------------
for cmd in info "snapshot -c s" "resize +1M"; do
    # shellcheck disable=SC2086
    refused q "$cmd on a missing file" $cmd nope
    # shellcheck disable=SC2086
    refused q "$cmd on a directory" $cmd adir
done
refused q "snapshot -c on an empty file"     snapshot -c s empty
refused q "snapshot -c on /dev/null"         snapshot -c s /dev/null
refused q "resize /dev/null"                 resize /dev/null 2M
refused q "info -f qcow2 on raw"             info -f qcow2 img.raw
refused q "resize -f qcow2 on raw"           resize -f qcow2 img.raw 2M
refused q "snapshot -f raw -c on qcow2"      snapshot -f raw -c s img.qcow2
refused q "snapshot -c on raw"               snapshot -c s img.raw
refused q "info -f bogus"                    info -f bogus img.qcow2
refused q "info --output=garbage"            info --output=garbage img.qcow2
refused q "map --output=garbage"             map --output=garbage img.qcow2
refused q "check -r bogus"                   check -r bogus img.qcow2
refused q "check -r with -U"                 check -r leaks -U img.qcow2

# ---- snapshots -------------------------------------------------------------
refused q "snapshot -a unknown name"         snapshot -a nosuch img.qcow2
refused q "snapshot -d unknown name"         snapshot -d nosuch img.qcow2
refused q "snapshot -a empty name"           snapshot -a '' img.qcow2
refused q "snapshot -d empty name"           snapshot -d '' img.qcow2
refused q "snapshot -c with -U"              snapshot -c s -U img.qcow2
refused x "snapshot -c existing name"        snapshot -c snap1 img.qcow2
refused x "snapshot -c empty name"           snapshot -c '' img.qcow2
refused q "snapshot -a name with a newline"  snapshot -a $'x\ny' img.qcow2

# ---- resize ----------------------------------------------------------------
refused q "resize: shrink without --shrink"  resize img.qcow2 -512k
refused q "resize: to 0"                     resize --shrink -f raw img.raw 0
refused q "resize: by -size below 0"         resize --shrink -f raw img.raw -- -2M
refused q "resize: not a multiple of 512"    resize img.qcow2 +1000
refused q "resize: overflow"                 resize img.qcow2 +8E
refused q "resize: garbage size"             resize img.qcow2 +1x
refused q "resize: bare sign"                resize img.qcow2 -

# ---- convert ---------------------------------------------------------------
refused q "convert: missing source"          convert nope out.x
refused q "convert: into a directory"        convert img.qcow2 adir
refused q "convert: unwritable directory"    convert img.qcow2 /nonexistent/d/x
refused q "convert: bogus -O"                convert -O bogus img.qcow2 out.x
refused q "convert: bad -o"                  convert -O qcow2 -o cluster_size=3 img.qcow2 out.x
refused q "convert: empty -o"                convert -O qcow2 -o '' img.qcow2 out.x
refused q "convert: onto its source"         convert -O qcow2 img.qcow2 img.qcow2
refused q "convert: raw onto its source"     convert -f raw -O raw img.raw img.raw
refused x "convert -U onto its source"       convert -U -O qcow2 img.qcow2 img.qcow2

# ---- io ----------------------------------------------------------------------
refused io "io: unknown option"              io -Z img.qcow2
refused io "io: -f bogus"                    io -f bogus -c flush img.qcow2
refused io "io: -U without -r writes"        io -U -c 'write 0 4k' img.qcow2
io_refused "open -U without -r"              'open -U img.qcow2'
io_refused "read past the end"               'read 1M 1'
io_refused "negative length"                 'write 0 -1'
io_refused "kB suffix"                       'write 0 1kb'
io_refused "exponent"                        'write 0 1.5e3k'
io_refused "missing source file"             'write -s nofile 0 1'
io_refused "empty source file"               'write -s /dev/null 0 1'
io_refused "readv lengths overflow"          'readv 0 9223372036854775807 9223372036854775807'
grep -q "exceeds maximum size" out || fail "readv overflow message: $(cat out)"
io_refused "writev lengths overflow"         'writev 0 9223372036854775807 9223372036854775807'

# accepted the way qemu-io accepts them (these used to overflow or misparse)
ioargs=(-c 'readv -C -C -C -C -C -C -C -C -C -C -C -C -C -C -C -C 0 1'
        -c 'writev -P 9 -P 9 -P 9 -P 9 -P 9 -P 9 -P 9 -P 9 -P 9 64k 1'
        -c 'write -P 2 128k 010' -c 'read -P 2 128k 10' -c 'read -P 0 131082 1'
        -c 'write -s three 192k 8' -c 'read -v 192k 8')
cp img.qcow2 q.qcow2
timeout 30 "$P" io "${ioargs[@]}" img.qcow2 >out 2>err; prc=$?
timeout 30 qemu-io "${ioargs[@]}" q.qcow2 >q.out 2>q.err; qrc=$?
[ "$prc" -eq 0 ] && [ "$qrc" -eq 0 ] && pass "io: accepted commands" ||
    fail "io accepted commands: exit $prc, qemu-io $qrc ($(head -c 300 err out | tr '\n' '|'))"
norm_io < out > p.n; norm_io < q.out > q.n; same "io: accepted commands output" p.n q.n
grep -qE 'Sanitizer|runtime error' err && fail "io accepted commands: sanitizer report"
qemu-img compare -q img.qcow2 q.qcow2 || fail "io: data differs from qemu-io's"

# sizes parse as qemu_strtosz does: decimal, never octal
# (01000 read as octal would be 512; the raw file is rounded up to 1024)
expect_rc 0 "create size 01000" "$P" create -q -f raw out.r 01000 &&
    { [ "$(stat -c %s out.r)" -eq 1024 ] || fail "size 01000 is $(stat -c %s out.r), want 1024"; }
expect_rc 0 "resize raw by +1000" "$P" resize -f raw img.raw +1000 &&
    { [ "$(stat -c %s img.raw)" -eq $((1048576 + 1000)) ] || fail "raw size after +1000"; }
rm -f out.r q.qcow2
fresh

# ---- an overlay whose backing file is missing (info alone opens it) ---------
qemu-img create -q -f qcow2 nb.qcow2 1M
qemu-img snapshot -c s nb.qcow2
qemu-img rebase -u -b missing.qcow2 -F qcow2 nb.qcow2
cp nb.qcow2 Q/
IMAGES="nb.qcow2"; digests; CLEAN=$DIG
for cmd in check "check -U" "check -r all" "check --output=json" "snapshot -l" \
           "snapshot -l -U" "snapshot -c s2" "snapshot -a s" "snapshot -d s"; do
    # shellcheck disable=SC2086
    refused q "missing backing: $cmd" $cmd nb.qcow2
done
grep -q "Could not open backing file" err || fail "missing backing message: $(cat err)"
expect_rc 0 "missing backing: info works" "$P" info nb.qcow2

# ---- an image locked by a running qemu-io (one per side) ---------------------
cp base.qcow2 lk.qcow2
cp base.qcow2 Q/lk.qcow2
qemu-io -c 'sleep 60000' lk.qcow2 >/dev/null 2>&1 &
QPID=$!
qemu-io -c 'sleep 60000' Q/lk.qcow2 >/dev/null 2>&1 &
QPID="$QPID $!"
locked() { ! qemu-img info lk.qcow2 >/dev/null 2>&1 && ! qemu-img info Q/lk.qcow2 >/dev/null 2>&1; }
opened() { # both qemu-io processes alive and holding their image open
    local p
    for p in $QPID; do
        ls -l /proc/"$p"/fd 2>/dev/null | grep -q 'lk\.qcow2$' || return 1
    done
}
# qemu-io can take seconds to start on a loaded 2-vCPU machine: wait for it
# to open the image (up to 60 s), then for its locks (up to 10 s more)
for _ in $(seq 600); do opened && break; sleep 0.1; done
for _ in $(seq 100); do locked && break; sleep 0.1; done
if ! opened; then
    fail "qemu-io did not start on lk.qcow2 within 60 s"
elif ! locked; then
    echo "skip: locked-image cases (the filesystem of $T does not enforce qemu's OFD locks)"
else
    IMAGES="lk.qcow2"; digests; CLEAN=$DIG
    refused q "locked: create over it"       create -f qcow2 lk.qcow2 1M
    refused q "locked: create raw over it"   create -f raw lk.qcow2 1M
    refused q "locked: convert onto it"      convert -O qcow2 base.qcow2 lk.qcow2
    refused q "locked: snapshot -c"          snapshot -c s lk.qcow2
    refused q "locked: resize"               resize lk.qcow2 2M
    refused io "locked: io write"            io -c 'write 0 4k' lk.qcow2
    refused io "locked: io -U write"         io -U -c 'write 0 4k' lk.qcow2
fi
# shellcheck disable=SC2086
kill $QPID 2>/dev/null; wait $QPID 2>/dev/null; QPID=

# ---- read-only files (as an unprivileged user when running as root) ----------
if [ "$(id -u)" -eq 0 ]; then
    command -v setpriv >/dev/null && RUNAS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi
if [ "$(id -u)" -eq 0 ] && [ ${#RUNAS[@]} -eq 0 ]; then
    echo "skip: read-only cases (root without setpriv)"
elif ! "${RUNAS[@]}" test -x "$P"; then
    echo "skip: read-only cases ($P is not executable by an unprivileged user)"
    RUNAS=()
else
    chmod 755 "$T" Q
    for d in . Q; do
        cp base.qcow2 $d/ro.qcow2; cp base.raw $d/ro.raw; chmod 444 $d/ro.qcow2 $d/ro.raw
    done
    IMAGES="ro.qcow2 ro.raw"; digests; CLEAN=$DIG
    refused q "read-only: snapshot -c"       snapshot -c s ro.qcow2
    refused q "read-only: resize"            resize ro.qcow2 2M
    refused q "read-only: check -r all"      check -r all ro.qcow2
    refused q "read-only: create over it"    create -f qcow2 ro.qcow2 1M
    refused q "read-only: convert -n into it" convert -n base.qcow2 ro.raw
    refused io "read-only: io write"         io -c 'write 0 1' ro.qcow2
    expect_rc 0 "read-only: info works" "${RUNAS[@]}" "$P" info ro.qcow2
    RUNAS=()
    chmod 700 "$T"
fi
# a FIFO as the image or as its backing file: refused at once (opening one
# would wait for a writer; qemu-img hangs there, so it is no oracle here)
mkfifo fifo.img
qemu-img create -q -f qcow2 -u -b fifo.img -F raw fifob.qcow2 1M
for c in "info fifo.img" "map fifob.qcow2" "convert -O raw fifob.qcow2 out.fifo.raw"; do
    # shellcheck disable=SC2086
    timeout 20 "$P" $c 2>fifo.err >/dev/null; rc=$?
    if [ $rc -ne 1 ] || [ "$(wc -l <fifo.err)" -ne 1 ] || ! grep -q FIFO fifo.err; then
        fail "FIFO: $c: exit $rc: $(head -c 300 fifo.err)"
    else
        pass "FIFO: $c refused: $(cat fifo.err)"
    fi
done

# a command that fails on a damaged image says so once: the close after it
# (which meets the same damage) does not add a second line
qemu-img create -q -f qcow2 -o cluster_size=4096 dmg.qcow2 4M
qemu-io -c "write -P 1 0 64k" -c "write -P 2 1M 100k" dmg.qcow2 >/dev/null
qemu-img snapshot -c s1 dmg.qcow2
qemu-io -c "write -P 3 32k 64k" dmg.qcow2 >/dev/null
qemu-img snapshot -c s2 dmg.qcow2
python3 - <<'PY'
import struct
f = open('dmg.qcow2', 'r+b'); d = f.read(4096)
l1o = struct.unpack_from('>Q', d, 40)[0]; rto = struct.unpack_from('>Q', d, 48)[0]
f.seek(rto); rb0 = struct.unpack('>Q', f.read(8))[0]
f.seek(l1o + 8); f.write(struct.pack('>Q', rb0))   # L1[1] -> the refcount block
PY
timeout 20 "$P" snapshot -d s1 dmg.qcow2 2>dmg.err; rc=$?
if [ $rc -ne 1 ] || [ "$(wc -l <dmg.err)" -ne 1 ]; then
    fail "snapshot -d on a damaged image: exit $rc, $(wc -l <dmg.err) lines: $(head -c 300 dmg.err)"
else
    pass "snapshot -d on a damaged image: one line: $(cat dmg.err)"
fi

finish
