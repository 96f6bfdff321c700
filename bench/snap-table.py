#!/usr/bin/env python3
"""Prints the tables of bench/40-snap.sh and bench/41-scale.sh from the
"key value" files snap-bench wrote into one results directory (argv[1]).
A file whose first line is "na <reason>" makes its row say "n/a: <reason>".
Targets are issue 8's; "ok"/"MISS" only compares, it never changes a number."""
import os
import sys

R = sys.argv[1]
E = os.environ
MiB = 1048576.0
KINDS = ('internal', 'external', 'external-syncwp', 'internal-nowb', 'external-nowb', 'external-unmapped')


def load(name):
    d = {}
    try:
        with open(os.path.join(R, name)) as f:
            lines = f.read().splitlines()
    except OSError:
        return {'na': 'not run'}
    for ln in lines:
        k, _, v = ln.partition(' ')
        if k == 'na':
            return {'na': v}
        if k in ('rep',):
            continue
        d.setdefault(k, v)
        if k in ('fullcopy_ms',):
            d.setdefault('_fc', []).append(float(v))
    if not d:
        return {'na': 'no output'}
    if 'error' in d and 'call_ms' not in d and 'MBps' not in d and 'stores_per_s' not in d:
        return {'na': 'failed: ' + ' '.join(lines[-2:])}
    return d


def num(d, k):
    try:
        return float(d[k])
    except (KeyError, ValueError):
        return None


def f(x, fmt='%.1f'):
    return '-' if x is None or x < 0 else fmt % x   # negative: not measured


def mark(ok):
    return '' if ok is None else ('ok' if ok else 'MISS')


def check(d):
    if 'check_files' not in d:
        return '-'
    bad = int(d.get('check_bad', 0))
    return 'clean %s files' % d['check_files'] if not bad else '%d of %s files NOT clean' % (bad, d['check_files'])


def table(head, rows):
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print('  ' + '  '.join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r)))


