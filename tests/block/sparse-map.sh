#!/bin/bash
# Sparse images whose L2 tables hold a few entries each, in different slices
# (the cache reads a table by 4 KiB slice, and zeroes slices that lie in a
# hole of the file without reading them; block status runs over empty
# entries a table at a time).  QEMU writes a scattered pattern (entries at
# the start and end of a slice, on both sides of a slice boundary, in the
# next table, zeroed and discarded ranges); then:
#   - our map --output=json equals qemu-img map (block status, empty runs);
#   - a second set of scattered writes, into the same tables but other
#     slices, goes through qemu-io into one copy and through our io into
#     another: qemu-img compare finds them equal, qemu-img check finds ours
#     clean, and the maps agree again (a write that dirtied one slice of a
#     partly read table must leave the others on disk as they were).
. "$(dirname "$0")/lib.sh"

K=65536
# cluster index -> byte offset for 64 KiB clusters
c() { echo $(($1 * K)); }

first=(
    "write -P 0x11 $(c 0) 4k"
    "write -P 0x12 $(c 255) 4k"            # last entry of slice 0 (extended L2)
    "write -P 0x13 $(c 256) 8k"            # first entry of slice 1
    "write -P 0x14 $(c 511) 4k"            # last entry of slice 0 (standard L2)
    "write -P 0x15 $(c 512) 4k"
    "write -P 0x16 $(c 4095) 64k"          # last entry of an extended-L2 table
    "write -P 0x17 $(c 4096) 4k"           # next table (extended L2)
    "write -P 0x18 $(c 8191) 4k"           # last entry of a standard table
    "write -P 0x19 $(c 8192) 4k"
    "write -z $(c 3000) 128k"
    "write -P 0x1a $(c 20000) 256k"
    "discard $(c 20001) 64k"
    "write -P 0x1b $((6 * 1024 * 1024 * 1024)) 4k"
)
second=(
    "write -P 0x21 $(c 100) 4k"            # same table, slice 0
    "write -P 0x22 $(c 1000) 4k"           # same table, another slice
    "write -P 0x23 $(c 257) 2k"            # beside the first pass's entry
    "write -P 0x24 $(c 4100) 4k"
    "write -z $(c 3001) 4k"
    "write -P 0x25 $(c 7000) 4k"
    "write -P 0x26 $(c 12000) 4k"          # a table the first pass left empty
    "write -P 0x27 $((6 * 1024 * 1024 * 1024 + 8 * K)) 4k"
)

for opts in "cluster_size=65536" "cluster_size=65536,extended_l2=on" "cluster_size=4096"; do
    begin "sparse $opts"
    rm -f q.qcow2 p.qcow2
    run qemu-img create -q -f qcow2 -o "$opts" q.qcow2 8G || continue
    bad=0
    for cmd in "${first[@]}"; do
        run qemu-io -c "$cmd" q.qcow2 || { bad=1; break; }
    done
    [ $bad = 0 ] || continue
    cp q.qcow2 p.qcow2
    map_cmp p.qcow2 || continue
    for cmd in "${second[@]}"; do
        run qemu-io -c "$cmd" q.qcow2 || { bad=1; break; }
        out=$("$PMS" io -c "$cmd" p.qcow2 2>&1)
        if [ $? != 0 ] || echo "$out" | grep -q -i "error\|fail"; then
            fail "our io '$cmd': $out"; bad=1; break
        fi
    done
    [ $bad = 0 ] || continue
    if ! out=$(qemu-img compare q.qcow2 p.qcow2 2>&1); then
        fail "after the second pass: $out"; continue
    fi
    if ! out=$(qemu-img check p.qcow2 2>&1); then
        fail "qemu-img check of ours: $(echo "$out" | head -n 3 | tr '\n' '|')"; continue
    fi
    map_cmp p.qcow2 || continue
    ok
done
finish
