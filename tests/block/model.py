#!/usr/bin/env python3
"""Expected content of a disk after a scenario script, as qemu-io read -P
commands (one per run of equal bytes).

usage: model.py SIZE SCRIPT [--base RAW] [--snap NAME] [--unknown-discard]

SCRIPT lines:  io write -P 0xNN OFF LEN | io write -z [-u] OFF LEN |
               io discard OFF LEN | io flush | snap-c NAME | snap-a NAME |
               snap-d NAME.  '#' starts a comment.
Discarded bytes read as zero, unless --unknown-discard (a backing file may
show through), then they are left out.  --snap prints the content of
snapshot NAME at the end of the script instead of the current one.
"""
import re
import sys

def num(s):
    s = s.strip()
    mult = {'k': 1 << 10, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    if s[-1] in mult:
        return int(s[:-1], 0) * mult[s[-1]]
    return int(s, 0)

def runs_of(data):
    """[start, end, value] runs of equal bytes."""
    return [[m.start(), m.end(), data[m.start()]]
            for m in re.finditer(rb'(.)\1*', bytes(data), re.S)]

def put(runs, off, ln, val):
    """Set [off, off+ln) to val (None = unknown) in a sorted run list."""
    end = off + ln
    out = []
    for a, b, v in runs:
        if b <= off or a >= end:
            out.append([a, b, v])
            continue
        if a < off:
            out.append([a, off, v])
        if b > end:
            out.append([end, b, v])
    out.append([off, end, val])
    out.sort()
    return out

def main():
    args = sys.argv[1:]
    size, script = num(args[0]), args[1]
    base = snapname = None
    unknown_discard = False
    i = 2
    while i < len(args):
        if args[i] == '--base':
            base = args[i + 1]; i += 2
        elif args[i] == '--snap':
            snapname = args[i + 1]; i += 2
        elif args[i] == '--unknown-discard':
            unknown_discard = True; i += 1
        else:
            sys.exit('bad arg ' + args[i])
    cur = [[0, size, 0]]
    if base:
        b = open(base, 'rb').read()[:size]
        for a, e, v in runs_of(b):
            cur = put(cur, a, e - a, v)
    snaps = {}
    for line in open(script):
        line = line.split('#', 1)[0].split()
        if not line:
            continue
        if line[0] == 'snap-c':
            snaps[line[1]] = [r[:] for r in cur]
        elif line[0] == 'snap-a':
            cur = [r[:] for r in snaps[line[1]]]
        elif line[0] == 'snap-d':
            del snaps[line[1]]
        elif line[0] == 'io':
            op, rest = line[1], line[2:]
            if op == 'flush':
                continue
            pat = int(rest[rest.index('-P') + 1], 0) if '-P' in rest else 0xcd
            off, ln = num(rest[-2]), num(rest[-1])
            if op == 'write' and '-z' in rest:
                cur = put(cur, off, ln, 0)
            elif op == 'write':
                cur = put(cur, off, ln, pat)
            elif op == 'discard':
                cur = put(cur, off, ln, None if unknown_discard else 0)
            else:
                sys.exit('unknown io op ' + op)
    if snapname:
        cur = snaps[snapname]
    # merge neighbours with equal values, print the known ones
    merged = []
    for a, b, v in cur:
        if a >= b:
            continue
        if merged and merged[-1][2] == v and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b, v])
    print('\n'.join('read -P 0x%02x %d %d' % (v, a, b - a) for a, b, v in merged if v is not None))

main()