def snap_tables():
    sizes = E['SIZES'].split()
    first = E['FIRST']
    dirty = int(E['DIRTY'])
    fc = load('fullcopy')
    fc_ms = sorted(fc.get('_fc', []))
    fc_med = fc_ms[len(fc_ms) // 2] if fc_ms else None
    qemu = load('qemu')
    print()
    print('1. Snapshot call on fully allocated regions: every page stored once and flushed, a first')
    print('   snapshot taken, then %d MiB stored to %d random 4 KiB pages, then the snapshot'
          % (dirty, dirty * 256))
    print('   (median of %s).  internal, external: background writeback at the library default, as a'
          % E['REPS'])
    print('   user has it (it writes while the stores run: "bg-written"); -nowb: no background round, so the')
    print('   call writes and syncs every page stored since the last snapshot')
    head = ['region', 'kind', 'stores ms', 'bg-written MiB', 'call ms', 'call max', 'pause ms',
            'written MiB', 'syscall-written MiB', 'read back MiB', 'files grew MiB', 'du grew MiB',
            'du/dirtied', 'full copy/call', 'qemu-img check']
    rows, nas = [], []
    res = {}
    for gb in sizes:
        for k in KINDS:
            if k not in ('internal', 'external', 'external-syncwp') and gb != first:
                continue
            d = load('snap-%s-%s' % (k, gb))
            res[(k, gb)] = d
            if 'na' in d:
                nas.append('  %s GiB %s: n/a: %s' % (gb, k, d['na']))
                continue
            call = num(d, 'call_ms')
            bg = num(d, 'bg_bytes')
            rows.append(['%s GiB' % gb, k, f(num(d, 'stores_ms')), f(bg / MiB if bg is not None else None),
                         f(call), f(num(d, 'call_ms_max')), f(num(d, 'pause_ms'), '%.2f'),
                         f(num(d, 'snap_bytes') / MiB), f(num(d, 'write_bytes') / MiB),
                         f(num(d, 'read_bytes') / MiB), f(num(d, 'file_growth') / MiB),
                         f(num(d, 'du_growth') / MiB),
                         f(num(d, 'du_growth') / num(d, 'dirty_bytes'), '%.2fx'),
                         f(fc_med / call, '%.0fx') if fc_med and gb == first and call else '-',
                         check(d)])
    table(head, rows)
    for n in nas:
        print(n)
    if ('external-unmapped', first) in res:
        print('  external-unmapped: the stores are pms_pwrite calls (written before the call), so its call')
        print('  time is the flush and switch only, not comparable with the mapped rows; du growth counts both')
    print('  references, same run:')
    print('    full copy of %s GiB (pwrite 4 MiB blocks to a new file + fdatasync), median of %d: %s ms'
          % (first, len(fc_ms), f(fc_med)))
    if 'na' in qemu:
        print('    QEMU savevm, 1 GiB NVDIMM: n/a: %s' % qemu['na'])
    else:
        print('    QEMU savevm, stopped TCG VM with a 1 GiB NVDIMM (memory-backend-file), 1%% of it changed:'
              ' %s ms (vmstate %s)' % (f(num(qemu, 'savevm_ms')), qemu.get('vmstate', '?')))
    print('  targets:')
    ie, ii = res.get(('external', first), {}), res.get(('internal', first), {})
    big = sizes[-1] if len(sizes) > 1 else None
    ce = num(ie, 'call_ms') if 'na' not in ie else None
    ci = num(ii, 'call_ms') if 'na' not in ii else None
    if ce is not None:
        print('    external %s GiB call <= 30 ms: %s ms %s' % (first, f(ce), mark(ce <= 30)))
        if fc_med:
            print('    external >= 100x faster than the full copy: %.0fx %s' % (fc_med / ce, mark(fc_med / ce >= 100)))
        eb = res.get(('external', big), {})
        if big and 'na' not in eb:
            r = num(eb, 'call_ms') / ce
            print('    external %s GiB within 1.2x of %s GiB: %.2fx %s' % (big, first, r, mark(r <= 1.2)))
        sb, s1 = res.get(('external-syncwp', big), {}), res.get(('external-syncwp', first), {})
        if big and 'na' not in sb and 'na' not in s1 and num(s1, 'call_ms'):
            r = num(sb, 'call_ms') / num(s1, 'call_ms')
            print('    (external-syncwp, PMS_DIRTY_SYNC_WP: %s GiB within 1.2x of %s GiB: %.2fx %s;'
                  ' pause %s GiB %.2f ms)' % (big, first, r, mark(r <= 1.2), big, num(sb, 'pause_ms')))
        g = num(ie, 'du_growth') / num(ie, 'dirty_bytes')
        print('    external disk growth <= 2x the dirtied bytes: %.2fx %s' % (g, mark(g <= 2)))
        p = num(ie, 'pause_ms')
        print('    external pause median <= 2 ms: %.2f ms %s' % (p, mark(p <= 2)))
        nw = res.get(('external-nowb', first), {})
        if 'na' not in nw and num(nw, 'call_ms'):
            print('    (external-nowb: %s ms, %.0fx the full copy: without background writeback the call'
                  ' writes and syncs all %d MiB itself)' % (f(num(nw, 'call_ms')),
                                                          (fc_med or 0) / num(nw, 'call_ms'), dirty))
    else:
        print('    external: n/a (%s)' % ie.get('na', 'not run'))
    if ci is not None:
        print('    internal %s GiB call <= 150 ms: %s ms %s' % (first, f(ci), mark(ci <= 150)))
        rb = num(ii, 'read_bytes')
        print('    internal bytes read back during the snapshot = 0 (all pages of each dirty cluster'
              ' resident): %.1f MiB %s' % (rb / MiB, mark(rb < 65536)))
    for k in ('internal', 'external'):
        a, b = res.get((k, first), {}), res.get((k, big), {})
        if big and 'na' not in a and 'na' not in b:
            print('    %s: %s GiB / %s GiB call time: %.2fx' % (k, big, first, num(b, 'call_ms') / num(a, 'call_ms')))

    print()
    print('2. Revert while mapped: fully allocated %s GiB, %d MiB stored since the snapshot' % (first, dirty))
    head = ['kind', 'revert ms', 'read-back ms', 'pages read back', 'wrong', 'qemu-img convert: wrong pages',
            'loadvm/revert', 'target <= 20 ms']
    rows = []
    lv = num(qemu, 'loadvm_ms') if 'na' not in qemu else None
    for k in KINDS:
        d = res.get((k, first), {'na': 'not run'})
        if 'na' in d or 'revert_ms' not in d:
            print('  %s: n/a: %s' % (k, d.get('na', 'no revert result')))
            continue
        rv = num(d, 'revert_ms')
        rows.append([k, f(rv), f(num(d, 'refault_check_ms')), d.get('revert_checked', '-'),
                     d.get('revert_bad', '-'),
                     '%s of %s' % (d.get('raw_bad_pages', '?'), d.get('raw_pages', '?')),
                     f(lv / rv, '%.0fx') if lv and rv else '-', mark(rv <= 20)])
    if rows:
        table(head, rows)
    print('  reference: QEMU loadvm of the same 1 GiB NVDIMM VM, 1%% changed: %s ms' % f(lv))

    print()
    print('3. First-touch read of the whole %s GiB region through %s snapshots (%s KiB stored before each)'
          % (first, E['CHAIN'], E['CHAIN_KB']))
    head = ['kind', 'one layer GB/s', 'chain GB/s', 'slowdown', 'target <= 2x', 'wrong pages',
            'files', 'slowest snapshot ms', 'qemu-img check']
    rows = []
    for k in ('internal', 'external', 'external-unmapped'):
        d = load('chain-%s' % k)
        if 'na' in d or 'chain_GBps' not in d:
            print('  %s: n/a: %s' % (k, d.get('na', 'no result')))
            continue
        o, c = num(d, 'onelayer_GBps'), num(d, 'chain_GBps')
        rows.append([k, f(o, '%.3f'), f(c, '%.3f'), f(o / c, '%.2fx'), mark(o / c <= 2),
                     d.get('chain_bad_pages', '-'), d.get('files', '-'), f(num(d, 'chain_snap_max_ms')), check(d)])
    if rows:
        table(head, rows)

    print()
    cap, ref = load('cap'), load('cap-mmap')
    capmb = float(E['CAP'])
    print('4. Image larger than memory: %s GiB image, %s MiB cap, up to %s MiB of whole-page stores to'
          ' random pages, then persist' % (E['CAPIMG'], E['CAP'], E['CAPST']))
    if 'na' in cap:
        print('  n/a: %s' % cap['na'])
    else:
        mb, rmb = num(cap, 'MBps'), num(ref, 'MBps')
        rss = num(cap, 'rss_max_MiB')
        table(['run', 'stored MiB', 'store s', 'persist s', 'MB/s', 'peak RSS MiB', 'note'],
              [['pmemsnap (mem_limit)', f(num(cap, 'stored_MiB')), f(num(cap, 'store_s'), '%.2f'),
                f(num(cap, 'persist_s'), '%.2f'), f(mb), f(rss),
                cap.get('persist_error', 'image %s MiB, qemu-img check %s' % (
                    cap.get('du_MiB', '?'), 'clean' if cap.get('check_bad') == '0' else 'NOT clean'))],
               ['mmap of a sparse raw file', f(num(ref, 'stored_MiB')), f(num(ref, 'store_s'), '%.2f'),
                f(num(ref, 'persist_s'), '%.2f'), f(rmb), f(num(ref, 'rss_max_MiB')),
                ref.get('persist_error', ref.get('na', 'no cap (page cache)'))]])
        if mb:
            print('  targets: >= 100 MB/s: %.1f %s; vs the mmap reference %s; peak RSS <= cap + 10%%: '
                  '%.0f MiB of %.0f %s' % (mb, mark(mb >= 100), f(mb / rmb, '%.2fx') if rmb else '-',
                                         rss, capmb * 1.1, mark(rss <= capmb * 1.1)))


def scale_table():
    secs = E.get('SECS', '?')
    print()
    print('At scale: 1 TiB sparse image, %s MiB cap, two threads storing whole pages at random,'
          ' a snapshot every second (oldest of three deleted), %s s' % (E['CAP'], secs))
    ref = load('scale-mmap')
    head = ['run', 'stores/s', 'vs mmap', 'snapshots', 'snap mean ms', 'snap max ms', 'delete mean ms',
            'peak RSS MiB', 'image MiB', 'qemu-img check']
    rows = []
    rs = num(ref, 'stores_per_s')
    for k in ('external', 'internal'):
        d = load('scale-%s' % k)
        if 'na' in d:
            print('  %s: n/a: %s' % (k, d['na']))
            continue
        s = num(d, 'stores_per_s')
        rows.append([k, f(s, '%.0f'), f(s / rs, '%.3fx') if rs else '-',
                     '%s (%s failed)' % (d.get('snapshots', '-'), d.get('snap_failed', '0')),
                     f(num(d, 'snap_mean_ms')), f(num(d, 'snap_max_ms')), f(num(d, 'delete_mean_ms')),
                     f(num(d, 'rss_max_MiB')), d.get('du_MiB', '-'), check(d)])
        if 'snap_first_error' in d:
            print('  %s: first snapshot error: %s' % (k, d['snap_first_error']))
        if 'persist_error' in d:
            print('  %s: final persist failed: %s' % (k, d['persist_error']))
    if 'na' in ref:
        print('  mmap reference: n/a: %s' % ref['na'])
    else:
        rows.append(['mmap of 1 TiB sparse raw', f(rs, '%.0f'), '1.00x', '-', '-', '-', '-',
                     f(num(ref, 'rss_max_MiB')), ref.get('du_MiB', '-'),
                     'final msync: ' + ref.get('persist_error', f(num(ref, 'final_persist_s'), '%.0f s'))])
    table(head, rows)
    capmb = float(E['CAP'])
    d = load('scale-external')
    if 'na' not in d and rs:
        s, m, rss = num(d, 'stores_per_s'), num(d, 'snap_mean_ms'), num(d, 'rss_max_MiB')
        print('  targets (external): stores/s >= 0.8x mmap: %.3fx %s; snapshot mean <= 200 ms: %s %s;'
              ' RSS <= cap + 10%%: %s' % (s / rs, mark(s / rs >= 0.8), f(m), mark(m <= 200),
                                          mark(rss <= capmb * 1.1)))


if E.get('TABLE') == 'scale':
    scale_table()
else:
    snap_tables()
