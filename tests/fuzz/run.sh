#!/bin/bash
# Build (with clang -fsanitize=fuzzer,address,undefined) and run the
# fuzz-open target for SECONDS seconds from a seed corpus of small images
# that qemu-img makes at run time.
#
# usage: run.sh [SECONDS [BINARY | LIB_SOURCE...]]
#   BINARY: an already built fuzz-open (the meson build does so with clang);
#   else the library sources (meson passes lib_sources; without them they are
#   read from lib/meson.build) are compiled here with clang.
# A crash prints the input file and how to reproduce; exit 1.
set -u
secs=${1:-30}; shift || true
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=${BUILDDIR:-$top/build/tests}/fuzz
mkdir -p "$out"
bin=
if [ $# -eq 1 ] && [ -x "$1" ] && [ "${1%.c}" = "$1" ]; then
    bin=$1
else
    CLANG=${CLANG:-clang}
    command -v "$CLANG" >/dev/null || { echo "SKIP: no clang"; exit 77; }
    srcs=("$@")
    if [ ${#srcs[@]} -eq 0 ]; then
        mapfile -t srcs < <(sed -n "/lib_sources = files(/,/)/p" "$top/lib/meson.build" |
                            grep -o "'[^']*\.c'" | tr -d "'" | sed "s|^|$top/lib/|")
    fi
    bin=$out/fuzz-open
    newest=$(ls -t "${srcs[@]}" "$here/fuzz-open.c" $(find "$top/include" "$top/lib" -name '*.h') 2>/dev/null | head -n1)
    if [ ! -x "$bin" ] || [ "$newest" -nt "$bin" ]; then
        echo "# building $bin with $CLANG (${#srcs[@]} library sources)"
        flags=(-g -O1 -std=gnu11 -D_GNU_SOURCE -fno-omit-frame-pointer -I"$top/include" -I"$top/lib"
               -fsanitize=address,undefined -fno-sanitize-recover=undefined)
        objdir=$out/obj; rm -rf "$objdir"; mkdir -p "$objdir"
        pids=()
        for s in "${srcs[@]}"; do
            o=$objdir/$(echo "${s#$top/}" | tr / _).o
            "$CLANG" "${flags[@]}" -fsanitize=fuzzer-no-link -c "$s" -o "$o" &
            pids+=($!)
            if [ ${#pids[@]} -ge 4 ]; then wait "${pids[0]}" || exit 1; pids=("${pids[@]:1}"); fi
        done
        for p in "${pids[@]}"; do wait "$p" || exit 1; done
        libs=$(pkg-config --libs zlib libzstd 2>/dev/null || echo "-lz -lzstd")
        for opt in libnbd liburing json-c fuse3; do
            grep -q "dependency('$opt'" "$top/meson.build" "$top/lib/meson.build" 2>/dev/null &&
                libs="$libs $(pkg-config --libs $opt 2>/dev/null)"
        done
        "$CLANG" "${flags[@]}" -fsanitize=fuzzer "$here/fuzz-open.c" "$objdir"/*.o \
            $libs -lpthread -lm -o "$bin.tmp" || { echo "FAIL: link"; exit 1; }
        mv "$bin.tmp" "$bin"
    fi
fi

# seed corpus: small images of every kind qemu-img makes
seeds=$out/seeds
rm -rf "$seeds"; mkdir -p "$seeds"
(
    cd "$seeds" || exit 1
    q() { qemu-img "$@" >/dev/null 2>&1; }
    io() { qemu-io "$@" >/dev/null 2>&1; }
    q create -f qcow2 -o cluster_size=512 empty512.qcow2 1M
    q create -f qcow2 -o cluster_size=512 data512.qcow2 1M
    io -c "write -P 0x11 700 1500" -c "write -z 8192 1024" -c "write -z -u 16384 512" data512.qcow2
    q create -f qcow2 -o cluster_size=512,compat=0.10 v2.qcow2 1M
    io -c "write -P 0x22 0 3000" v2.qcow2
    q create -f qcow2 -o cluster_size=512,refcount_bits=1 rb1.qcow2 1M
    io -c "write -P 0x33 4096 600" rb1.qcow2
    q create -f qcow2 -o cluster_size=512,refcount_bits=64 rb64.qcow2 1M
    io -c "write -P 0x34 4096 600" rb64.qcow2
    q create -f qcow2 -o cluster_size=512 snap.qcow2 1M
    io -c "write -P 0x44 0 2000" snap.qcow2
    q snapshot -c one snap.qcow2
    io -c "write -P 0x45 1000 2000" snap.qcow2
    q snapshot -c two snap.qcow2
    q create -f raw src.raw 64k
    io -f raw -c "write -P 0x55 0 20000" src.raw
    q convert -c -f raw -O qcow2 -o cluster_size=4096 src.raw zlib.qcow2
    q convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd src.raw zstd.qcow2
    q create -f qcow2 -o cluster_size=16384,extended_l2=on xl2.qcow2 256k
    io -c "write -P 0x66 600 300" -c "write -z 2048 512" xl2.qcow2
    q create -f qcow2 -o cluster_size=512 -b empty512.qcow2 -F qcow2 overlay.qcow2
    io -c "write -P 0x77 100 100" overlay.qcow2
    q create -f qcow2 -o cluster_size=512,lazy_refcounts=on lazy.qcow2 1M
    head -c 4096 /dev/zero > zeros.raw
    rm -f src.raw
)
ls "$seeds" | wc -l | sed 's/^/# seed images: /'

corpus=$out/corpus
mkdir -p "$corpus"
echo "# running $bin for ${secs}s"
log=$out/fuzz.log
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}:allocator_may_return_null=1 \
"$bin" -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$out/" -print_final_stats=1 "$corpus" "$seeds" > "$log" 2>&1
rc=$?
tail -n 15 "$log"
if [ $rc -ne 0 ]; then
    art=$(grep -o "Test unit written to [^ ]*" "$log" | tail -n1 | sed 's/Test unit written to //')
    echo "FAIL: fuzz-open found a problem (exit $rc); input: ${art:-?}"
    echo "reproduce: $bin ${art:-<input>}   (full log: $log)"
    grep -m5 -E "ERROR: |SUMMARY|#0 |#1 |#2 " "$log"
    exit 1
fi
exit 0
