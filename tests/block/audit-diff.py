#!/usr/bin/env python3
"""Differential tester: pmemsnap qcow2 engine vs QEMU (qemu-io / qemu-img).

The same random operation sequence (write -P / write -z / write -z -u /
discard at random, often unaligned, offsets; write -c of whole clusters; snapshot -c / -a / -d; resize)
is applied once through `pmemsnap io` / `pmemsnap snapshot` / `pmemsnap
resize` and once through qemu-io / qemu-img on two copies of the same
starting image (made by qemu-img: various cluster sizes, compat 0.10 / 1.1,
extended_l2, refcount_bits, backing files, compressed clusters, zstd).

After every step `qemu-img check` must be clean on the pmemsnap image and
the guest contents of both images must be equal (`qemu-img compare`).  At the
end every snapshot is applied on copies of both images and compared, and
`qemu-img map --output=json` must equal `pmemsnap map --output=json`.

Usage: audit-diff.py [--seeds A-B,C,... | --seed N] [--steps N] [--cases]
                     [--avoid-known] [--no-shrink] [--no-compress] [--keep] [-v]
--cases runs the targeted reproductions of the bugs the fuzzer found;
--avoid-known steers the fuzzer around already reported bugs;
--session runs each seed's operations through the library in ONE open (a
small C driver compiled on the fly against build/lib) vs QEMU step by step.
The CLI is $PMEMSNAP (default build/tools/pmemsnap).  Exit 0 when all seeds
pass, 1 otherwise (77 = skipped: no qemu tools).
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

PMS = os.environ.get("PMEMSNAP") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "tools", "pmemsnap")
VERBOSE = False
SHRINK = True         # --no-shrink: grow only
AVOID_KNOWN = False   # --avoid-known: steer clear of already reported bugs
STRICT_MAP = True     # --loose-map: ignore the host-hole "zero" of data extents
COMPRESS = True       # --no-compress: no compressed writes (write -c)


class Fail(Exception):
    pass


def run(cmd, ok=(0,), **kw):
    if VERBOSE:
        print("  $ " + " ".join(cmd), file=sys.stderr)
    for attempt in range(50):      # the binary may be relinked under us
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               universal_newlines=True, **kw)
            break
        except (PermissionError, FileNotFoundError, OSError) as e:
            if attempt == 49:
                raise Fail("cannot run %s: %s" % (cmd[0], e))
            import time
            time.sleep(0.2)
    if ok is not None and p.returncode not in ok:
        raise Fail("command failed (rc=%d): %s\n%s" % (p.returncode, " ".join(cmd), p.stdout))
    return p


def io_fails(out):
    # qemu-io style tools print errors but may still exit 0
    for w in ("failed", "error", "Error", "Pattern verification"):
        if w in out:
            return True
    return False


class Config:
    def __init__(self, rnd):
        self.cbits = rnd.choice([9, 10, 12, 16, 16, 16, 17, 21])
        self.compat = rnd.choice(["0.10", "1.1", "1.1", "1.1"])
        v3 = self.compat == "1.1"
        self.ext_l2 = v3 and self.cbits >= 14 and rnd.random() < 0.4
        self.rbits = rnd.choice([1, 2, 4, 8, 16, 16, 16, 32, 64]) if v3 else 16
        self.lazy = v3 and rnd.random() < 0.2
        self.zstd = v3 and rnd.random() < 0.3
        self.backing = rnd.random() < 0.4
        self.compressed = rnd.random() < 0.3
        # big sparse images sometimes (exercise L1 / refcount table growth)
        if rnd.random() < 0.25 and self.cbits >= 12:
            self.size = rnd.choice([5 << 30, 9 << 30, (64 << 30) + 12345 * 512])
        else:
            self.size = rnd.randrange(1 << 20, 64 << 20)
        if rnd.random() < 0.5:
            self.size -= self.size % 512  # sizes not a cluster multiple are common
        else:
            self.size = (self.size + 511) // 512 * 512
        self.csize = 1 << self.cbits
        self.bsize = 0

    def opts(self):
        o = ["cluster_size=%d" % self.csize, "compat=%s" % self.compat]
        if self.compat == "1.1":
            o.append("refcount_bits=%d" % self.rbits)
            if self.ext_l2:
                o.append("extended_l2=on")
            if self.lazy:
                o.append("lazy_refcounts=on")
            if self.zstd:
                o.append("compression_type=zstd")
        return ",".join(o)

    def __str__(self):
        return ("cluster=%d compat=%s ext_l2=%s refcount_bits=%d lazy=%s zstd=%s "
                "backing=%s compressed=%s size=%d" % (
                    self.csize, self.compat, self.ext_l2, self.rbits, self.lazy,
                    self.zstd, self.backing, self.compressed, self.size))


def rand_range(rnd, cfg, size):
    """A random (off, len) inside [0, size), often unaligned."""
    cs = cfg.csize
    r = rnd.random()
    if r < 0.25:   # cluster aligned
        nclu = max(1, size // cs)
        c = rnd.randrange(nclu)
        off = c * cs
        ln = cs * rnd.randint(1, 3)
    elif r < 0.5:  # sector aligned
        off = rnd.randrange(0, size // 512) * 512
        ln = 512 * rnd.randint(1, 3 * max(1, cs // 512))
    elif r < 0.65:  # near the end of the image
        ln = rnd.randint(1, 3 * cs)
        off = max(0, size - rnd.randint(1, 2 * cs + 1))
    else:          # byte granular
        off = rnd.randrange(0, size)
        ln = rnd.randint(1, 3 * cs)
    # keep hot spots so that operations overlap
    if rnd.random() < 0.6 and size > 4 * cs:
        hot = [0, cs, size // 2, size - cs, (4 << 30) - cs]
        h = rnd.choice([x for x in hot if x < size])
        off = max(0, min(size - 1, h + rnd.randint(-cs, 2 * cs)))
    ln = max(1, min(ln, size - off))
    return off, ln


def make_start(rnd, cfg, d):
    base = os.path.join(d, "start.qcow2")
    if cfg.backing:
        bk = os.path.join(d, "backing.qcow2")
        # the backing file is sometimes larger than the overlay
        bsize = cfg.size if rnd.random() < 0.7 or AVOID_KNOWN else cfg.size + rnd.randint(1, 8 << 20) // 512 * 512
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
             "cluster_size=%d" % rnd.choice([512, 4096, 65536]), bk, str(bsize)])
        cmds = []
        for _ in range(rnd.randint(1, 6)):
            off, ln = rand_range(rnd, cfg, bsize)
            cmds += ["-c", "write -P %d %d %d" % (rnd.randint(1, 255), off, ln)]
        run(["qemu-io", "-f", "qcow2"] + cmds + [bk])
        cfg.bsize = bsize
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", cfg.opts(),
             "-b", bk, "-F", "qcow2", base, str(cfg.size)])
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", cfg.opts(), base, str(cfg.size)])
    cmds = []
    for _ in range(rnd.randint(0, 6)):
        off, ln = rand_range(rnd, cfg, cfg.size)
        if rnd.random() < 0.8:
            cmds += ["-c", "write -P %d %d %d" % (rnd.randint(1, 255), off, ln)]
        else:
            cmds += ["-c", "write -z %d %d" % (off, ln)]
    if cmds:
        run(["qemu-io", "-f", "qcow2"] + cmds + [base])
    if cfg.compressed:
        # compressed clusters: qemu-img convert -c (backing chain is flattened
        # unless we rebase it, so convert the top image alone)
        tmp = os.path.join(d, "conv.qcow2")
        args = ["qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o", cfg.opts()]
        if cfg.backing:
            args += ["-B", os.path.join(d, "backing.qcow2"), "-F", "qcow2"]
        run(args + [base, tmp])
        os.replace(tmp, base)
    return base


def both(ca, cb):
    """Run the pmemsnap and the QEMU command; they must agree on success."""
    pa = run(ca, ok=None)
    pb = run(cb, ok=None)
    if pa.returncode != pb.returncode:
        raise Fail("result differs: %s -> rc=%d %s / %s -> rc=%d %s" % (
            " ".join(ca), pa.returncode, pa.stdout, " ".join(cb), pb.returncode, pb.stdout))
    return pa.returncode == 0


def check(img, who):
    p = run(["qemu-img", "check", img], ok=None)
    if p.returncode != 0 or "leaked" in p.stdout:
        raise Fail("qemu-img check after %s: rc=%d\n%s" % (who, p.returncode, p.stdout))


def compare(a, b, what):
    p = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b], ok=None)
    if p.returncode != 0:
        raise Fail("contents differ (%s):\n%s" % (what, p.stdout))


def snap_names(img):
    p = run(["qemu-img", "snapshot", "-l", img])
    names = []
    for line in p.stdout.splitlines()[2:]:
        f = line.split()
        if len(f) >= 2:
            names.append(f[1])
    return names


def map_json(cmd):
    p = run(cmd)
    return json.loads(p.stdout)


def norm_map(m):
    """Drop the host-hole 'zero' of data extents (QEMU only reports it when it
    detects metadata preallocation; reported separately) and re-merge."""
    out = []
    for e in m:
        e = dict(e)
        if e.get("data") and "offset" in e:
            e["zero"] = False
        if out:
            p = out[-1]
            same = all(p.get(k) == e.get(k) for k in ("depth", "present", "zero", "data"))
            contig = ("offset" in p) == ("offset" in e) and (
                "offset" not in e or p["offset"] + p["length"] == e["offset"])
            if same and contig and p["start"] + p["length"] == e["start"]:
                p["length"] += e["length"]
                continue
        out.append(e)
    return out


def one_seed(seed, steps, keep):
    rnd = random.Random(seed)
    cfg = Config(rnd)
    d = tempfile.mkdtemp(prefix="audit-diff-%d-" % seed)
    log = []
    try:
        base = make_start(rnd, cfg, d)
        A = os.path.join(d, "pms.qcow2")
        B = os.path.join(d, "qemu.qcow2")
        shutil.copy(base, A)
        shutil.copy(base, B)
        size = cfg.size
        snaps = []
        nsnap = 0
        for step in range(steps):
            r = rnd.random()
            if r < 0.62:
                # a batch of I/O commands in one open
                cmds, qcmds = [], []
                for _ in range(rnd.randint(1, 4)):
                    off, ln = rand_range(rnd, cfg, size)
                    k = rnd.random()
                    if k < 0.5:
                        c = "write -P %d %d %d" % (rnd.randint(1, 255), off, ln)
                    elif k < 0.65:
                        c = "write -z %d %d" % (off, ln)
                    elif k < 0.8:
                        c = "write -z -u %d %d" % (off, ln)
                    elif k < 0.9 or not COMPRESS or cfg.compat != "1.1" or cfg.rbits < 16:
                        c = "discard %d %d" % (off, ln)
                    else:
                        # compressed write of whole clusters (the last one may
                        # be partial).  QEMU refuses to compress over an
                        # allocated cluster, pmemsnap replaces it: QEMU's side
                        # discards first (v3: the entry reads as zero, no
                        # offset).  Narrow refcounts are left out: packing
                        # differs once QEMU frees at once and we after a flush.
                        cs = cfg.csize
                        off -= off % cs
                        ln = min(size - off, cs * (1 + ln // cs))
                        c = "write -c -P %d %d %d" % (rnd.randint(1, 255), off, ln)
                        qcmds.append("discard %d %d" % (off, ln))
                    cmds.append(c)
                    qcmds.append(c)
                log.append("io: " + " ; ".join(cmds))
                ca = sum([["-c", c] for c in cmds], [])
                cb = sum([["-c", c] for c in qcmds], [])
                pa = run([PMS, "io", "-f", "qcow2"] + ca + [A], ok=None)
                pb = run(["qemu-io", "-f", "qcow2"] + cb + [B], ok=None)
                if (pa.returncode != 0 or io_fails(pa.stdout)) != (pb.returncode != 0 or io_fails(pb.stdout)):
                    raise Fail("io result differs: pmemsnap rc=%d\n%s\nqemu rc=%d\n%s" % (
                        pa.returncode, pa.stdout, pb.returncode, pb.stdout))
            elif r < 0.75 and not (AVOID_KNOWN and cfg.compressed):
                nsnap += 1
                name = "s%d" % nsnap
                log.append("snapshot -c " + name)
                pa = run([PMS, "snapshot", "-c", name, A], ok=None)
                pb = run(["qemu-img", "snapshot", "-c", name, B], ok=None)
                if pa.returncode != pb.returncode:
                    raise Fail("snapshot -c result differs: pmemsnap rc=%d %s / qemu rc=%d %s" % (
                        pa.returncode, pa.stdout, pb.returncode, pb.stdout))
                if pa.returncode == 0:
                    snaps.append((name, size))
                else:
                    log.append("(both failed: %s)" % pa.stdout.strip())
                    break   # QEMU leaves leaks behind after a failed create
            elif r < 0.83 and snaps:
                name, ssize = rnd.choice(snaps)
                log.append("snapshot -a " + name)
                if both([PMS, "snapshot", "-a", name, A], ["qemu-img", "snapshot", "-a", name, B]):
                    size = ssize
                else:
                    log.append("(both refused)")
                    break
            elif r < 0.9 and snaps:
                i = rnd.randrange(len(snaps))
                name = snaps.pop(i)[0]
                log.append("snapshot -d " + name)
                if not both([PMS, "snapshot", "-d", name, A], ["qemu-img", "snapshot", "-d", name, B]):
                    log.append("(both refused)")
                    break
            elif not (cfg.compat == "0.10" and snaps) and not (AVOID_KNOWN and size < cfg.bsize):
                # (QEMU refuses to resize a v2 image with snapshots; not exercised)
                if rnd.random() < 0.7 or not SHRINK:
                    ns = size + rnd.choice([512, cfg.csize, 3 * cfg.csize + 512,
                                            rnd.randrange(1, 64 << 20) // 512 * 512,
                                            (rnd.choice([1, 4, 9]) << 30) if cfg.cbits >= 16 else 4 << 20])
                    extra = []
                else:
                    ns = max(512, size - rnd.randrange(1, max(2, size // 2)) // 512 * 512)
                    extra = ["--shrink"]
                log.append("resize %d" % ns)
                pa = run([PMS, "resize", "-q"] + extra + [A, str(ns)], ok=None)
                pb = run(["qemu-img", "resize", "-q"] + extra + [B, str(ns)], ok=None)
                if pa.returncode == 0 and "Failed to zero out new clusters" in pb.stdout:
                    # v2 overlay over a longer backing file: QEMU gives up, we
                    # write zeroed clusters instead (content checked below)
                    cmds = []
                    for o in range(size, ns, 1 << 30):   # qemu-io reads at most 2 GiB - 512
                        cmds += ["-c", "read -P 0 %d %d" % (o, min(1 << 30, ns - o))]
                    v = run(["qemu-io", "-r"] + cmds + [A])
                    if io_fails(v.stdout):
                        raise Fail("grown area does not read as zeroes:\n" + v.stdout)
                    log.append("(QEMU cannot zero the new area of a v2 image; pmemsnap did)")
                    break
                if (pa.returncode == 0) != (pb.returncode == 0):
                    raise Fail("resize result differs: pmemsnap rc=%d %s / qemu rc=%d %s" % (
                        pa.returncode, pa.stdout, pb.returncode, pb.stdout))
                if pa.returncode == 0:
                    size = ns
            else:
                continue
            check(A, log[-1])
            check(B, "qemu " + log[-1])
            compare(A, B, "after step %d" % step)
        # maps of the same image through both tools
        ma = map_json([PMS, "map", "--output=json", A])
        mb = map_json(["qemu-img", "map", "--output=json", A])
        if not STRICT_MAP:   # host-hole "zero": QEMU asks the host file only for
                             # metadata-preallocated images (a heuristic)
            ma, mb = norm_map(ma), norm_map(mb)
        if ma != mb:
            raise Fail("map differs:\npmemsnap %s\nqemu-img %s" % (
                json.dumps(ma)[:2000], json.dumps(mb)[:2000]))
        # every snapshot, applied on copies
        na, nb = snap_names(A), snap_names(B)
        if sorted(na) != sorted(nb):
            raise Fail("snapshot lists differ: %s vs %s" % (na, nb))
        for name in na:
            ca, cb = A + ".c", B + ".c"
            shutil.copy(A, ca)
            shutil.copy(B, cb)
            pa = run([PMS, "snapshot", "-a", name, ca], ok=None)
            pb = run(["qemu-img", "snapshot", "-a", name, cb], ok=None)
            if pa.returncode != pb.returncode:
                raise Fail("snapshot -a %s result differs: pmemsnap rc=%d %s / qemu rc=%d %s" % (
                    name, pa.returncode, pa.stdout, pb.returncode, pb.stdout))
            if pa.returncode:
                continue    # both refuse (e.g. refcount overflow with small refcount_bits)
            check(ca, "apply " + name)
            compare(ca, cb, "snapshot " + name)
            # and qemu applying the snapshot of our image must agree too
            shutil.copy(A, cb)
            run(["qemu-img", "snapshot", "-a", name, cb])
            compare(ca, cb, "snapshot %s applied by qemu on our image" % name)
        return None
    except Fail as e:
        keep = True
        return "seed %d: %s\nconfig: %s\nsteps:\n  %s\n%s\nkept in %s" % (
            seed, str(e).strip()[:4000], cfg, "\n  ".join(log), "", d)
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


# ---- targeted cases (minimal reproductions of bugs found by the fuzzer) ----

def case_grow_over_larger_backing(d):
    """Growing an overlay whose backing file is larger must zero the new area
    (QEMU: bdrv_co_truncate sets BDRV_REQ_ZERO_WRITE)."""
    bk, a, b = (os.path.join(d, n) for n in ("back.qcow2", "a.qcow2", "b.qcow2"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", bk, "4M"])
    run(["qemu-io", "-c", "write -P 0xaa 0 4M", bk])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", bk, "-F", "qcow2", a, "1M"])
    shutil.copy(a, b)
    run([PMS, "resize", "-q", a, "3M"])
    run(["qemu-img", "resize", "-q", b, "3M"])
    check(a, "resize")
    compare(a, b, "after growing over a larger backing file")


def case_snapshot_compressed(d):
    """Snapshot create/apply/delete on an image with compressed clusters at
    unaligned host offsets (qemu-img convert -c)."""
    src, a, b = (os.path.join(d, n) for n in ("src.qcow2", "a.qcow2", "b.qcow2"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", src, "1M"])
    run(["qemu-io", "-c", "write -P 0x41 0 64k", "-c", "write -P 0x42 64k 1000", src])
    run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", src, a])
    shutil.copy(a, b)
    for img, snap in ((a, [PMS, "snapshot"]), (b, ["qemu-img", "snapshot"])):
        run(snap + ["-c", "s1", img])
        run(["qemu-io" if img == b else PMS] + (["io"] if img == a else []) +
            ["-c", "write -P 0x43 512 1k", img])
        run(snap + ["-c", "s2", img])
        run(snap + ["-a", "s1", img])
        run(snap + ["-d", "s2", img])
    check(a, "snapshots on a compressed image")
    compare(a, b, "snapshots on a compressed image")


def case_data_before_l2(d):
    """Crash ordering: data written into a reused ZERO_ALLOC cluster must be
    durable (file flush) before the L2 entry that makes it visible is written.
    Checked on the system-call order (needs strace)."""
    if not shutil.which("strace"):
        print("  (no strace: case_data_before_l2 skipped)")
        return
    img = os.path.join(d, "z.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"])
    run(["qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -z 0 64k", img])
    m = map_json(["qemu-img", "map", "--output=json", img])
    if "offset" not in m[0]:
        return          # QEMU did not keep the cluster: nothing to check
    host = m[0]["offset"]
    # LeakSanitizer cannot run under ptrace: off for a sanitized build
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "") + ":detect_leaks=0").lstrip(":")
    p = run(["strace", "-f", "-e", "trace=pwrite64,pwritev,fsync,fdatasync,fallocate",
             PMS, "io", "-c", "write -P 0x22 0 4k", img], env=env)
    unsynced = False
    for line in p.stdout.splitlines():
        if line.startswith(("fsync", "fdatasync")) or " fsync(" in line or " fdatasync(" in line:
            unsynced = False
            continue
        if "pwrite64(" not in line and "fallocate(" not in line:
            continue
        try:
            args = line.split("(", 1)[1].rsplit(")", 1)[0].split(",")
            off = int(args[-1]) if "pwrite64(" in line else int(args[-2])
        except (ValueError, IndexError):
            continue
        if host <= off < host + 65536:
            unsynced = True
        elif unsynced:
            raise Fail("metadata written at %d before the data written into cluster %d was "
                       "flushed:\n%s" % (off, host, p.stdout))


def case_discard_without_l2_over_backing(d):
    """Discard on a v3 overlay where no L2 table exists yet must still make
    the range read as zeroes (QEMU allocates the table, writes ZERO entries)."""
    bk, a, b = (os.path.join(d, n) for n in ("back.qcow2", "a.qcow2", "b.qcow2"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", bk, "4M"])
    run(["qemu-io", "-c", "write -P 0x77 0 4M", bk])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", bk, "-F", "qcow2", a, "4M"])
    shutil.copy(a, b)
    run([PMS, "io", "-c", "discard 0 64k", a])
    run(["qemu-io", "-c", "discard 0 64k", b])
    check(a, "discard")
    compare(a, b, "discard without an L2 table over a backing file")


SESSION_C = r'''
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "pmemsnap.h"
/* ops: w:OFF:LEN:PAT z:OFF:LEN d:OFF:LEN c:NAME a:NAME x:NAME f: -- all in one open */
int main(int argc, char **argv) {
    struct pms_open_opts o; pms_open_opts_init(&o);
    pms_dev *d; if (pms_open(argv[1], &o, &d) < 0) { printf("open: %s\n", pms_errmsg()); return 1; }
    for (int i = 2; i < argc; i++) {
        char *a = strdup(argv[i]); char op = a[0]; char *p = a + 2; int r = 0;
        if (op == 'w' || op == 'z' || op == 'd') {
            unsigned long long off = strtoull(strtok(p, ":"), 0, 0), len = strtoull(strtok(NULL, ":"), 0, 0);
            if (op == 'w') { int pat = atoi(strtok(NULL, ":")); char *b = malloc(len); memset(b, pat, len);
                             r = pms_pwrite(d, b, len, off); free(b); }
            else if (op == 'z') r = pms_write_zeroes(d, len, off);
            else r = pms_discard(d, len, off);
        } else if (op == 'c') r = pms_snapshot_create(d, p);
        else if (op == 'a') r = pms_snapshot_revert(d, p);
        else if (op == 'x') r = pms_snapshot_delete(d, p);
        else if (op == 'f') r = pms_flush(d);
        if (r < 0) { printf("op %s: %s\n", argv[i], pms_errmsg()); return 1; }
        free(a);
    }
    if (pms_close(d) < 0) { printf("close: %s\n", pms_errmsg()); return 1; }
    return 0;
}
'''


def session_tool(d):
    """Build a tiny one-session driver of the library (None if impossible)."""
    src = os.environ.get("SRCDIR")
    here = os.path.dirname(os.path.abspath(__file__))
    inc = os.path.join(src, "..", "include") if src else os.path.join(here, "..", "..", "include")
    libdir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(PMS))), "lib")
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not os.path.exists(os.path.join(inc, "pmemsnap.h")) or \
            not os.path.exists(os.path.join(libdir, "libpmemsnap.so")):
        return None
    c = os.path.join(d, "sess.c")
    with open(c, "w") as f:
        f.write(SESSION_C)
    exe = os.path.join(d, "sess")
    # a sanitized library needs the sanitizer runtime first in the driver
    san = ["-fsanitize=address,undefined"] if os.environ.get("PMS_SANITIZED") else []
    p = run([cc] + san + ["-I", inc, c, "-L", libdir, "-lpmemsnap", "-Wl,-rpath," + libdir,
                          "-o", exe], ok=None)
    return exe if p.returncode == 0 else None


def case_session_discard_then_snapshot(d):
    """Library, one open: discard on a shared L2 (COW, table not flushed yet)
    then snapshot create/apply must work (no bogus "corrupt")."""
    sess = session_tool(d)
    if not sess:
        print("  (cannot build the session driver: case skipped)")
        return
    a, b = os.path.join(d, "a.qcow2"), os.path.join(d, "b.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", a, "10M"])
    run(["qemu-io", "-c", "write -P 0x11 0 5M", a])
    shutil.copy(a, b)
    run([sess, a, "c:s1", "d:0:512", "c:s2", "d:512:512", "a:s1"])
    for c in (["qemu-img", "snapshot", "-c", "s1", b], ["qemu-io", "-c", "discard 0 512", b],
              ["qemu-img", "snapshot", "-c", "s2", b], ["qemu-io", "-c", "discard 512 512", b],
              ["qemu-img", "snapshot", "-a", "s1", b]):
        run(c)
    check(a, "session")
    compare(a, b, "one-session discard + snapshots")


CASES = [case_grow_over_larger_backing, case_snapshot_compressed, case_data_before_l2,
         case_discard_without_l2_over_backing, case_session_discard_then_snapshot]


def session_seed(seed, sess, keep):
    """One library session on the pmemsnap side (pending frees, deferred
    metadata and caches live across snapshot operations) against qemu-io /
    qemu-img run one command at a time."""
    rnd = random.Random(seed)
    cfg = Config(rnd)
    cfg.size = rnd.randrange(1, 16) * (1 << 20) + rnd.choice([0, 512, 1536])
    d = tempfile.mkdtemp(prefix="audit-sess-%d-" % seed)
    ops, snaps, n = [], [], 0
    try:
        A, B = os.path.join(d, "a.qcow2"), os.path.join(d, "b.qcow2")
        base = make_start(rnd, cfg, d)
        shutil.copy(base, A)
        shutil.copy(base, B)
        for _ in range(rnd.randint(5, 25)):
            r = rnd.random()
            off, ln = rand_range(rnd, cfg, cfg.size)
            if r < .35:
                ops.append(("w", off, ln, rnd.randint(1, 255)))
            elif r < .45:
                ops.append(("z", off, ln))
            elif r < .55 and not (AVOID_KNOWN and cfg.backing):
                ops.append(("d", off, ln))
            elif r < .7 and not (AVOID_KNOWN and cfg.compressed):
                n += 1
                ops.append(("c", "s%d" % n))
                snaps.append("s%d" % n)
            elif r < .8 and snaps:
                ops.append(("a", rnd.choice(snaps)))
            elif r < .88 and snaps:
                ops.append(("x", snaps.pop(rnd.randrange(len(snaps)))))
            elif r < .95:
                ops.append(("f",))
        if AVOID_KNOWN:     # flush before snapshot operations
            ops = sum([[("f",), o] if o[0] in "cax" else [o] for o in ops], [])
        args = []
        for o in ops:
            if o[0] == "w":
                args.append("w:%d:%d:%d" % o[1:])
            elif o[0] in "zd":
                args.append("%s:%d:%d" % o)
            elif o[0] == "f":
                args.append("f:")
            else:
                args.append("%s:%s" % o)
        p = run([sess, A] + args, ok=None)
        qfail = None
        for o in ops:
            if o[0] == "w":
                c = ["qemu-io", "-c", "write -P %d %d %d" % (o[3], o[1], o[2]), B]
            elif o[0] == "z":
                c = ["qemu-io", "-c", "write -z %d %d" % (o[1], o[2]), B]
            elif o[0] == "d":
                c = ["qemu-io", "-c", "discard %d %d" % (o[1], o[2]), B]
            elif o[0] == "f":
                continue
            else:
                c = ["qemu-img", "snapshot", "-" + {"c": "c", "a": "a", "x": "d"}[o[0]], o[1], B]
            q = run(c, ok=None)
            if q.returncode:
                qfail = q.stdout
                break
        if qfail is not None:
            return None     # QEMU refused something (e.g. refcount overflow): not comparable
        if p.returncode:
            raise Fail("session failed: %s" % p.stdout)
        check(A, "session")
        compare(A, B, "after the session")
        for name in snap_names(A):
            ca, cb = A + ".c", B + ".c"
            shutil.copy(A, ca)
            shutil.copy(B, cb)
            if both(["qemu-img", "snapshot", "-a", name, ca], ["qemu-img", "snapshot", "-a", name, cb]):
                compare(ca, cb, "snapshot " + name)
        return None
    except Fail as e:
        keep = True
        return "session seed %d: %s\nconfig: %s\nsession: %s\nkept in %s" % (
            seed, str(e).strip()[:3000], cfg, " ".join(args) if ops else "", d)
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def run_cases(keep):
    bad = 0
    for c in CASES:
        d = tempfile.mkdtemp(prefix="audit-case-")
        try:
            c(d)
            print("ok case %s" % c.__name__, flush=True)
            if not keep:
                shutil.rmtree(d, ignore_errors=True)
        except Fail as e:
            bad += 1
            print("FAIL case %s: %s\nkept in %s" % (c.__name__, str(e).strip()[:2000], d), flush=True)
    return bad


def main():
    global VERBOSE
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1-8")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("-v", action="store_true")
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--loose-map", action="store_true")
    ap.add_argument("--no-compress", action="store_true")
    ap.add_argument("--avoid-known", action="store_true")
    ap.add_argument("--cases", action="store_true", help="also run the targeted cases")
    ap.add_argument("--session", action="store_true",
                    help="seeds run as one library session (built on the fly) instead")
    a = ap.parse_args()
    global SHRINK, AVOID_KNOWN, STRICT_MAP, COMPRESS
    VERBOSE, SHRINK, AVOID_KNOWN, STRICT_MAP = a.v, not a.no_shrink, a.avoid_known, not a.loose_map
    COMPRESS = not a.no_compress
    if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        print("SKIP: qemu tools not installed")
        return 77
    if a.seed is not None:
        seeds = [a.seed]
    else:
        seeds = []
        for part in a.seeds.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                seeds += list(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    bad = run_cases(a.keep) if a.cases else 0
    sess = None
    if a.session:
        sd = tempfile.mkdtemp(prefix="audit-sesstool-")
        sess = session_tool(sd)
        if not sess:
            print("SKIP: cannot build the session driver")
            return 77
    for s in seeds:
        err = session_seed(s, sess, a.keep) if sess else one_seed(s, a.steps, a.keep)
        if err:
            bad += 1
            print("FAIL " + err, flush=True)
        else:
            print("ok seed %d" % s, flush=True)
    print("%d failures (%d seeds%s)" % (bad, len(seeds), " + cases" if a.cases else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
