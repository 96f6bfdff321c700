/* Memory device, buffered mode: an image exposed as an anonymous mapping
 * whose pages are faulted in lazily through userfaultfd and written back
 * through the block layer.
 *
 * Page states (per 4 KiB page of the mapping):
 *   MISSING   pte none; the image holds the page's bytes.  A touch raises a
 *             missing fault; the fault thread reads the surrounding chunk (a
 *             random fault under a cap smaller than the mapping: the page)
 *             (bdev_block_status: zero extents need no I/O) and installs it
 *             write-protected (UFFDIO_COPY_MODE_WP; zero extents are copied
 *             from a zeroed buffer because uffd-wp does not stick to the
 *             shared zero page; read-only mappings use UFFDIO_ZEROPAGE).
 *   CLEAN     resident, write-protected, bytes == image bytes (or a newer
 *             write of them is in flight from the writeback path).
 *   DIRTY     resident, written since its last writeback.  Async mode
 *             (UFFD_FEATURE_WP_ASYNC): the kernel resolves the first store
 *             and clears the pte's uffd-wp bit; PAGEMAP_SCAN with
 *             PM_SCAN_WP_MATCHING reports written pages and re-protects
 *             them in one call.  Sync mode: the store raises a WP fault, the
 *             fault thread sets the page's bit in `dirty` and un-protects.
 *   POISONED  fault-in failed with an I/O error; UFFDIO_POISON makes every
 *             access SIGBUS until the page is dropped (revert).  Its bit in
 *             `poison` is set before the marker is installed; PAGEMAP_SCAN
 *             reports the marker as a written swap entry, so writeback,
 *             the cut and eviction skip poisoned pages by that bit, and
 *             pms_pread/pms_pwrite refuse them with EIO instead of SIGBUS.
 *   SWAPPED   a resident page the kernel swapped out: still CLEAN or DIRTY
 *             (the uffd-wp bit lives in the swap entry), so every dirty scan
 *             asks for written pages that are present OR swapped.
 * Transitions: MISSING->CLEAN (fault/prefetch, under mu), CLEAN->DIRTY
 * (store), DIRTY->CLEAN (writeback: re-protect first, then write the bytes
 * from the mapping; a store racing the write re-dirties the page, so the
 * image converges), CLEAN->MISSING (eviction/revert, MADV_DONTNEED).
 * Invariant: a MISSING page is never newer in memory than in the image,
 * so fault-in may always read the image.  Only clean pages are dropped,
 * and only while no store can slip in between the check and the drop
 * (sync: stores fault to us and wait on wp_mu; async: a safepoint).
 *
 * Threads:
 *   fault thread    reads uffd messages, serves missing faults (mu),
 *                   sync WP faults (wp_mu), poisons on read errors.
 *                   Never touches the mapping with loads/stores; over the
 *                   memory cap it waits (at most 200 ms) for an eviction
 *                   round, then installs anyway; during a pre-copy that does
 *                   not converge it delays each missing fault (auto-converge,
 *                   at most CONVERGE_MAX_US); in a capped sync-mode mapping
 *                   over its dirty limit (DIRTY_MAX_RUNS runs, or
 *                   DIRTY_MAX_SEQ_BYTES) it waits (at most
 *                   DIRTY_WAIT_MS per fault, no lock held) for the writeback.
 *   writeback thread every writeback_interval_ms (backing off up to 16 s
 *                   while the same hot set stays dirty; or when kicked):
 *                   writes dirty pages back (wb_mu), evicts clean pages over
 *                   the memory cap (wb_mu, mu, safepoint), then kicks the
 *                   write-out thread (ctl_mu).
 *   write-out thread starts the device write-out of each round's file
 *                   (bdev_writeout_start; no lock of ours held), and at
 *                   most every CKPT_INTERVAL_MS a metadata checkpoint
 *                   (bdev_checkpoint: bs->snap_lock tried, bs->lock around
 *                   its metadata writes, the file flush with neither held).
 * Between stopping the application (safepoint.c) and releasing it, no code
 * here calls malloc or takes a lock an application thread may hold.
 *   prefetch thread optional; installs missing chunks front to back (mu).
 *   scan helper     async mode, mappings of SCAN_SPLIT_MIN or more, two or
 *                   more CPUs: walks the upper half of a read-only dirty
 *                   scan (the cut, the pre-copy's probe) for a caller that
 *                   holds wb_mu and waits for it (sc_mu guards the job;
 *                   vec2 is the helper's from hand-off to join).  Touches
 *                   no page and no other state.
 *   callers         persist/snapshot/revert/unmap take wb_mu (a revert raises
 *                   wb_cancel first: the round in progress stops at its next
 *                   batch, its unwritten pages dirty again, and no new round
 *                   starts while it waits); pread/pwrite
 *                   copy to/from the mapping a step at a time under mu
 *                   (and, sync mode, wp_mu), with the safepoint signal
 *                   blocked meanwhile (io_copy).
 * Locks, in order: wb_mu (one writer of memory contents to the image at a
 * time; held across a snapshot so nothing dirtied after the cut reaches the
 * image before the commit; the cut leaves the final set DIRTY, so the
 * first writeback after the commit writes it again) -> mu (residency bitmap, installs and drops,
 * the known-zero map) ->
 * wp_mu (sync-mode dirty bitmap; never held across I/O or malloc) ->
 * bs->lock (taken inside bdev_*).  Counters are atomics, read lock-free.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "pms-dev.h"
#include "util/error.h"
#include "mem-int.h"
#include "uffd-compat.h"
#include "block/extsnap.h"

#define PG          4096ull
#define RA_MAX      (4ull << 20)      /* sequential read-ahead window */
#define PF_STEP     (1ull << 20)      /* prefetch unit */
#define SCAN_VEC    65536             /* PAGEMAP_SCAN output entries */
#define EVICT_STEP  (2ull << 20)
/* Span of one page-table page (x86-64: 512 PTEs).  A lazily freed page
 * leaves its page table behind; random stores over a 1 TiB mapping grew
 * VmPTE to 1 GB under a 1 GiB cap before eviction reclaimed them. */
#define PT_SPAN     (2ull << 20)
#define CHUNK_MAX   (64ull << 20)             /* largest fault-in unit */
/* Shortest gap between two metadata checkpoints of the write-out thread,
 * in ms (see wo_main). */
#define CKPT_INTERVAL_MS 50

/* Memory-cap policy, in percent of mem_limit.  Writeback evicts above
 * CAP_EVICT_PCT (room left for the faults that arrive between rounds) down to
 * CAP_TARGET_PCT (hysteresis: one round frees enough for many faults instead
 * of a round per fault).  A fault that would exceed the cap waits at most
 * CAP_WAIT_MS for a round, then installs anyway (a stuck writeback must not
 * hang the application).  Read-ahead and prefetch are bounded so that they
 * never fill the cap by themselves. */
#define CAP_EVICT_PCT     88
#define CAP_TARGET_PCT    75
#define CAP_WAIT_MS       200
#define CAP_RA_PCT        12      /* read-ahead window above this: one chunk */
/* The cap counts the per-page bitmaps the device keeps for the whole
 * mapping (resident, known-zero; since-snapshot and, with sync tracking,
 * dirty: one bit per page each) as if resident: random stores touch every
 * page of them (a 1 TiB mapping: 128 MiB; 96 MiB of them put RSS at 1,130
 * MiB under a 1 GiB cap before they were counted).
 * They take at most 1/CAP_META_MAX_DIV of the cap; beyond that the mapping
 * is too large for the cap to hold both, and RSS exceeds it by the rest.
 * The block layer's metadata memory (bdev_meta_bytes: L2 and refcount
 * caches of the image and each layer, chain maps, a delete's merge
 * buffers) is counted in what the bitmaps leave of that share: a 64 GiB
 * image under a 256 MiB cap with a snapshot every second held 70 MiB of it,
 * and peaked at 318-337 MiB RSS while it was not counted. */
#define CAP_META_MAX_DIV  4
#define CAP_PREFETCH_PCT  50      /* prefetch stops at this residency */

/* Writeback period: default, and the longest period a back-off reaches
 * while the same hot set is dirty round after round (each re-protect costs
 * the next store a fault).  The default is short so that what a snapshot or
 * persist must still write and sync is what changed in the last ~100 ms:
 * after 10 MiB of random stores, a 1 s period left all 10 MiB (2,560
 * scattered writes, ~40 ms of device time here) to the snapshot call.  A
 * round over a mapping with nothing dirty costs one PAGEMAP_SCAN walk. */
#define WB_INTERVAL_MS    100
#define WB_PERIOD_MAX_MS  16000
/* While writers keep dirtying pages that are new since the last snapshot
 * (a round wrote at least WB_STREAM_BYTES, mostly fresh), the next round
 * follows after WB_STREAM_GAP_MS instead of a whole period, as the kernel's
 * background writeback keeps going while it is over its threshold: the
 * backlog a snapshot or persist inherits stays a few ms of stores. */
#define WB_STREAM_BYTES   (256u << 10)
#define WB_STREAM_GAP_MS  10
/* Write faults (a store to a missing page: that page is dirty from the
 * start) kick a round once WB_KICK_PAGES of them arrived since the last
 * round began, and at least WB_STREAM_GAP_MS after it ended: a burst of
 * random stores into a mapped image is written while it runs instead of
 * waiting out the period (10 MiB of random stores took 96 ms here, less
 * than one period, and the snapshot after them then wrote all of it).
 * Not when the mapping asked for a period longer than the default: that
 * asks for little background writing. */
#define WB_KICK_PAGES     64
/* A round is a hot set's (and may back off) when at least 1/WB_HOT_DIV of
 * its pages were written back before since the last snapshot. */
#define WB_HOT_DIV        2

/* Snapshot pre-copy: at most PRECOPY_ROUNDS rounds while writers run,
 * stopping early once a round writes less than PRECOPY_DONE_BYTES (the
 * final set is then small enough to copy inside the pause) or no less than
 * the one before (writers dirty as fast as we write). */
#define PRECOPY_ROUNDS     6
#define PRECOPY_DONE_BYTES (256u << 10)
/* Auto-converge (what QEMU's migration does to vCPUs): a pre-copy round
 * that writes more than half of what the one before wrote means the
 * writers dirty pages about as fast as they are written (random stores over
 * an image far larger than memory).  Each such round doubles a delay the
 * fault thread puts before every missing-page fault it serves, from
 * CONVERGE_START_US up to CONVERGE_MAX_US, until the cut: the stores that
 * need a new page slow down and the rounds shrink.  (Stores to resident
 * pages are not slowed: the kernel resolves their write-protect faults.) */
#define CONVERGE_START_US  50
#define CONVERGE_MAX_US    1600
/* Dirty limit of a capped mapping (sync tracking, where ndirty is kept):
 * while more than DIRTY_MAX_RUNS separate runs (or DIRTY_MAX_SEQ_BYTES in
 * all, at most 1/DIRTY_SEQ_CAP_DIV of the cap) are dirty, the fault thread
 * waits for the writeback (polling every DIRTY_POLL_US, at most
 * DIRTY_WAIT_MS per fault, so a stuck writeback slows writers but never
 * hangs them), as the kernel's dirty throttling does.  Under a cap every
 * dirty page must be written before it can be evicted, so writers cannot
 * outrun the writeback for long anyway; without a limit they filled the cap
 * with dirty pages and the next snapshot's pre-copy wrote all of them
 * (1 TiB image, 1 GiB cap, random stores: 375-500 MB per snapshot,
 * 2.4-3.3 s).  What a pre-copy pays for is mostly one write per run, so the
 * limit counts runs: measured there, 20 s runs, a limit of 4,096 single
 * pages gave 16.4k stores/s and a 554 ms snapshot mean, 1,024 pages
 * 13.0-13.4k and 233 ms, 512 pages 13.0-13.6k and 146-184 ms (without the
 * limit and the page-sized ZGRAIN: 10.6-10.9k, 88-90 ms).  Contiguous
 * stores write back at disk speed, so they are held only at
 * DIRTY_MAX_SEQ_BYTES: with 512 pages as a byte limit, 2 GiB of sequential
 * stores into a 1 TiB image under a 1 GiB cap ran at 153-166 MB/s, and
 * 180 MB/s without it. */
#define DIRTY_MAX_RUNS      512u
#define DIRTY_MAX_SEQ_BYTES (32ull << 20)
#define DIRTY_SEQ_CAP_DIV   8u
/* The same limits while a snapshot's pre-copy runs: writers are held so the
 * rounds drain the backlog instead of chasing them (pre-copy at the limit
 * above: 47-50 MB written over 0.7-1.1 s per snapshot). */
#define DIRTY_PRECOPY_RUNS  256u
#define DIRTY_PRECOPY_SEQ_BYTES (16ull << 20)
#define DIRTY_POLL_US     100
#define DIRTY_WAIT_MS     20
/* Floor of the byte limit: an eighth of a tiny cap (the smallest accepted
 * is four chunks: 16 KiB) is less than a page, and every fault then waited
 * DIRTY_WAIT_MS (a store over 4,536 pages took minutes, which looked like a
 * hang).  16 pages: the writeback writes them in one round. */
#define DIRTY_MIN_SEQ_BYTES (64u << 10)
/* After serving a fault, the fault thread polls the uffd without sleeping
 * for FAULT_SPIN_US before it blocks in poll(2): random stores fault again
 * within microseconds, and waking a sleeping thread (an IPI to an idle,
 * halted vCPU) was most of a fault's round trip on the nested test VM. */
#define FAULT_SPIN_US      50
/* How long the cut waits for every application thread to park. */
#define SNAP_STOP_MS       1000
/* A thread can sit in an uninterruptible kernel wait longer than that on a
 * loaded machine (a page fault queued behind another thread's mmap_lock
 * writer, a write throttled by the block layer; seen at scale): the stop is
 * tried SNAP_STOP_TRIES times, the threads running freely for
 * SNAP_STOP_GAP_MS in between, before the snapshot fails. */
#define SNAP_STOP_TRIES    3
#define SNAP_STOP_GAP_MS   20
/* PMS_DIRTY_AUTO picks synchronous write-protect faults over WP_ASYNC +
 * PAGEMAP_SCAN when a memory cap keeps at most 1/SPARSE_SYNC_DIV of the
 * mapping resident.  A scan walks every page table that holds a resident
 * page, all 512 entries of it; pages scattered one per 2 MiB make that 512
 * entries per page, every writeback round and every snapshot pre-copy
 * round.  The dirty bitmap of sync mode costs one bit per page and no walk;
 * its price, a fault on the first store to a page written back, is rare when
 * most of the mapping cannot be resident.  At scale (1 TiB image, 1 GiB cap,
 * random stores, a snapshot a second): pre-copy 13-16 s -> snapshot 131 ms
 * mean.  A 64 GiB image under a 1 GiB cap (ratio 64) stays asynchronous. */
#define SPARSE_SYNC_DIV    256
/* Read-only dirty scans (the cut inside the pause, the pre-copy's probe)
 * of an async-mode mapping of at least SCAN_SPLIT_MIN bytes are walked by
 * two threads, each half of the mapping, on a machine with two or more
 * CPUs: a walk visits every resident page's table entry (16 GiB: 4 million,
 * ~3-5 ms here), the application is parked during the cut, so a core is
 * free, and PAGEMAP_SCAN takes the mmap_lock only for reading.  Below
 * that, a walk is shorter than the hand-off.  Scans that re-protect
 * (writeback) are not split: two re-protecting walks of one mm interrupt
 * each other with TLB flushes (in a micro-benchmark over 16 GiB, two
 * halves in parallel took twice as long as one walk; read-only halves
 * took 0.6x). */
#define SCAN_SPLIT_MIN     (2ull << 30)
/* Staging pages kept touched between snapshots (a first touch costs a
 * fault each, ~10 us under shadow paging): at most STAGE_KEEP_MAX bytes and
 * 100/STAGE_KEEP_CAP_DIV percent of a memory cap.  They count against the cap. */
#define STAGE_KEEP_MAX     (32ull << 20)
#define STAGE_KEEP_CAP_DIV 8

/* Known-zero map (see zero_known): one bit per ZGRAIN bytes of the image,
 * filled a ZREGION at a time.  ZGRAIN: a page, so that a page written back
 * leaves its neighbours known zero.  With a 64 KiB granule, a fault next to
 * a written page asked block status under the node's lock, and waited out
 * a whole writeback batch for it: at scale (1 TiB, 1 GiB cap, random
 * stores, snapshot/s) 876 such faults in 20 s, 820 of them zero, kept the
 * fault thread waiting on the lock in 3 of 7 stack samples.  The map then
 * costs a bit per page, counted against the cap with the other bitmaps.
 * ZREGION: what one L2 table of 64 KiB clusters with extended L2 maps
 * (256 MiB), so filling a region reads at most one L2 table per layer, and
 * a 1 TiB image has 4096 regions. */
#define ZGRAIN      4096ull
#define ZREGION     (256ull << 20)

/* Summary of the sync-mode dirty bitmap: one bit per DSUM_PAGES pages (64
 * words of `dirty`), so a writeback round over a 1 TiB mapping skips 1,024
 * summary words instead of reading 32 MiB of bitmap (every 10 ms while
 * streaming, that read was 15% of the writeback thread at scale). */
#define DSUM_SHIFT  12
#define DSUM_PAGES  (1ull << DSUM_SHIFT)

struct run { uint64_t off, len, stage; };

/* Bytes per piece of a pms_pread/pms_pwrite while mapped: the piece is
 * faulted in and copied under `mu`, so this bounds how long the fault thread
 * waits on a large copy (~0.1 ms per MiB here). */
#define IO_STEP     (1ull << 20)

struct pms_mem {
    pms_dev *dev;
    struct bdev *bs;
    uint8_t *base;
    uint64_t maplen, size, npages;
    uint64_t chunk;
    bool ro, async, wp;
    bool bstat;                      /* the image answers block status (set at map) */
    int uffd, pagemap_fd, evfd;
    int pidfd;                       /* our own pidfd for process_madvise, or -1 */
    uint64_t features;
    unsigned interval_ms;
    uint64_t limit_pages;            /* the cap less the bitmaps (see CAP_META_MAX_DIV) */
    uint64_t meta_room;              /* pages of the block layer's metadata counted
                                        against the cap at most (see used_pages) */

    pthread_mutex_t mu, wp_mu, wb_mu;
    pthread_mutex_t ctl_mu;          /* kick/evict handshake with writeback thread */
    pthread_cond_t ctl_cond, evict_cond;
    pthread_cond_t wo_cond;          /* wakes the write-out thread (ctl_mu) */
    bool kick, want_evict;
    bool wo_kick;                    /* a round was written: start its write-out (ctl_mu) */
    uint64_t evict_rounds;
    _Atomic uint64_t wfaults;        /* write faults since the last round began */
    _Atomic uint64_t round_end_ns;   /* when the last writeback round ended */

    uint64_t *resident, *dirty;      /* bitmaps (mu / wp_mu) */
    uint64_t *dsum;                  /* sync mode: bit g set if group g of `dirty` (DSUM_PAGES
                                        pages) may hold a dirty bit; never clear while it
                                        does (wp_mu) */
    uint64_t *poison;                /* poisoned pages; set under mu, read anywhere
                                        (atomic word loads) */
    _Atomic bool no_evict;           /* a failed re-dirty left a written page looking
                                        clean: eviction could drop it, so it stops */
    _Atomic unsigned wb_cancel;      /* callers waiting for wb_mu to discard what a
                                        background round writes (revert): the round
                                        stops at its next batch */
    _Atomic unsigned converge_us;    /* delay before each missing fault (pre-copy) */
    atomic_bool precopying;          /* a pre-copy runs (see DIRTY_PRECOPY_RUNS) */
    uint64_t wb_again;               /* pages writeback found in `since` already
                                        (wb_mu): the backoff's hot-set test */
    uint64_t *since;                 /* pages written to the image since snapshot
                                        since_name was taken or reverted to (wb_mu) */
    uint64_t *since_sum;             /* which pages of `since` hold a set bit
                                        (SINCE_SUM_SHIFT; wb_mu): a reset clears
                                        only those */
    char *since_name;                /* NULL: `since` means nothing (wb_mu) */
    uint8_t *fbuf, *pbuf;            /* fault / prefetch read buffers */
    struct page_region *vec;         /* PAGEMAP_SCAN output (wb_mu) */
    struct run *runs;                /* writeback and snapshot cut runs (wb_mu) */
    struct bdev_wvec *wv;            /* one write batch (wb_mu) */
    uint64_t nruns_max;
    uint8_t *stage;                  /* snapshot staging (wb_mu) */
    uint64_t stage_warm;             /* stage bytes touched from user space and kept (wb_mu) */
    _Atomic uint64_t stage_pages;    /* staging pages in memory, counted against the cap */
    /* zknown: bit g set = the image (its whole chain) reads as zeroes over
     * granule g and nothing was written there since the bit was set;
     * zscanned: region bits, set once zknown was filled for the region.
     * Set under mu from block status taken under mu; cleared under mu
     * after every write of the granule (write_runs) and wholesale by
     * revert; read under mu by the fault path. */
    uint64_t *zknown, *zscanned;
    uint64_t nzgrain, nzregion;
    uint64_t seq_next, ra, hand;     /* seq_next, ra: the fault thread's own */
    atomic_bool ra_reset;            /* revert: the fault thread forgets its
                                        sequential run (seq_next) at its next fault */
    uint64_t zero_focus;             /* see serve_missing (mu; UINT64_MAX: none) */
    uint64_t wfocus;                 /* sync mode: the page a write fault installs
                                        writable; install resets it to UINT64_MAX once
                                        it did (mu) */

    pthread_t fault_th, wb_th, pf_th, wo_th, sc_th;
    bool have_wb, have_pf, have_fault, have_wo, have_sc;
    /* scan helper (SCAN_SPLIT_MIN): a caller holding wb_mu hands it the
     * upper part of a read-only scan; sc_mu guards the job below, and vec2
     * belongs to the helper from sc_go until sc_done */
    pthread_mutex_t sc_mu;
    pthread_cond_t sc_cond;
    struct page_region *vec2;
    uint64_t sc_s, sc_e, sc_next;
    int sc_n;
    bool sc_go, sc_done;
    _Atomic bool stop;

    /* ndruns: dirty runs in sync mode (maximal stretches of dirty pages),
     * kept with the dirty bits under wp_mu, read without it (throttle_dirty) */
    _Atomic uint64_t faults, wp_faults, bytes_in, bytes_out, nresident, ndirty, ndruns,
                     evicted, snapshots, snap_ns, snap_pause_ns, snap_bytes, io_errors;
    char lasterr[160];               /* mu */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The CLOCK_REALTIME instant ms from now (the conditions' clock). */
static struct timespec deadline_ms(uint64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ns = (uint64_t)ts.tv_nsec + ms * 1000000ull;
    ts.tv_sec += (time_t)(ns / 1000000000ull);
    ts.tv_nsec = (long)(ns % 1000000000ull);
    return ts;
}

/* Wait on c (mu held) for at most ms. */
static void timed_wait(pthread_cond_t *c, pthread_mutex_t *mu, uint64_t ms)
{
    struct timespec ts = deadline_ms(ms);
    pthread_cond_timedwait(c, mu, &ts);
}

static bool bit(const uint64_t *b, uint64_t i) { return (b[i >> 6] >> (i & 63)) & 1; }
/* Bitmaps also read without their lock (resident and poison, by writeback's
 * fill_mem and write_runs) are changed with atomic operations. */
static bool abit(const uint64_t *b, uint64_t i)
{
    return (__atomic_load_n(&b[i >> 6], __ATOMIC_ACQUIRE) >> (i & 63)) & 1;
}
static void abset(uint64_t *b, uint64_t i)
{
    __atomic_fetch_or(&b[i >> 6], 1ull << (i & 63), __ATOMIC_RELEASE);
}
static void abclr(uint64_t *b, uint64_t i)
{
    __atomic_fetch_and(&b[i >> 6], ~(1ull << (i & 63)), __ATOMIC_RELEASE);
}
static void bset(uint64_t *b, uint64_t i) { b[i >> 6] |= 1ull << (i & 63); }
static void bclr(uint64_t *b, uint64_t i) { b[i >> 6] &= ~(1ull << (i & 63)); }

/* Pages of the mapping per bit of since_sum: one 4 KiB page of `since`. */
#define SINCE_SUM_SHIFT 15

static uint64_t since_sum_bytes(const struct pms_mem *m)
{
    return ((m->npages >> SINCE_SUM_SHIFT) / 64 + 1) * 8;
}

static void *vmalloc(uint64_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Sync mode: mark page p dirty.  wp_mu held. */
static void mark_dirty(struct pms_mem *m, uint64_t p)
{
    if (bit(m->dirty, p))
        return;
    /* a new run, an extension of one, or the join of two */
    bool left = p > 0 && bit(m->dirty, p - 1), right = bit(m->dirty, p + 1);
    bset(m->dirty, p);
    bset(m->dsum, p >> DSUM_SHIFT);
    atomic_fetch_add(&m->ndirty, 1);
    if (!left && !right)
        atomic_fetch_add(&m->ndruns, 1);
    else if (left && right)
        atomic_fetch_sub(&m->ndruns, 1);
}

/* Sync mode: the dirty run [p, q) (all dirty) was cleared; what is left of
 * the run it was part of are its dirty neighbours.  wp_mu held. */
static void runs_cleared(struct pms_mem *m, uint64_t p, uint64_t q)
{
    bool left = p > 0 && bit(m->dirty, p - 1), right = bit(m->dirty, q);
    if (!left && !right)
        atomic_fetch_sub(&m->ndruns, 1);
    else if (left && right)
        atomic_fetch_add(&m->ndruns, 1);
}

/* ---- uffd primitives ------------------------------------------------------ */

static int uwake(struct pms_mem *m, uint64_t off, uint64_t len)
{
    struct uffdio_range r = { (uint64_t)(uintptr_t)(m->base + off), len };
    return ioctl(m->uffd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

static int uprotect(struct pms_mem *m, uint64_t off, uint64_t len, bool wp, bool wake)
{
    struct uffdio_writeprotect w = {
        .range = { (uint64_t)(uintptr_t)(m->base + off), len },
        /* WP|DONTWAKE is EINVAL: protecting never wakes anyway */
        .mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP :
                (wake ? 0 : UFFDIO_WRITEPROTECT_MODE_DONTWAKE),
    };
    while (ioctl(m->uffd, UFFDIO_WRITEPROTECT, &w) < 0)
        if (errno != EAGAIN)
            return -errno;
    return 0;
}

/* Mark [off, off+len) resident (mu held). */
static void mark_resident(struct pms_mem *m, uint64_t off, uint64_t len)
{
    for (uint64_t p = off / PG; p < (off + len) / PG; p++)
        if (!bit(m->resident, p)) {
            abset(m->resident, p);
            atomic_fetch_add(&m->nresident, 1);
        }
}

/* Install bytes (src) or zeroes (src NULL) over missing pages in
 * [off, off+len); pages that turn out present are skipped.  mu held. */
static int install(struct pms_mem *m, uint64_t off, uint64_t len, const uint8_t *src)
{
    while (len) {
        long done;
        if (src) {
            /* the write focus alone is installed writable (see serve_missing) */
            uint64_t f = m->wfocus, n = len;
            bool wp = m->wp;
            if (f == off)
                n = PG, wp = false;
            else if (f > off && f < off + len)
                n = f - off;
            struct uffdio_copy c = {
                .dst = (uint64_t)(uintptr_t)(m->base + off),
                .src = (uint64_t)(uintptr_t)src, .len = n,
                .mode = UFFDIO_COPY_MODE_DONTWAKE | (wp ? UFFDIO_COPY_MODE_WP : 0),
            };
            int r = ioctl(m->uffd, UFFDIO_COPY, &c);
            done = c.copy > 0 ? c.copy : 0;
            if (f == off && done == (long)PG)
                m->wfocus = UINT64_MAX;         /* installed writable: the caller marks it */
            if (r < 0 && errno != EEXIST && errno != EAGAIN)
                return -errno;
            if (r < 0 && errno == EEXIST && done == 0)
                done = -1;
        } else {
            struct uffdio_zeropage z = {
                .range = { (uint64_t)(uintptr_t)(m->base + off), len },
                .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE,
            };
            int r = ioctl(m->uffd, UFFDIO_ZEROPAGE, &z);
            done = z.zeropage > 0 ? z.zeropage : 0;
            if (r < 0 && errno != EEXIST && errno != EAGAIN)
                return -errno;
            if (r < 0 && errno == EEXIST && done == 0)
                done = -1;
        }
        if (done < 0) {                 /* first page already present */
            mark_resident(m, off, PG);
            done = PG;
        } else
            mark_resident(m, off, (uint64_t)done);
        off += (uint64_t)done;
        len -= (uint64_t)done;
        if (src)
            src += done;
    }
    return 0;
}

/* ---- known-zero map ------------------------------------------------------
 * A fault that lands where the image reads as zeroes needs no I/O, but its
 * block-status query takes the node's lock, which a writeback batch holds
 * across its writes: random first stores over a sparse image waited for
 * writeback round after round (2,000-9,000 stores/s on a 1 TiB image
 * against 33,000 without writeback).  So the fault path answers "zero"
 * from zknown, which is filled a region at a time with one hold of the
 * node's lock, and falls back to block status for granules not known zero.
 * Why a bit stays true: only this device writes the image while it is
 * mapped, every write goes through write_runs, which clears the bits of
 * what it wrote under mu once the write returned, and a fill holds mu from
 * its block status to setting the bits, so a bit set from a status taken
 * before a write is cleared after it; a page whose write is in flight is
 * resident and cannot be dropped (and refault) before write_runs returns.
 * Other pages of that granule still read as zeroes in the image.  A revert
 * changes the image behind the map: it clears both maps. */

struct zfill { struct pms_mem *m; uint64_t end; };

static int zfill_extent(void *opaque, const struct pms_extent *e)
{
    struct zfill *z = opaque;
    if (!(e->flags & PMS_BLOCK_ZERO))
        return 0;
    uint64_t s = e->start, t = e->start + e->length;
    /* whole granules only; the last one may end at the image's end */
    uint64_t g0 = (s + ZGRAIN - 1) / ZGRAIN;
    uint64_t g1 = t >= z->m->size ? (t + ZGRAIN - 1) / ZGRAIN : t / ZGRAIN;
    uint64_t g = g0;
    for (; g < g1 && (g & 63); g++)
        abset(z->m->zknown, g);
    for (; g + 64 <= g1; g += 64)           /* whole words at once */
        __atomic_store_n(&z->m->zknown[g >> 6], ~0ull, __ATOMIC_RELEASE);
    for (; g < g1; g++)
        abset(z->m->zknown, g);
    return 0;
}

/* Fill zknown for region ri (mu held).  A failure leaves it unfilled: the
 * fault path then asks block status per fault, as without the map. */
static void zfill_region(struct pms_mem *m, uint64_t ri)
{
    uint64_t s = ri * ZREGION, e = s + ZREGION < m->size ? s + ZREGION : m->size;
    struct zfill z = { m, e };
    if (bdev_block_status_walk(m->bs, s, e - s, zfill_extent, &z) < 0) {
        pms_err_clear();
        return;
    }
    bset(m->zscanned, ri);
}

/* Bytes from off (page aligned, < end <= m->size) up to end that are known
 * to read as zeroes; 0 if off's granule is not.  mu held. */
static uint64_t zero_known(struct pms_mem *m, uint64_t off, uint64_t end)
{
    uint64_t ri = off / ZREGION;
    if (!bit(m->zscanned, ri))
        zfill_region(m, ri);
    uint64_t g = off / ZGRAIN;
    while (g * ZGRAIN < end && abit(m->zknown, g))
        g++;
    uint64_t t = g * ZGRAIN < end ? g * ZGRAIN : end;
    return t > off ? t - off : 0;
}

/* Forget what zknown says about [off, off+len) (mu held). */
static void zknown_clear(struct pms_mem *m, uint64_t off, uint64_t len)
{
    for (uint64_t g = off / ZGRAIN; g * ZGRAIN < off + len && g < m->nzgrain; g++)
        abclr(m->zknown, g);
}

/* Forget everything (mu held): the image changed behind the mapping. */
static void zknown_reset(struct pms_mem *m)
{
    memset(m->zscanned, 0, (m->nzregion / 64 + 1) * 8);
    madvise(m->zknown, (m->nzgrain / 64 + 1) * 8, MADV_DONTNEED);   /* zeroes */
}

/* Read [off, off+len) of the image into buf and install it; off, len page
 * aligned, inside the mapping.  mu held. */
static int fill_run(struct pms_mem *m, uint8_t *buf, uint64_t off, uint64_t len)
{
    uint64_t end = off + len;
    while (off < end) {
        uint64_t n = end - off;
        bool zero = false;
        if (off >= m->size) {
            zero = true;
        } else {
            uint64_t dl = (end < m->size ? end : m->size) - off;
            struct pms_extent e;
            bool bst = m->bstat;
            uint64_t zn = bst ? zero_known(m, off, off + dl) : 0;
            if (zn) {
                zero = true;
                n = zn;
            } else if (bst && bdev_block_status(m->bs, off, dl, &e) == 0) {
                zero = (e.flags & PMS_BLOCK_ZERO) != 0;
                n = e.length;
            } else
                n = dl;
            if (off + n < end) {     /* extent end: round to pages */
                uint64_t pe = (off + n + PG - 1) & ~(PG - 1);
                if (pe > off + n && zero)
                    zero = false, n = pe - off;        /* partial page: read it */
                else
                    n = pe - off;
            }
            if (off + n > end)
                n = end - off;
        }
        if (zero && m->zero_focus != UINT64_MAX) {
            /* install only the focus page of a zero extent, if it lies here */
            uint64_t f = m->zero_focus;
            if (f >= off && f < off + n) {
                memset(buf, 0, PG);
                int r = m->wp ? install(m, f, PG, buf) : install(m, f, PG, NULL);
                if (r < 0)
                    return pms_err(-r, "installing a zero page failed: %s", strerror(-r));
            }
        } else if (zero && m->wp) {
            /* a write-protected zero page does not stay protected (the
             * kernel drops uffd-wp on the shared zero pfn): install real
             * zero-filled pages instead; still no I/O */
            memset(buf, 0, n);
            int r = install(m, off, n, buf);
            if (r < 0)
                return pms_err(-r, "UFFDIO_COPY failed: %s", strerror(-r));
        } else if (zero) {
            int r = install(m, off, n, NULL);
            if (r < 0)
                return pms_err(-r, "UFFDIO_ZEROPAGE failed: %s", strerror(-r));
        } else {
            uint64_t rl = off + n <= m->size ? n : m->size - off;
            int r = bdev_pread(m->bs, buf, rl, off);
            if (r < 0)
                return r;
            if (rl < n)
                memset(buf + rl, 0, n - rl);
            atomic_fetch_add(&m->bytes_in, n);
            r = install(m, off, n, buf);
            if (r < 0)
                return pms_err(-r, "UFFDIO_COPY failed: %s", strerror(-r));
        }
        off += n;
    }
    return 0;
}

/* Install all missing pages of [off, end).  mu held. */
static int fill(struct pms_mem *m, uint8_t *buf, uint64_t off, uint64_t end)
{
    uint64_t p = off / PG, pe = end / PG;
    while (p < pe) {
        while (p < pe && bit(m->resident, p))
            p++;
        uint64_t q = p;
        while (q < pe && !bit(m->resident, q))
            q++;
        if (q > p) {
            int r = fill_run(m, buf, p * PG, (q - p) * PG);
            if (r < 0)
                return r;
        }
        p = q;
    }
    return 0;
}

static void record_error(struct pms_mem *m, uint64_t off, const char *msg)
{
    atomic_fetch_add(&m->io_errors, 1);
    snprintf(m->lasterr, sizeof m->lasterr, "read error faulting in offset %llu: %s",
             (unsigned long long)off, msg);
}

/* Let the image's file start the write-out of large writes at once (see
 * file.c): every writeback here is followed by a flush soon.  Again after
 * an external snapshot's switch, which brings a new file node. */
static void mark_eager(struct pms_mem *m, bool on)
{
    if (m->bs->file)         /* off: back to what the image was opened with */
        __atomic_store_n(&m->bs->file->eager_writeout, on || m->dev->eager_writeout,
                         __ATOMIC_RELAXED);
}

/* Pages counted against the memory cap: the mapping's resident pages, the
 * snapshot staging area's, and the block layer's metadata memory (table
 * caches of the image and of every layer, chain maps, merge buffers:
 * bdev_meta_bytes, process-wide, so devices sharing a process each count
 * all of it) up to meta_room. */
static uint64_t used_pages(struct pms_mem *m)
{
    uint64_t meta = m->limit_pages ? bdev_meta_bytes() / PG : 0;
    return atomic_load(&m->nresident) + atomic_load(&m->stage_pages) +
           (meta < m->meta_room ? meta : m->meta_room);
}

static uint64_t cap_pct(struct pms_mem *m, unsigned pct)
{
    return m->limit_pages * pct / 100;
}

/* Wait (bounded) for the writeback thread to bring residency under cap. */
static void wait_cap(struct pms_mem *m, uint64_t want)
{
    if (!m->limit_pages || used_pages(m) + want <= m->limit_pages)
        return;
    struct timespec ts = deadline_ms(CAP_WAIT_MS);
    pthread_mutex_lock(&m->ctl_mu);
    uint64_t round = m->evict_rounds;
    m->want_evict = true;
    pthread_cond_signal(&m->ctl_cond);
    while (m->evict_rounds == round && !atomic_load(&m->stop) &&
           used_pages(m) + want > m->limit_pages)
        if (pthread_cond_timedwait(&m->evict_cond, &m->ctl_mu, &ts) != 0)
            break;
    pthread_mutex_unlock(&m->ctl_mu);
}

/* Ask the writeback thread for a round now.  No lock of ours held. */
static void kick_writeback(struct pms_mem *m)
{
    pthread_mutex_lock(&m->ctl_mu);
    m->kick = true;
    pthread_cond_signal(&m->ctl_cond);
    pthread_mutex_unlock(&m->ctl_mu);
}

/* Count a write fault; kick a writeback round when they add up (see
 * WB_KICK_PAGES).  No lock of ours held. */
static void count_write_fault(struct pms_mem *m)
{
    uint64_t n = atomic_fetch_add(&m->wfaults, 1) + 1;
    if (n % WB_KICK_PAGES || m->interval_ms > WB_INTERVAL_MS ||
        now_ns() - atomic_load(&m->round_end_ns) < WB_STREAM_GAP_MS * 1000000ull)
        return;
    kick_writeback(m);
}

/* Is a capped sync-mode mapping over its dirty limit (DIRTY_MAX_RUNS dirty
 * runs, or DIRTY_MAX_SEQ_BYTES dirty in all; the pre-copy's while one runs)? */
static bool over_dirty(struct pms_mem *m)
{
    bool pre = atomic_load(&m->precopying);
    uint64_t runs = pre ? DIRTY_PRECOPY_RUNS : DIRTY_MAX_RUNS;
    uint64_t bytes = pre ? DIRTY_PRECOPY_SEQ_BYTES : DIRTY_MAX_SEQ_BYTES;
    if (bytes > m->limit_pages / DIRTY_SEQ_CAP_DIV * PG)
        bytes = m->limit_pages / DIRTY_SEQ_CAP_DIV * PG;
    if (bytes < DIRTY_MIN_SEQ_BYTES)
        bytes = DIRTY_MIN_SEQ_BYTES;
    return atomic_load(&m->ndruns) > runs || atomic_load(&m->ndirty) * PG > bytes;
}

/* Wait (bounded) while a capped sync-mode mapping is over its dirty limit.
 * Fault thread; no lock held. */
static void throttle_dirty(struct pms_mem *m)
{
    if (!m->limit_pages || !over_dirty(m))
        return;
    kick_writeback(m);
    for (unsigned t = 0; t < DIRTY_WAIT_MS * 1000 / DIRTY_POLL_US; t++) {
        if (!over_dirty(m) || atomic_load(&m->stop))
            break;
        usleep(DIRTY_POLL_US);
    }
}

static void serve_missing(struct pms_mem *m, uint64_t addr, unsigned flags, pid_t ptid)
{
    uint64_t off = (addr - (uint64_t)(uintptr_t)m->base) & ~(PG - 1);
    uint64_t c0 = off & ~(m->chunk - 1);
    if (atomic_exchange(&m->ra_reset, false))
        m->seq_next = UINT64_MAX;
    bool seq = c0 == m->seq_next || off == m->seq_next;
    if (seq)
        m->ra = m->ra * 2 > RA_MAX ? RA_MAX : m->ra * 2;
    else
        m->ra = m->chunk;
    uint64_t win = m->ra;
    if (m->limit_pages && win / PG > cap_pct(m, CAP_RA_PCT))
        win = m->chunk;
    uint64_t c1 = c0 + win < m->maplen ? c0 + win : m->maplen;
    /* Under a memory cap smaller than the mapping, a fault that does not
     * continue a sequential run installs only its own page, data or not:
     * each neighbour installed with it takes room in the cap and an
     * eviction later, and random stores over an image larger than memory
     * rarely come back to a neighbour before it is evicted (8 GiB image,
     * 256 MiB cap, random page stores: 22-38 -> 57-66 MB/s here). */
    if (!seq && m->limit_pages && m->limit_pages < m->npages) {
        c0 = off;
        c1 = off + PG;
    }
    /* A fault that does not continue a sequential run installs only its own
     * page where the image reads as zeroes (no I/O to save by installing
     * the chunk, and under a memory cap sixteen zero pages per random store
     * filled the cap sixteen times faster than the data); without a cap,
     * data extents are installed whole, since they were read anyway.  The
     * next page then counts as sequential, so a scan gets the whole window
     * from its second fault on. */
    uint64_t zfocus = seq ? UINT64_MAX : off;    /* m->zero_focus, set under mu below */
    m->seq_next = seq ? c1 : off + PG;
    /* Sync mode: a write fault installs its page writable and marks it
     * dirty, instead of installing it protected and un-protecting it (that
     * ioctl flushes the TLB of every CPU running the process: an IPI per
     * random store).  Nothing can see the page between the two steps: the
     * mark happens under mu, which eviction needs, and writeback only
     * collects pages already marked. */
    bool wfault = m->wp && !m->async && (flags & UFFD_PAGEFAULT_FLAG_WRITE);
    wait_cap(m, (c1 - c0) / PG);
    atomic_fetch_add(&m->faults, 1);

    pthread_mutex_lock(&m->mu);
    /* under mu: fill() reads it for every caller, and pms_pread/pwrite fill
     * under mu too (set before the lock, a reader's fill installed only this
     * fault's page of a zero extent, then faulted on its own page while
     * holding mu: a deadlock with this thread) */
    m->zero_focus = zfocus;
    bool was = bit(m->resident, off / PG);
    if (was) {
        /* a fault on a page we count resident: either a racing install (the
         * copy below then finds it present: EEXIST, no harm) or the kernel
         * dropped it behind our back; install it again rather than wake
         * the thread into the same fault forever */
        abclr(m->resident, off / PG);
        atomic_fetch_sub(&m->nresident, 1);
    }
    /* install the faulting chunk first, wake, then the read-ahead */
    uint64_t f1 = c0 + m->chunk < c1 ? c0 + m->chunk : c1;
    m->wfocus = wfault && !was ? off : UINT64_MAX;
    int r = fill(m, m->fbuf, c0, f1);
    bool wdone = wfault && !was && m->wfocus == UINT64_MAX;
    m->wfocus = UINT64_MAX;
    m->zero_focus = UINT64_MAX;
    if (r < 0 && !bit(m->resident, off / PG)) {
        /* retry the faulting page alone: the error may be elsewhere */
        pms_err_clear();
        r = fill(m, m->fbuf, off, off + PG);
        if (r < 0) {
            record_error(m, off, pms_err_get());
            struct uffdio_poison p = {
                .range = { (uint64_t)(uintptr_t)(m->base + off), PG }, .mode = 0 };
            uint64_t pbit = 1ull << (off / PG & 63);
            /* the bit first: a scan that sees the marker must find it */
            __atomic_fetch_or(&m->poison[off / PG >> 6], pbit, __ATOMIC_RELEASE);
            if ((m->features & UFFD_FEATURE_POISON) &&
                ioctl(m->uffd, UFFDIO_POISON, &p) == 0) {
                mark_resident(m, off, PG);
            } else if (__atomic_fetch_and(&m->poison[off / PG >> 6], ~pbit, __ATOMIC_RELEASE),
                       ptid > 0) {
                syscall(SYS_tgkill, getpid(), ptid, SIGBUS);
            }
            pthread_mutex_unlock(&m->mu);
            return;
        }
    }
    if (wdone) {
        pthread_mutex_lock(&m->wp_mu);
        mark_dirty(m, off / PG);
        pthread_mutex_unlock(&m->wp_mu);
    } else if (wfault && !was && bit(m->resident, off / PG)) {
        /* installed protected after all (a zero page without WP, a racing
         * install): mark and un-protect it as a WP fault would */
        pthread_mutex_lock(&m->wp_mu);
        mark_dirty(m, off / PG);
        /* if this fails the page stays protected and marked dirty: the
         * store raises a WP fault next, which serve_wp retries */
        (void)uprotect(m, off, PG, false, false);
        pthread_mutex_unlock(&m->wp_mu);
    }
    uwake(m, c0, f1 - c0);
    if (f1 < c1 && r == 0)
        fill(m, m->fbuf, f1, c1);     /* read-ahead: errors surface on touch */
    pthread_mutex_unlock(&m->mu);
    if (f1 < c1)
        uwake(m, f1, c1 - f1);
    if (m->wp && (flags & UFFD_PAGEFAULT_FLAG_WRITE))
        count_write_fault(m);
}

static void serve_wp(struct pms_mem *m, uint64_t addr)
{
    uint64_t off = (addr - (uint64_t)(uintptr_t)m->base) & ~(PG - 1);
    atomic_fetch_add(&m->wp_faults, 1);
    pthread_mutex_lock(&m->wp_mu);
    if (bit(m->resident, off / PG)) {
        mark_dirty(m, off / PG);
        int r = uprotect(m, off, PG, false, true);
        if (r < 0) {
            /* the page is marked dirty, so nothing is lost; the store
             * faults again and is retried */
            atomic_fetch_add(&m->io_errors, 1);
            snprintf(m->lasterr, sizeof m->lasterr, "write-protect fault at offset %llu: "
                     "un-protect failed: %s", (unsigned long long)off, strerror(-r));
            uwake(m, off, PG);
        }
    } else
        uwake(m, off, PG);
    pthread_mutex_unlock(&m->wp_mu);
}

/* Register a library thread with the safepoint; on failure (out of memory)
 * the thread blocks the signal and every stop fails with ENOMEM while it
 * lives (safepoint.c), so the error is only recorded here. */
static void exempt(struct pms_mem *m, int add)
{
    int r = pms_sp_exempt(add);
    if (r < 0 && add) {
        pthread_mutex_lock(&m->mu);
        snprintf(m->lasterr, sizeof m->lasterr, "a library thread could not be registered "
                 "with the safepoint (%s): live snapshots fail until unmap", strerror(-r));
        pthread_mutex_unlock(&m->mu);
    }
}

static void *fault_main(void *arg)
{
    struct pms_mem *m = arg;
    pthread_setname_np(pthread_self(), "pms-fault");   /* shown by top -H, ps -L */
    exempt(m, 1);
    struct uffd_msg msg[16];
    uint64_t last = 0;              /* when the last message was served */
    while (!atomic_load(&m->stop)) {
        ssize_t n = -1;
        if (last && now_ns() - last < FAULT_SPIN_US * 1000ull) {
            n = read(m->uffd, msg, sizeof msg);     /* non-blocking: spin */
            if (n < 0 && errno == EAGAIN)
                continue;
        }
        if (n < 0) {
            last = 0;
            struct pollfd pf[2] = { { m->uffd, POLLIN, 0 }, { m->evfd, POLLIN, 0 } };
            if (poll(pf, 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                break;
            }
            if (pf[1].revents)
                break;
            n = read(m->uffd, msg, sizeof msg);
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            if (getenv("PMS_MEM_DEBUG")) fprintf(stderr, "fault thread: read: %s\n", strerror(errno));
            break;
        }
        for (ssize_t i = 0; i < n / (ssize_t)sizeof *msg; i++) {
            if (msg[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t a = msg[i].arg.pagefault.address;
            unsigned fl = (unsigned)msg[i].arg.pagefault.flags;
            throttle_dirty(m);
            if (fl & UFFD_PAGEFAULT_FLAG_WP) {
                serve_wp(m, a);
                continue;
            }
            unsigned us = atomic_load_explicit(&m->converge_us, memory_order_relaxed);
            if (us)
                usleep(us);                 /* auto-converge (see precopy) */
            serve_missing(m, a, fl, (pid_t)msg[i].arg.pagefault.feat.ptid);
        }
        last = now_ns();
    }
    exempt(m, 0);
    return NULL;
}

static void *prefetch_main(void *arg)
{
    struct pms_mem *m = arg;
    pthread_setname_np(pthread_self(), "pms-prefetch");   /* shown by top -H, ps -L */
    exempt(m, 1);
    for (uint64_t off = 0; off < m->maplen && !atomic_load(&m->stop); off += PF_STEP) {
        if (m->limit_pages && used_pages(m) > cap_pct(m, CAP_PREFETCH_PCT))
            break;
        uint64_t end = off + PF_STEP < m->maplen ? off + PF_STEP : m->maplen;
        pthread_mutex_lock(&m->mu);
        int r = fill(m, m->pbuf, off, end);
        pthread_mutex_unlock(&m->mu);
        uwake(m, off, end - off);
        if (r < 0)
            pms_err_clear();         /* leave the range to the fault path */
    }
    exempt(m, 0);
    return NULL;
}

/* ---- dirty collection and writeback -------------------------------------- */

/* Longest stretch of the mapping one PAGEMAP_SCAN call walks (bytes).  A
 * call holds the process's mmap_lock for reading throughout; a thread that
 * then asks for it for writing (any mmap, munmap, mprotect or brk: malloc
 * growing a heap) waits, and every page fault of the process queues behind
 * that writer.  Walking 1 TiB of page tables took long enough for store
 * threads to sit in such faults (state D) past the snapshot's stop timeout;
 * 1 GiB of fully populated tables walks in about a millisecond. */
#define SCAN_SPAN (1ull << 30)

/* PAGEMAP_SCAN of [*start, end) for pages that are in memory or in swap
 * and, with `written`, written since their last re-protect (holes count as
 * "written" with WP_ASYNC, so presence is always required).  wp_match
 * re-protects what it reports.  Offsets in vec are relative to the mapping;
 * *start = where to continue.  Returns the number of regions (0: none up to
 * end) or -errno.  One call per SCAN_SPAN, so the lock is let go between. */
static int scan_pages(struct pms_mem *m, uint64_t *start, uint64_t end, bool written,
                      bool wp_match, struct page_region *vec, uint64_t vlen)
{
    for (;;) {
        uint64_t stop = end - *start > SCAN_SPAN ? *start + SCAN_SPAN : end;
        struct pm_scan_arg a = {
            .size = sizeof a,
            .flags = wp_match ? (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) : 0,
            .start = (uint64_t)(uintptr_t)m->base + *start,
            .end = (uint64_t)(uintptr_t)m->base + stop,
            .vec = (uint64_t)(uintptr_t)vec, .vec_len = vlen,
            .category_mask = written ? PAGE_IS_WRITTEN : 0,
            .category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            .return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        };
        int n = ioctl(m->pagemap_fd, PAGEMAP_SCAN, &a);
        if (n < 0)
            return -errno;
        /* Continue after what was reported: on a large sparse region (1 TiB
         * here) the kernel has returned a walk_end below the end of regions it
         * had already reported, and the next call reported them again (the
         * cut then staged them twice, out of order). */
        uint64_t wend = a.walk_end;
        if (n > 0 && vec[n - 1].end > wend)
            wend = vec[n - 1].end;
        if (n == 0 && wend < a.end)
            wend = a.end;                   /* nothing there: the span is done */
        *start = wend - (uint64_t)(uintptr_t)m->base;
        for (int i = 0; i < n; i++) {
            vec[i].start -= (uint64_t)(uintptr_t)m->base;
            vec[i].end -= (uint64_t)(uintptr_t)m->base;
        }
        if (n > 0 || *start >= end)
            return n;
    }
}

/* Written pages (the dirty set in async mode). */
static int scan(struct pms_mem *m, uint64_t *start, uint64_t end, bool wp_match,
                struct page_region *vec, uint64_t vlen)
{
    return scan_pages(m, start, end, true, wp_match, vec, vlen);
}

/* Written pages of [*start, end), read-only, until vec is full: the number
 * reported (*start: where the walk stopped) or -errno. */
static int scan_fill(struct pms_mem *m, uint64_t *start, uint64_t end,
                     struct page_region *vec, uint64_t vlen)
{
    uint64_t n = 0;
    while (*start < end && n < vlen) {
        int k = scan(m, start, end, false, vec + n, vlen - n);
        if (k <= 0)
            return k < 0 ? k : (int)n;
        n += (uint64_t)k;
    }
    return (int)n;
}

/* The scan helper thread (see SCAN_SPLIT_MIN): one job at a time. */
static void *scan_main(void *arg)
{
    struct pms_mem *m = arg;
    pthread_setname_np(pthread_self(), "pms-scan");   /* shown by top -H, ps -L */
    exempt(m, 1);
    pthread_mutex_lock(&m->sc_mu);
    for (;;) {
        while (!m->sc_go && !atomic_load(&m->stop))
            pthread_cond_wait(&m->sc_cond, &m->sc_mu);
        if (!m->sc_go)
            break;
        m->sc_go = false;
        uint64_t cur = m->sc_s, e = m->sc_e;
        pthread_mutex_unlock(&m->sc_mu);
        int n = scan_fill(m, &cur, e, m->vec2, SCAN_VEC);
        pthread_mutex_lock(&m->sc_mu);
        m->sc_n = n;
        m->sc_next = cur;
        m->sc_done = true;
        pthread_cond_broadcast(&m->sc_cond);
    }
    pthread_mutex_unlock(&m->sc_mu);
    exempt(m, 0);
    return NULL;
}

/* Where a read-only scan of the whole mapping splits: the helper takes
 * [split, maplen) (maplen: no helper, the caller walks it all).  Page-table
 * aligned, so no table is walked twice. */
static uint64_t scan_split(struct pms_mem *m)
{
    return m->have_sc ? (m->maplen / 2) & ~(PT_SPAN - 1) : m->maplen;
}

/* Hand the helper [s, e); wb_mu held.  The caller must scan_join. */
static void scan_hand_off(struct pms_mem *m, uint64_t s, uint64_t e)
{
    pthread_mutex_lock(&m->sc_mu);
    m->sc_s = s;
    m->sc_e = e;
    m->sc_done = false;
    m->sc_go = true;
    pthread_cond_broadcast(&m->sc_cond);
    pthread_mutex_unlock(&m->sc_mu);
}

/* Wait for the helper's job: its runs in vec2 (count or -errno), *next =
 * where its walk stopped (vec2 full: the caller walks on from there). */
static int scan_join(struct pms_mem *m, uint64_t *next)
{
    pthread_mutex_lock(&m->sc_mu);
    while (!m->sc_done)
        pthread_cond_wait(&m->sc_cond, &m->sc_mu);
    int n = m->sc_n;
    *next = m->sc_next;
    pthread_mutex_unlock(&m->sc_mu);
    return n;
}

/* Every written run of the mapping, read-only, in offset order, a batch at
 * a time to fn (a full vec, or the rest); fn returns false to stop early.
 * The helper walks the upper half meanwhile (SCAN_SPLIT_MIN); its batch
 * follows the lower half's, and is always waited for.  Async mode, wb_mu
 * held.  0 or -errno. */
static int walk_written(struct pms_mem *m,
                        bool (*fn)(struct pms_mem *, const struct page_region *, int, void *),
                        void *arg)
{
    uint64_t split = scan_split(m), cur = 0, next = m->maplen;
    if (split < m->maplen)
        scan_hand_off(m, split, m->maplen);
    int r = 0;
    bool more = true;
    while (more && cur < split && (r = scan_fill(m, &cur, split, m->vec, SCAN_VEC)) > 0)
        more = fn(m, m->vec, r, arg);
    r = r < 0 ? r : 0;
    if (split < m->maplen) {
        int n = scan_join(m, &next);     /* vec2 full: `next` is where it stopped */
        if (r == 0 && n < 0)
            r = n;
        if (r == 0 && more && n > 0)
            more = fn(m, m->vec2, n, arg);
    }
    while (r == 0 && more && next < m->maplen &&
           (r = scan_fill(m, &next, m->maplen, m->vec, SCAN_VEC)) > 0) {
        more = fn(m, m->vec, r, arg);
        r = 0;
    }
    return r < 0 ? r : 0;
}

/* Writes to the image go out in batches (bdev_pwrite_batch): a format
 * driver allocates a batch's new clusters together, writes them with few
 * large writes and updates its metadata once.  A batch holds the image's
 * lock throughout, so fault-ins wait behind it, and so does a revert for
 * the batch in flight: WB_BATCH_BYTES bounds that (~10 ms of writing here)
 * in bytes the driver writes, each run counted as at least the image's
 * write unit (bdev_write_unit: a page stored into a shared 64 KiB cluster
 * of an internal snapshot writes the whole cluster; 512 such runs were a
 * 32 MiB batch, 12-15 ms that a revert waited for), and WB_BATCH_RUNS for
 * scattered pages, each an allocating write of its own (4,096 of them held
 * faults on allocated clusters for tens of ms: 64 GiB image under a 1 GiB
 * cap, random stores 58-61 -> 66-71 MB/s with 512). */
#define WB_BATCH_BYTES (8ull << 20)
#define WB_BATCH_RUNS  512

/* bdev_fill_fn for writeback: the bytes of a cluster that the batch does
 * not cover come from the mapping when all their pages are resident (and
 * not poisoned), so copy-on-write of a shared cluster reads nothing back.
 * Memory is never older than the image for a resident page: a page newer
 * than the batch is dirty and written again by a later round.  Called by
 * the driver with the image's lock held: the pages are resident, so the
 * copy raises no fault (eviction, revert and discard, which drop pages,
 * hold wb_mu like every writer of the image here). */
static bool fill_mem(void *opaque, void *buf, uint64_t len, uint64_t off)
{
    struct pms_mem *m = opaque;
    if (off + len > m->size || len == 0)
        return false;
    for (uint64_t p = off / PG; p < (off + len + PG - 1) / PG; p++)
        if (!abit(m->resident, p) || abit(m->poison, p))
            return false;
    memcpy(buf, m->base + off, len);
    return true;
}

/* Write runs[0..n) to the image: from the mapping (stage NULL, holes filled
 * from memory) or from the staging area (the cut's copy; holes are read
 * from the image, since memory may already be newer than the cut).  Pages
 * that are poisoned are left out (their bytes are unknown; reading them
 * would raise SIGBUS here); the image's size clips the last run.  On an
 * error *failed = the first run that may not be written.  wb_mu held. */
/* One pending bdev_pwrite_batch. */
struct wbatch {
    struct pms_mem *m;
    const uint8_t *stage;           /* see write_runs */
    size_t k;                       /* runs in m->wv */
    uint64_t bytes;
    uint64_t cost;                  /* bytes, each run at least a write unit */
};

static int wbatch_flush(struct wbatch *b)
{
    if (!b->k)
        return 0;
    int r = bdev_pwrite_batch(b->m->bs, b->m->wv, b->k, b->stage ? NULL : fill_mem, b->m);
    /* after the write, failed or not (see zero_known) */
    pthread_mutex_lock(&b->m->mu);
    for (size_t i = 0; i < b->k; i++)
        zknown_clear(b->m, b->m->wv[i].off, b->m->wv[i].len);
    pthread_mutex_unlock(&b->m->mu);
    if (r == 0)
        atomic_fetch_add(&b->m->bytes_out, b->bytes);
    b->k = 0;
    b->bytes = 0;
    b->cost = 0;
    return r;
}

static int write_runs(struct pms_mem *m, const struct run *runs, uint64_t n,
                      const uint8_t *stage, bool cancellable, uint64_t *failed)
{
    struct wbatch b = { m, stage, 0, 0, 0 };
    uint64_t first = 0;             /* first run of the pending batch */
    uint64_t unit = bdev_write_unit(m->bs);   /* (the node's state swaps only under wb_mu) */
    int r = 0;
    for (uint64_t i = 0; i < n && r == 0; i++) {
        if (b.k + 2 > WB_BATCH_RUNS || b.cost >= WB_BATCH_BYTES) {
            r = wbatch_flush(&b);
            first = r < 0 ? first : i;
            if (r == 0 && cancellable && atomic_load(&m->wb_cancel))
                r = -ECANCELED;     /* nothing of runs[i..n) written */
        }
        uint64_t off = runs[i].off, end = off + runs[i].len;
        const uint8_t *src = stage ? stage + runs[i].stage : m->base + off;
        if (end > m->size)
            end = m->size;
        for (uint64_t p = off; p < end && r == 0;) {
            while (p < end && abit(m->poison, p / PG))
                p = (p / PG + 1) * PG;
            uint64_t q = p;
            while (q < end && !abit(m->poison, q / PG))
                q = (q / PG + 1) * PG < end ? (q / PG + 1) * PG : end;
            if (q > p && b.k == WB_BATCH_RUNS)      /* a run split by many poisoned pages */
                r = wbatch_flush(&b);
            if (q > p && r == 0) {
                m->wv[b.k++] = (struct bdev_wvec){ p, q - p, src + (p - off) };
                b.bytes += q - p;
                b.cost += q - p > unit ? q - p : unit;
            }
            p = q;
        }
    }
    if (r == 0)
        r = wbatch_flush(&b);
    if (r < 0)
        *failed = first;
    return r;
}

/* Record that [off, off+len) of the image changed since snapshot
 * since_name.  wb_mu held. */
/* Returns how many of the pages were marked already (written back before
 * since the snapshot: a hot set). */
static uint64_t since_mark(struct pms_mem *m, uint64_t off, uint64_t len)
{
    uint64_t again = 0;
    for (uint64_t p = off / PG; p < (off + len + PG - 1) / PG && p < m->npages; p++) {
        again += bit(m->since, p);
        bset(m->since, p);
        bset(m->since_sum, p >> SINCE_SUM_SHIFT);
    }
    return again;
}

/* Start tracking changes since snapshot name (NULL: stop).  wb_mu held.
 * Clears the bitmap's pages that hold a set bit, and keeps them: dropping
 * the whole bitmap (MADV_DONTNEED) made the next round's marks fault its
 * pages back in one by one, and at scale (a 32 MiB bitmap for 1 TiB,
 * random pages) that was thousands of page faults in the writeback
 * thread after every snapshot. */
static void since_reset(struct pms_mem *m, const char *name)
{
    free(m->since_name);
    m->since_name = name ? strdup(name) : NULL;
    uint64_t words = m->npages / 64 + 1, per = 1ull << (SINCE_SUM_SHIFT - 6);
    for (uint64_t g = 0; g * per < words; g++) {
        if (!bit(m->since_sum, g))
            continue;
        uint64_t n = words - g * per < per ? words - g * per : per;
        memset(m->since + g * per, 0, n * 8);
    }
    memset(m->since_sum, 0, since_sum_bytes(m));
}

/* Collect the sync-mode dirty runs of [s, e) into m->runs, at most max
 * runs; with rearm, re-protect them and then clear their bits (without, they
 * stay dirty and writable: the snapshot cut).  A run whose re-protect fails
 * keeps its bits (still dirty, still tracked) and ends the collection with
 * the error.  wp_mu held.  Returns the count or -errno; *next = where to
 * continue. */
static int64_t collect_sync(struct pms_mem *m, uint64_t s, uint64_t e, uint64_t max,
                            bool rearm, uint64_t *next)
{
    uint64_t n = 0, p = s / PG, pe = e / PG;
    *next = s;
    while (p < pe && n < max) {
        uint64_t g = p >> DSUM_SHIFT;
        if (!bit(m->dsum, g)) {
            p = (g + 1) << DSUM_SHIFT;
            continue;
        }
        if (!m->dirty[p >> 6]) {
            p = (p | 63) + 1;
            if (!(p & (DSUM_PAGES - 1))) {   /* end of a group: clear a stale summary bit */
                uint64_t w = g << (DSUM_SHIFT - 6), w1 = w + DSUM_PAGES / 64;
                if (w1 > m->npages / 64 + 1)
                    w1 = m->npages / 64 + 1;             /* words in `dirty` */
                while (w < w1 && !m->dirty[w])
                    w++;
                if (w == w1)
                    bclr(m->dsum, g);
            }
            continue;
        }
        if (!bit(m->dirty, p)) {
            p++;
            continue;
        }
        uint64_t q = p;
        while (q < pe && bit(m->dirty, q))
            q++;
        if (rearm) {
            int r = uprotect(m, p * PG, (q - p) * PG, true, false);
            if (r < 0) {
                *next = p * PG;
                return n ? (int64_t)n : pms_err(-r, "UFFDIO_WRITEPROTECT failed: %s",
                                                strerror(-r));
            }
            for (uint64_t k = p; k < q; k++)
                bclr(m->dirty, k);
            atomic_fetch_sub(&m->ndirty, q - p);
            runs_cleared(m, p, q);
        }
        m->runs[n++] = (struct run){ p * PG, (q - p) * PG, 0 };
        p = q;
    }
    *next = p * PG < e ? p * PG : e;
    return (int64_t)n;
}

/* A write-back of [off, off+len) failed after the range was re-protected
 * (marked clean): mark it dirty again, so that nothing evicts it and the
 * next writeback or persist retries it.  If even that fails (async mode:
 * the un-protect), the page looks clean while the image lacks its bytes:
 * eviction is switched off for good so it is never dropped, and the error
 * is recorded.  wb_mu held. */
static void redirty(struct pms_mem *m, uint64_t off, uint64_t len)
{
    if (m->async) {                 /* WP_ASYNC: unprotected == written */
        int r = uprotect(m, off, len, false, false);
        if (r < 0) {
            atomic_store(&m->no_evict, true);
            pthread_mutex_lock(&m->mu);
            snprintf(m->lasterr, sizeof m->lasterr, "could not re-mark offset %llu dirty "
                     "after a failed write-back (%s): eviction disabled",
                     (unsigned long long)off, strerror(-r));
            pthread_mutex_unlock(&m->mu);
        }
        return;
    }
    pthread_mutex_lock(&m->wp_mu);
    for (uint64_t p = off / PG; p < (off + len) / PG; p++)
        mark_dirty(m, p);           /* (a racing store may have set it) */
    /* the bits alone keep the pages dirty; a still-protected page only
     * costs its next store a fault */
    (void)uprotect(m, off, len, false, false);
    pthread_mutex_unlock(&m->wp_mu);
}

static void evict_over_cap(struct pms_mem *m);

/* Write back every dirty page of [s, e); wb_mu held.  Returns bytes or
 * -errno; on an error every page not written is dirty again.  Under a cap,
 * pages are evicted as the writing goes (a round over a large dirty set
 * takes seconds, and faults over the cap wait for eviction).  A background
 * round (bg) stops with -ECANCELED at the next batch once a caller that
 * discards the dirty pages waits for wb_mu (wb_cancel: a revert). */
static int64_t writeback(struct pms_mem *m, uint64_t s, uint64_t e, bool bg)
{
    int64_t bytes = 0;
    if (!m->wp)
        return 0;
    uint64_t cur = s;
    while (cur < e) {
        int64_t n;
        if (m->async) {
            /* the scan re-protects what it reports: from here on those
             * pages are clean unless written again */
            int k = scan(m, &cur, e, true, m->vec, SCAN_VEC);
            if (k < 0)
                return pms_err(-k, "PAGEMAP_SCAN failed: %s", strerror(-k));
            for (int i = 0; i < k; i++)
                m->runs[i] = (struct run){ m->vec[i].start, m->vec[i].end - m->vec[i].start, 0 };
            n = k;
        } else {
            pthread_mutex_lock(&m->wp_mu);
            n = collect_sync(m, cur, e, m->nruns_max, true, &cur);
            pthread_mutex_unlock(&m->wp_mu);
            if (n < 0)
                return n;
        }
        if (n == 0)
            break;
        uint64_t failed = (uint64_t)n;
        int r = write_runs(m, m->runs, (uint64_t)n, NULL, bg, &failed);
        /* runs[0..failed) reached the image: they changed since the
         * snapshot even when a later batch failed (a revert to it drops
         * exactly the pages marked here and the dirty ones) */
        for (uint64_t i = 0; i < failed; i++) {
            bytes += (int64_t)m->runs[i].len;
            if (m->since_name)
                m->wb_again += since_mark(m, m->runs[i].off, m->runs[i].len);
        }
        if (r < 0) {
            for (int64_t j = (int64_t)failed; j < n; j++)
                redirty(m, m->runs[j].off, m->runs[j].len);
            return r;
        }
        evict_over_cap(m);
    }
    return bytes;
}

/* Drop a batch of ranges (MADV_DONTNEED) and clear their resident bits.
 * process_madvise takes the whole batch with one TLB flush; a madvise per
 * range costs a flush (an IPI to every CPU running the process, ~0.5 ms on
 * the nested test VM) each, which made eviction of scattered pages the
 * bottleneck of random stores under a cap.  mu held. */
static void drop_batch(struct pms_mem *m, struct iovec *iov, int n)
{
    if (!n)
        return;
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
    long r = -1;
#ifdef SYS_process_madvise
    if (m->pidfd >= 0)
        r = syscall(SYS_process_madvise, m->pidfd, iov, (size_t)n, MADV_DONTNEED, 0u);
#endif
    if (r != (long)total)           /* older kernels: not for MADV_DONTNEED */
        for (int i = 0; i < n; i++)
            madvise(iov[i].iov_base, iov[i].iov_len, MADV_DONTNEED);
    for (int i = 0; i < n; i++) {
        uint64_t p = (uint64_t)((uint8_t *)iov[i].iov_base - m->base) / PG;
        uint64_t q = p + iov[i].iov_len / PG;
        for (uint64_t k = p; k < q; k++)
            abclr(m->resident, k);
        atomic_fetch_sub(&m->nresident, q - p);
        atomic_fetch_add(&m->evicted, q - p);
    }
}

/* madvise `advice` over a batch of ranges: one process_madvise (one TLB
 * flush for the batch), else one madvise per range.  0 or -errno. */
static int madvise_batch(struct pms_mem *m, struct iovec *iov, int n, int advice)
{
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
#ifdef SYS_process_madvise
    if (m->pidfd >= 0 &&
        syscall(SYS_process_madvise, m->pidfd, iov, (size_t)n, advice, 0u) == (long)total)
        return 0;
#endif
    for (int i = 0; i < n; i++)
        if (madvise(iov[i].iov_base, iov[i].iov_len, advice) < 0)
            return -errno;
    return 0;
}

/* Mark the page at off written again, from this thread: an atomic
 * read-modify-write that changes no byte but sets the pte's dirty bit (and,
 * on a write-protected page, clears uffd-wp: the page is "written").  A
 * lazily freed page that is dirty is never discarded. */
static void touch_dirty(struct pms_mem *m, uint64_t off)
{
    __atomic_fetch_or(m->base + off, (uint8_t)0, __ATOMIC_RELAXED);
}

/* For each page of [off, off+len) that a scan (written only, or any page
 * in memory or swap) reports: touch it dirty and set its bit in `seen`
 * (relative to base).  mu held. */
static void touch_reported(struct pms_mem *m, uint64_t off, uint64_t len, bool written,
                           uint64_t base, uint64_t *seen)
{
    struct page_region v[64];
    uint64_t cur = off;
    while (cur < off + len) {
        int k = scan_pages(m, &cur, off + len, written, false, v, 64);
        if (k <= 0)
            break;
        for (int i = 0; i < k; i++)
            for (uint64_t o = v[i].start; o < v[i].end; o += PG) {
                if (!abit(m->poison, o / PG))
                    touch_dirty(m, o);
                if (seen)
                    bset(seen, (o - base) / PG);
            }
    }
}

/* Free the page tables of the PT_SPAN blocks that ranges of iov touch and
 * that hold no resident and no poisoned page any more: MADV_DONTNEED of a
 * whole empty block lets the kernel free its table (CONFIG_PT_RECLAIM).  No
 * page can appear in such a block meanwhile: installs take mu, held here,
 * and a page not resident is not present.  mu held. */
static void reclaim_tables(struct pms_mem *m, const struct iovec *iov, int n)
{
    struct iovec v[64];
    int k = 0;
    uintptr_t base = (uintptr_t)m->base, last = 0;
    for (int i = 0; i < n; i++) {
        uintptr_t a = (uintptr_t)iov[i].iov_base, e = a + iov[i].iov_len;
        for (uintptr_t b = a & ~(uintptr_t)(PT_SPAN - 1); b < e; b += PT_SPAN) {
            if (b < base || b + PT_SPAN > base + m->maplen || b == last)
                continue;            /* partial block at an end of the mapping */
            last = b;
            uint64_t p0 = (b - base) / PG, p1 = p0 + PT_SPAN / PG, p;
            if (p0 % 64)
                continue;            /* block not word-aligned in the bitmaps: keep it */
            for (p = p0; p < p1; p += 64)
                if (__atomic_load_n(&m->resident[p / 64], __ATOMIC_RELAXED) |
                    __atomic_load_n(&m->poison[p / 64], __ATOMIC_RELAXED))
                    break;
            if (p < p1)
                continue;
            v[k++] = (struct iovec){ (void *)b, PT_SPAN };
            if (k == (int)(sizeof v / sizeof *v)) {
                madvise_batch(m, v, k, MADV_DONTNEED);
                k = 0;
            }
        }
    }
    if (k)
        madvise_batch(m, v, k, MADV_DONTNEED);
}

/* Drop a batch of clean ranges from memory.  Sync mode and read-only
 * mappings: no store can reach a page while we hold wp_mu (sync stores fault
 * to serve_wp, which waits on it; read-only has none), so MADV_DONTNEED is
 * exact.  Async mode: the kernel resolves stores itself, so a page found
 * clean may be written before it is dropped; instead of stopping the
 * application, the pages are freed lazily, which the kernel undoes for any
 * page written afterwards:
 *   1. MADV_FREE: the pages become clean and lazily freeable;
 *   2. pages written since the scan that chose them (a store between the
 *      scan and step 1, whose dirty bit step 1 cleared) are touched dirty
 *      again: a dirty lazily freed page is kept;
 *   3. MADV_PAGEOUT discards the pages still clean; a store after step 2
 *      sets the dirty bit in hardware and the kernel keeps that page;
 *   4. pages still in memory are touched dirty (so nothing lazily freed is
 *      left behind for reclaim to discard later); the resident bits of the
 *      others are cleared.
 * Nothing is lost: every discarded page was clean from the scan to its
 * discard.  mu and wp_mu held. */
static void drop_clean(struct pms_mem *m, struct iovec *iov, int n)
{
    if (!n)
        return;
    if (!m->async) {
        drop_batch(m, iov, n);
        reclaim_tables(m, iov, n);
        return;
    }
    if (madvise_batch(m, iov, n, MADV_FREE) < 0)
        return;                     /* nothing freed: everything stays */
    for (int i = 0; i < n; i++) {
        uint64_t o = (uint64_t)((uint8_t *)iov[i].iov_base - m->base);
        touch_reported(m, o, iov[i].iov_len, true, 0, NULL);
    }
    int r = madvise_batch(m, iov, n, MADV_PAGEOUT);
    for (int i = 0; i < n; i++) {
        uint64_t o = (uint64_t)((uint8_t *)iov[i].iov_base - m->base), l = iov[i].iov_len;
        uint64_t still[EVICT_STEP / PG / 64];
        memset(still, 0, sizeof still);
        uint64_t dropped = 0;
        for (uint64_t s0 = o; s0 < o + l; s0 += EVICT_STEP) {
            uint64_t e0 = s0 + EVICT_STEP < o + l ? s0 + EVICT_STEP : o + l;
            memset(still, 0, sizeof still);
            touch_reported(m, s0, e0 - s0, false, s0, still);
            if (r < 0)
                continue;
            for (uint64_t p = s0 / PG; p < e0 / PG; p++)
                if (!bit(still, p - s0 / PG) && bit(m->resident, p)) {
                    abclr(m->resident, p);
                    dropped++;
                }
        }
        atomic_fetch_sub(&m->nresident, dropped);
        atomic_fetch_add(&m->evicted, dropped);
    }
    if (r >= 0)
        reclaim_tables(m, iov, n);
}

/* Drop clean resident pages until residency is at 3/4 of the cap.
 * wb_mu held. */
static void evict(struct pms_mem *m)
{
    uint64_t target = cap_pct(m, CAP_TARGET_PCT);
    if (used_pages(m) <= target)
        return;
    target -= atomic_load(&m->stage_pages) < target ? atomic_load(&m->stage_pages) : target;
    if (atomic_load(&m->no_evict))
        return;
    pthread_mutex_lock(&m->mu);
    pthread_mutex_lock(&m->wp_mu);
    uint64_t start = m->hand, cur = start, steps = 0, nsteps = m->maplen / EVICT_STEP + 2;
    struct page_region wv[512];
    struct iovec iov[256];
    int niov = 0;
    uint64_t batched = 0;              /* pages in iov, still counted resident */
    while (atomic_load(&m->nresident) - batched > target && steps++ < nsteps) {
        uint64_t end = cur + EVICT_STEP < m->maplen ? cur + EVICT_STEP : m->maplen;
        uint64_t p0 = cur / PG, pe = end / PG;
        bool any = false;
        for (uint64_t w = p0 >> 6; w <= (pe - 1) >> 6 && !any; w++)
            any = m->resident[w] != 0;
        if (any) {
            /* pages written since their writeback stay */
            uint64_t keep0[EVICT_STEP / PG / 64];
            memset(keep0, 0, sizeof keep0);
            if (m->async) {
                uint64_t sc = cur;
                while (sc < end) {
                    int n = scan(m, &sc, end, false, wv, 512);
                    if (n <= 0)
                        break;
                    for (int i = 0; i < n; i++)
                        for (uint64_t o = wv[i].start; o < wv[i].end; o += PG)
                            bset(keep0, (o - cur) / PG);
                }
            } else if (m->wp) {
                for (uint64_t p = p0; p < pe; p++)
                    if (bit(m->dirty, p))
                        bset(keep0, p - p0);
            }
            uint64_t p = p0;
            while (p < pe) {
                while (p < pe && (!bit(m->resident, p) || bit(keep0, p - p0)))
                    p++;
                uint64_t q = p;
                while (q < pe && bit(m->resident, q) && !bit(keep0, q - p0))
                    q++;
                if (q > p) {
                    if (niov == (int)(sizeof iov / sizeof *iov)) {
                        drop_clean(m, iov, niov);
                        niov = 0;
                        batched = 0;
                    }
                    iov[niov++] = (struct iovec){ m->base + p * PG, (q - p) * PG };
                    batched += q - p;
                }
                p = q;
            }
        }
        cur = end >= m->maplen ? 0 : end;
    }
    drop_clean(m, iov, niov);
    m->hand = cur;
    pthread_mutex_unlock(&m->wp_mu);
    pthread_mutex_unlock(&m->mu);
}

/* Evict when residency is above CAP_EVICT_PCT of the cap, and wake the
 * faults waiting for room (wait_cap).  wb_mu held. */
static void evict_over_cap(struct pms_mem *m)
{
    if (!m->limit_pages || used_pages(m) <= cap_pct(m, CAP_EVICT_PCT))
        return;
    evict(m);
    pthread_mutex_lock(&m->ctl_mu);
    m->evict_rounds++;
    pthread_cond_broadcast(&m->evict_cond);
    pthread_mutex_unlock(&m->ctl_mu);
}

static void *wb_main(void *arg)
{
    struct pms_mem *m = arg;
    pthread_setname_np(pthread_self(), "pms-writeback");   /* shown by top -H, ps -L */
    exempt(m, 1);
    /* Every round re-protects what it writes, and each re-protected page
     * costs its next store a fault (tens of µs under nested paging).  A
     * hot set that is dirty again round after round therefore backs the
     * period off up to 16x; persist and snapshot are exact regardless.
     * Not when the round's pages are mostly new since the last snapshot
     * (random stores over a large image: deferring them only makes the
     * next snapshot write them), nor when the round had to evict (a cap
     * needs clean pages). */
    uint64_t period = m->interval_ms, last = 0;
    uint64_t period_max = m->interval_ms > WB_PERIOD_MAX_MS ? m->interval_ms : WB_PERIOD_MAX_MS;
    while (!atomic_load(&m->stop)) {
        pthread_mutex_lock(&m->ctl_mu);
        if (!m->kick && !m->want_evict)
            timed_wait(&m->ctl_cond, &m->ctl_mu, period);
        m->kick = false;
        m->want_evict = false;
        pthread_mutex_unlock(&m->ctl_mu);
        if (atomic_load(&m->stop))
            break;
        if (atomic_load(&m->wb_cancel))
            continue;                 /* a revert waits for wb_mu: let it have it */
        pthread_mutex_lock(&m->wb_mu);
        m->wb_again = 0;
        atomic_store(&m->wfaults, 0);
        uint64_t ev0 = atomic_load(&m->evicted);
        int64_t w = writeback(m, 0, m->maplen, true);
        bool fresh = m->since_name && m->wb_again * PG * WB_HOT_DIV < (uint64_t)(w > 0 ? w : 0);
        bool pressed = atomic_load(&m->evicted) != ev0;
        if (w < 0)
            pms_err_clear();          /* retried next round; persist reports */
        else if (last && w > (1 << 20) && (uint64_t)w >= last / 4 * 3 && !fresh && !pressed)
            period = period * 2 > period_max ? period_max : period * 2;
        else if (fresh && w >= (int64_t)WB_STREAM_BYTES && m->interval_ms > WB_STREAM_GAP_MS)
            period = WB_STREAM_GAP_MS;
        else
            period = m->interval_ms;
        last = w < 0 ? 0 : (uint64_t)w;
        if (w != -ECANCELED)          /* a revert waits and drops pages itself */
            evict_over_cap(m);
        pthread_mutex_unlock(&m->wb_mu);
        atomic_store(&m->round_end_ns, now_ns());
        pthread_mutex_lock(&m->ctl_mu);
        if (w > 0 && m->have_wo) {
            m->wo_kick = true;
            pthread_cond_signal(&m->wo_cond);
        }
        m->evict_rounds++;
        pthread_cond_broadcast(&m->evict_cond);
        pthread_mutex_unlock(&m->ctl_mu);
    }
    exempt(m, 0);
    return NULL;
}

/* Write-out thread, second job: at most every CKPT_INTERVAL_MS after rounds
 * were written, a metadata checkpoint (bdev_checkpoint: the image's
 * file flushed with no lock of ours or the node's held, then the L2 slices
 * that flush made safe written, and their write-out started), so a
 * snapshot or persist finds only the last interval's metadata and file
 * system journal left to write.  A fully allocated 16 GiB region, 10 MiB of
 * random page stores between snapshots: without it every snapshot wrote
 * ~900 L2 slices (4 KiB each) behind one ordering flush and waited for a
 * second, 17-19 ms of its commit (1 GiB: 4 tables, 2-3 ms).  50 ms: the
 * flushes stay a small share of the device (20 a second at most while
 * writing) and what a snapshot right after the stores finds is a few
 * rounds' worth. */

/* Write-out thread: starts the device write-out of what the writeback
 * thread wrote (bdev_writeout_start, no lock of ours held), so that the
 * device writes a round while the application runs and the flush of the
 * next persist or snapshot only waits for the rest.  A thread of its own
 * because the kernel submits the pages in the caller (tens of ms of CPU
 * for thousands of scattered pages), and the writeback thread must go on
 * evicting under a cap meanwhile.  Kicks that arrive while it works merge
 * into one more start. */
static void *wo_main(void *arg)
{
    struct pms_mem *m = arg;
    pthread_setname_np(pthread_self(), "pms-writeout");
    exempt(m, 1);
    bool owed = false;                /* rounds written since the last checkpoint */
    uint64_t ckpt_ns = 0;             /* when the last checkpoint began */
    pthread_mutex_lock(&m->ctl_mu);
    while (!atomic_load(&m->stop)) {
        uint64_t due = ckpt_ns + CKPT_INTERVAL_MS * 1000000ull, t = now_ns();
        if (!m->wo_kick && !(owed && t >= due)) {
            if (owed)
                timed_wait(&m->wo_cond, &m->ctl_mu, (due - t) / 1000000 + 1);
            else
                pthread_cond_wait(&m->wo_cond, &m->ctl_mu);
            continue;
        }
        bool kicked = m->wo_kick;
        m->wo_kick = false;
        pthread_mutex_unlock(&m->ctl_mu);
        if (kicked && bdev_writeout_start(m->bs) < 0)
            pms_err_clear();          /* the next flush writes it anyway */
        owed |= kicked;
        if (owed && now_ns() >= due) {
            ckpt_ns = now_ns();
            owed = false;
            /* a failure is sticky in the file (flush_err): the next
             * persist or snapshot reports it */
            if (bdev_checkpoint(m->bs) < 0 || bdev_writeout_start(m->bs) < 0)
                pms_err_clear();
        }
        pthread_mutex_lock(&m->ctl_mu);
    }
    pthread_mutex_unlock(&m->ctl_mu);
    exempt(m, 0);
    return NULL;
}

/* ---- setup ------------------------------------------------------------------ */

static int uffd_open(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | flags);
    if (fd >= 0 || errno != EPERM)
        return fd < 0 ? -errno : fd;
    /* unprivileged: /dev/userfaultfd (needs read/write access to it) */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK | flags);
        close(dev);
        if (fd >= 0)
            return fd;
    }
    /* last resort: user-mode faults only (kernel accesses get EFAULT) */
    if (!(flags & UFFD_USER_MODE_ONLY)) {
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        if (fd >= 0)
            return fd;
    }
    return -EPERM;
}

static uint64_t probe_features(void)
{
    int fd = uffd_open(0);
    if (fd < 0)
        return 0;
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    uint64_t f = ioctl(fd, UFFDIO_API, &api) == 0 ? api.features : 0;
    close(fd);
    return f;
}

static void mem_free(struct pms_mem *m)
{
    if (m->base) munmap(m->base, m->maplen);
    if (m->resident) munmap(m->resident, (m->npages / 64 + 1) * 8);
    if (m->dirty) munmap(m->dirty, (m->npages / 64 + 1) * 8);
    if (m->dsum) munmap(m->dsum, (m->npages / DSUM_PAGES / 64 + 1) * 8);
    if (m->poison) munmap(m->poison, (m->npages / 64 + 1) * 8);
    if (m->since) munmap(m->since, (m->npages / 64 + 1) * 8);
    if (m->since_sum) munmap(m->since_sum, since_sum_bytes(m));
    if (m->zknown) munmap(m->zknown, (m->nzgrain / 64 + 1) * 8);
    if (m->zscanned) munmap(m->zscanned, (m->nzregion / 64 + 1) * 8);
    free(m->since_name);
    if (m->vec) munmap(m->vec, SCAN_VEC * sizeof *m->vec);
    if (m->vec2) munmap(m->vec2, SCAN_VEC * sizeof *m->vec2);
    if (m->runs) munmap(m->runs, m->nruns_max * sizeof *m->runs);
    if (m->wv) munmap(m->wv, WB_BATCH_RUNS * sizeof *m->wv);
    if (m->stage) munmap(m->stage, m->maplen);
    free(m->fbuf);
    free(m->pbuf);
    if (m->uffd >= 0) close(m->uffd);
    if (m->pagemap_fd >= 0) close(m->pagemap_fd);
    if (m->evfd >= 0) close(m->evfd);
    if (m->pidfd >= 0) close(m->pidfd);
    pthread_mutex_destroy(&m->mu);
    pthread_mutex_destroy(&m->wp_mu);
    pthread_mutex_destroy(&m->wb_mu);
    pthread_mutex_destroy(&m->ctl_mu);
    pthread_cond_destroy(&m->ctl_cond);
    pthread_cond_destroy(&m->evict_cond);
    pthread_cond_destroy(&m->wo_cond);
    pthread_mutex_destroy(&m->sc_mu);
    pthread_cond_destroy(&m->sc_cond);
    free(m);
}

static void stop_threads(struct pms_mem *m)
{
    atomic_store(&m->stop, true);
    uint64_t one = 1;
    if (write(m->evfd, &one, sizeof one) < 0) { /* poll sees stop anyway */ }
    pthread_mutex_lock(&m->ctl_mu);
    pthread_cond_broadcast(&m->ctl_cond);
    pthread_cond_broadcast(&m->evict_cond);
    pthread_cond_broadcast(&m->wo_cond);
    pthread_mutex_unlock(&m->ctl_mu);
    pthread_mutex_lock(&m->sc_mu);
    pthread_cond_broadcast(&m->sc_cond);
    pthread_mutex_unlock(&m->sc_mu);
    if (m->have_sc) pthread_join(m->sc_th, NULL);
    if (m->have_pf) pthread_join(m->pf_th, NULL);
    if (m->have_wb) pthread_join(m->wb_th, NULL);
    if (m->have_wo) pthread_join(m->wo_th, NULL);
    if (m->have_fault) pthread_join(m->fault_th, NULL);
    m->have_pf = m->have_wb = m->have_fault = m->have_wo = m->have_sc = false;
}

int pms_mem_map(pms_dev *dev, const struct pms_map_opts *o, struct pms_mem **memp,
                void **addrp, size_t *lenp)
{
    /* fields past an older caller's opts->size take their defaults */
    struct pms_map_opts def;
    pms_map_opts_init(&def);
    if (o) {
        if (o->size < sizeof o->size)
            return pms_err(EINVAL, "opts->size is %zu: initialise opts with pms_map_opts_init",
                           o->size);
        memcpy(&def, o, o->size < sizeof def ? o->size : sizeof def);
        def.size = sizeof def;
    }
    o = &def;
    if (!addrp)
        return pms_err(EINVAL, "addrp is NULL");
    uint64_t size = dev->bs->size;
    if (size == 0)
        return pms_err(EINVAL, "image '%s' is empty", dev->bs->filename);
    if (o->chunk_size && (o->chunk_size < PG || (o->chunk_size & (o->chunk_size - 1))))
        return pms_err(EINVAL, "chunk_size %llu is not a power of two >= %llu",
                       (unsigned long long)o->chunk_size, PG);
    if (o->chunk_size > CHUNK_MAX)
        return pms_err(EINVAL, "chunk_size %llu exceeds %llu bytes",
                       (unsigned long long)o->chunk_size, (unsigned long long)CHUNK_MAX);
    if (o->dirty_tracking < PMS_DIRTY_AUTO || o->dirty_tracking > PMS_DIRTY_SYNC_WP)
        return pms_err(EINVAL, "unknown dirty_tracking mode %d", o->dirty_tracking);
    int r = pms_sp_init();
    if (r < 0)
        return r;                    /* message set by pms_sp_init */

    struct pms_mem *m = calloc(1, sizeof *m);
    if (!m)
        return pms_err(ENOMEM, "out of memory");
    m->uffd = m->pagemap_fd = m->evfd = m->pidfd = -1;
#ifdef SYS_pidfd_open
    m->pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
#endif
    pthread_mutex_init(&m->mu, NULL);
    pthread_mutex_init(&m->wp_mu, NULL);
    pthread_mutex_init(&m->wb_mu, NULL);
    pthread_mutex_init(&m->ctl_mu, NULL);
    pthread_cond_init(&m->ctl_cond, NULL);
    pthread_cond_init(&m->evict_cond, NULL);
    pthread_cond_init(&m->wo_cond, NULL);
    pthread_mutex_init(&m->sc_mu, NULL);
    pthread_cond_init(&m->sc_cond, NULL);
    m->dev = dev;
    m->bs = dev->bs;
    /* raw over the fault injector has no block status: faults read it all.
     * Decided here, not per fault: an external snapshot's switch swaps the
     * node's fields under its own lock, which the fault path reads only
     * through bdev_* calls (they take it) */
    m->bstat = !(m->bs->file && !m->bs->file->drv->block_status &&
                 strcmp(m->bs->drv->name, "raw") == 0);
    m->size = size;
    m->maplen = (size + PG - 1) & ~(PG - 1);
    m->npages = m->maplen / PG;
    m->ro = dev->bs->readonly;
    m->chunk = o->chunk_size ? o->chunk_size : 65536;
    struct pms_info info = { .size = sizeof info };
    if (!o->chunk_size && dev->bs->drv->info && dev->bs->drv->info(dev->bs, &info) == 0 &&
        info.cluster_size >= PG && info.cluster_size <= (2u << 20))
        m->chunk = info.cluster_size;
    m->ra = m->chunk;
    m->seq_next = UINT64_MAX;
    m->zero_focus = UINT64_MAX;
    m->wfocus = UINT64_MAX;
    m->interval_ms = o->writeback_interval_ms ? o->writeback_interval_ms : WB_INTERVAL_MS;
    m->limit_pages = o->mem_limit / PG;
    if (o->mem_limit && m->limit_pages < 4 * (m->chunk / PG)) {
        uint64_t need = 4 * m->chunk;
        mem_free(m);
        return pms_err(EINVAL, "mem_limit %llu is below four chunks (%llu bytes)",
                       (unsigned long long)o->mem_limit, (unsigned long long)need);
    }

    uint64_t avail = probe_features();
    bool have_async = (avail & UFFD_FEATURE_WP_ASYNC) && (avail & UFFD_FEATURE_PAGEFAULT_FLAG_WP);
    m->wp = !m->ro;
    if (m->wp && !(avail & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
        mem_free(m);
        return pms_err(ENOTSUP, "kernel lacks userfaultfd write protection");
    }
    if (o->dirty_tracking == PMS_DIRTY_ASYNC_WP && !have_async && m->wp) {
        mem_free(m);
        return pms_err(ENOTSUP, "kernel lacks UFFD_FEATURE_WP_ASYNC (async dirty tracking)");
    }
    /* auto: a cap that keeps the mapping sparse makes every scan walk a
     * page table per resident page (see SPARSE_SYNC_DIV) */
    bool sparse = m->limit_pages && m->npages / m->limit_pages >= SPARSE_SYNC_DIV;
    m->async = m->wp && have_async && o->dirty_tracking != PMS_DIRTY_SYNC_WP &&
               !(o->dirty_tracking == PMS_DIRTY_AUTO && sparse);
    if (m->async) {
        m->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        struct pm_scan_arg a = { .size = sizeof a };
        if (m->pagemap_fd < 0 || (ioctl(m->pagemap_fd, PAGEMAP_SCAN, &a) < 0 && errno == ENOTTY)) {
            if (o->dirty_tracking == PMS_DIRTY_ASYNC_WP) {
                mem_free(m);
                return pms_err(ENOTSUP, "kernel lacks PAGEMAP_SCAN (async dirty tracking)");
            }
            m->async = false;
        }
    }

    if (m->limit_pages) {
        /* the cap holds the tracking bitmaps too (see CAP_META_MAX_DIV) */
        uint64_t meta = (m->wp ? 3 : 2) + (m->wp && !m->async);
        meta = meta * ((m->npages + 7) / 8) / PG;
        if (meta > m->limit_pages / CAP_META_MAX_DIV)
            meta = m->limit_pages / CAP_META_MAX_DIV;
        if (m->limit_pages - meta < 4 * (m->chunk / PG))     /* the minimum above */
            meta = m->limit_pages - 4 * (m->chunk / PG);
        /* the block layer's metadata shares the same 1/CAP_META_MAX_DIV */
        m->meta_room = m->limit_pages / CAP_META_MAX_DIV > meta
                     ? m->limit_pages / CAP_META_MAX_DIV - meta : 0;
        if (m->limit_pages - meta - m->meta_room < 4 * (m->chunk / PG))
            m->meta_room = m->limit_pages - meta - 4 * (m->chunk / PG);
        m->limit_pages -= meta;
    }

    r = m->uffd = uffd_open(0);
    if (r < 0) {
        mem_free(m);
        return pms_err(-r, "userfaultfd unavailable (%s): run as root, or set "
                       "vm.unprivileged_userfaultfd=1, or grant access to /dev/userfaultfd",
                       strerror(-r));
    }
    struct uffdio_api api = { .api = UFFD_API };
    api.features = avail & (UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_POISON);
    if (m->wp)
        api.features |= UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    if (m->async)
        api.features |= UFFD_FEATURE_WP_ASYNC;
    if (ioctl(m->uffd, UFFDIO_API, &api) < 0) {
        r = -errno;
        mem_free(m);
        return pms_err(-r, "UFFDIO_API failed: %s", strerror(-r));
    }
    m->features = api.features;

    m->base = mmap(NULL, m->maplen, m->ro ? PROT_READ : PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m->base == MAP_FAILED) {
        m->base = NULL;
        r = errno;
        uint64_t len = m->maplen;
        mem_free(m);
        return pms_err(r, "cannot reserve %llu bytes of address space: %s",
                       (unsigned long long)len, strerror(r));
    }
    madvise(m->base, m->maplen, MADV_NOHUGEPAGE);
    struct uffdio_register reg = {
        .range = { (uint64_t)(uintptr_t)m->base, m->maplen },
        .mode = UFFDIO_REGISTER_MODE_MISSING | (m->wp ? UFFDIO_REGISTER_MODE_WP : 0),
    };
    if (ioctl(m->uffd, UFFDIO_REGISTER, &reg) < 0) {
        r = errno;
        mem_free(m);
        return pms_err(r, "UFFDIO_REGISTER failed: %s", strerror(r));
    }
    uint64_t bm = (m->npages / 64 + 1) * 8;
    m->nruns_max = m->npages / 2 + 1;
    m->resident = vmalloc(bm);
    m->dirty = vmalloc(bm);
    m->dsum = vmalloc((m->npages / DSUM_PAGES / 64 + 1) * 8);
    m->poison = vmalloc(bm);
    m->since = vmalloc(bm);
    m->since_sum = vmalloc(since_sum_bytes(m));
    m->nzgrain = (m->size + ZGRAIN - 1) / ZGRAIN;
    m->nzregion = (m->size + ZREGION - 1) / ZREGION;
    m->zknown = vmalloc((m->nzgrain / 64 + 1) * 8);
    m->zscanned = vmalloc((m->nzregion / 64 + 1) * 8);
    m->vec = vmalloc(SCAN_VEC * sizeof *m->vec);
    m->runs = vmalloc(m->nruns_max * sizeof *m->runs);
    m->wv = vmalloc(WB_BATCH_RUNS * sizeof *m->wv);
    m->stage = vmalloc(m->maplen);
    m->fbuf = malloc(RA_MAX > m->chunk ? RA_MAX : m->chunk);
    m->pbuf = malloc(PF_STEP);
    m->evfd = eventfd(0, EFD_CLOEXEC);
    if (!m->resident || !m->dirty || !m->dsum || !m->poison || !m->since || !m->since_sum || !m->zknown ||
        !m->zscanned || !m->vec || !m->runs || !m->wv || !m->stage || !m->fbuf ||
        !m->pbuf || m->evfd < 0) {
        mem_free(m);
        return pms_err(ENOMEM, "out of memory");
    }
    if ((r = pthread_create(&m->fault_th, NULL, fault_main, m)) != 0) {
        mem_free(m);
        return pms_err(r, "cannot create the fault thread");
    }
    m->have_fault = true;
    if (m->wp) {
        /* the write-out thread first: the writeback thread reads have_wo
         * (without it the write-out is left to the kernel and the next flush) */
        m->have_wo = pthread_create(&m->wo_th, NULL, wo_main, m) == 0;
        if ((r = pthread_create(&m->wb_th, NULL, wb_main, m)) != 0) {
            stop_threads(m);
            mem_free(m);
            return pms_err(r, "cannot create the writeback thread");
        }
        m->have_wb = true;
    }
    if (o->prefetch && pthread_create(&m->pf_th, NULL, prefetch_main, m) == 0)
        m->have_pf = true;
    /* without the helper every scan is walked by its caller alone */
    if (m->async && m->maplen >= SCAN_SPLIT_MIN && sysconf(_SC_NPROCESSORS_ONLN) >= 2 &&
        (m->vec2 = vmalloc(SCAN_VEC * sizeof *m->vec2)) &&
        pthread_create(&m->sc_th, NULL, scan_main, m) == 0)
        m->have_sc = true;
    mark_eager(m, true);
    *memp = m;
    *addrp = m->base;
    if (lenp)
        *lenp = (size_t)m->size;
    return 0;
}

int pms_mem_unmap(struct pms_mem *m, bool force)
{
    int r = 0;
    if (m->wp) {            /* the fault thread still serves: writeback may fault */
        pthread_mutex_lock(&m->wb_mu);
        int64_t w = writeback(m, 0, m->maplen, false);
        r = w < 0 ? (int)w : bdev_flush(m->bs);
        pthread_mutex_unlock(&m->wb_mu);
    }
    if (r < 0 && !force)
        return r;           /* still mapped, nothing lost: the caller may retry */
    stop_threads(m);
    mark_eager(m, false);
    mem_free(m);
    return r;
}

static int range_of(struct pms_mem *m, const void *addr, size_t len, uint64_t *s, uint64_t *e)
{
    uintptr_t a = (uintptr_t)addr, b = (uintptr_t)m->base;
    if (a < b || a - b > m->size || len > m->size - (a - b))
        return pms_err(EINVAL, "range %p+%zu is not inside the mapping %p+%llu",
                       addr, len, (void *)m->base, (unsigned long long)m->size);
    *s = (a - b) & ~(PG - 1);
    *e = ((a - b) + len + PG - 1) & ~(PG - 1);
    return 0;
}

static int persist_range(struct pms_mem *m, uint64_t s, uint64_t e)
{
    if (m->ro)
        return 0;
    pthread_mutex_lock(&m->wb_mu);
    int64_t w = writeback(m, s, e, false);
    int r = w < 0 ? (int)w : bdev_flush(m->bs);
    pthread_mutex_unlock(&m->wb_mu);
    return r;
}

int pms_mem_persist(struct pms_mem *m, const void *addr, size_t len)
{
    uint64_t s = 0, e = 0;
    int r = range_of(m, addr, len, &s, &e);
    return r < 0 ? r : persist_range(m, s, e);
}

int pms_mem_flush(struct pms_mem *m)
{
    return persist_range(m, 0, m->maplen);
}

/* While mapped, the mapping is the device: block-level reads and writes are
 * copies to and from it, so they dirty pages like stores do.  Unlike a
 * store, a copy must not fault: a page whose fault-in fails would be
 * poisoned and raise SIGBUS in the caller.  So each piece of at most IO_STEP
 * bytes is made resident (and, in sync mode, writable and dirty) and copied
 * with `mu` held: eviction and revert take `mu`, so nothing is dropped
 * between the check and the copy, and no access of the copy reaches the
 * fault thread.  A read error or a poisoned page fails the call with EIO. */

/* Make [s, e) (page aligned) resident; EIO on a poisoned page.  mu held. */
static int io_resident(struct pms_mem *m, uint8_t **tmp, uint64_t s, uint64_t e)
{
    for (uint64_t p = s / PG; p < e / PG; p++)
        if (abit(m->poison, p))
            return pms_err(EIO, "offset %llu: page lost to an earlier read error",
                           (unsigned long long)(p * PG));
    bool all = true;
    for (uint64_t p = s / PG; p < e / PG && all; p++)
        all = bit(m->resident, p);
    if (all)
        return 0;
    if (!*tmp && !(*tmp = malloc(IO_STEP + 2 * PG)))
        return pms_err(ENOMEM, "out of memory");
    int r = fill(m, *tmp, s, e);
    if (r < 0)
        return pms_err(-r, "read error at offset %llu: %s", (unsigned long long)s,
                       pms_err_get());
    uwake(m, s, e - s);
    return 0;
}

/* Sync mode: mark [s, e) dirty and writable so that the copy raises no WP
 * fault (which would need the fault thread while we hold mu).  mu and
 * wp_mu held, and wp_mu stays held until the copy is done: a writeback
 * re-protects dirty pages under wp_mu alone, and one that did so between
 * this and the copy made the copy fault while holding mu, with the fault
 * thread waiting for mu to serve another store (a deadlock). */
static int io_writable(struct pms_mem *m, uint64_t s, uint64_t e)
{
    for (uint64_t p = s / PG; p < e / PG; p++)
        mark_dirty(m, p);
    int r = uprotect(m, s, e - s, false, false);
    return r < 0 ? pms_err(-r, "UFFDIO_WRITEPROTECT failed: %s", strerror(-r)) : 0;
}

/* Prepare the pages of [addr, addr+len) inside the mapping for the copy:
 * resident; for a write, ws and we get the page range to make writable
 * (io_writable), else stay as they are.  mu held. */
static int io_prepare(struct pms_mem *m, uint8_t **tmp, const void *addr, size_t len,
                      bool write, uint64_t *ws, uint64_t *we)
{
    uintptr_t a = (uintptr_t)addr, b = (uintptr_t)m->base;
    if (len == 0 || a + len <= b || a >= b + m->maplen)
        return 0;                           /* not in the mapping */
    uint64_t s = a > b ? a - b : 0, e = a + len - b < m->maplen ? a + len - b : m->maplen;
    s &= ~(PG - 1);
    e = (e + PG - 1) & ~(PG - 1);
    int r = io_resident(m, tmp, s, e);
    if (r == 0 && write) {
        if (m->ro)
            return pms_err(EROFS, "image '%s' is opened read-only", m->bs->filename);
        *ws = s;
        *we = e;
    }
    return r;
}

/* Copy len bytes between buf and the mapping at off: to the mapping
 * (write; src NULL: zeroes) or from it.  The caller is an application
 * thread, which a snapshot's safepoint may park: while it holds mu and
 * wp_mu (one IO_STEP) the safepoint signal is blocked, so it parks only
 * once it has let go of them (parked with wp_mu it held up the cut, which
 * takes wp_mu: a deadlock). */
static int io_copy(struct pms_mem *m, void *buf, const void *src, size_t len, uint64_t off,
                   bool write)
{
    uint8_t *tmp = NULL;
    int r = 0;
    bool sync_wp = m->wp && !m->async;
    sigset_t spset, old;
    sigemptyset(&spset);
    if (pms_sp_signal() > 0)
        sigaddset(&spset, pms_sp_signal());
    for (uint64_t pos = off; pos < off + len && r == 0;) {
        uint64_t pe = (pos / IO_STEP + 1) * IO_STEP;
        if (pe > off + len)
            pe = off + len;
        uint8_t *dev = m->base + pos;
        size_t n = (size_t)(pe - pos);
        uint8_t *ub = write ? (uint8_t *)(uintptr_t)src + (pos - off) : (uint8_t *)buf + (pos - off);
        uint64_t ws[2] = { 0, 0 }, we[2] = { 0, 0 };
        pthread_sigmask(SIG_BLOCK, &spset, &old);
        pthread_mutex_lock(&m->mu);
        r = io_prepare(m, &tmp, dev, n, write, &ws[0], &we[0]);
        if (r == 0 && (src || !write))
            r = io_prepare(m, &tmp, ub, n, !write, &ws[1], &we[1]);  /* buf may lie in the mapping */
        bool wp_held = r == 0 && sync_wp && (we[0] > ws[0] || we[1] > ws[1]);
        if (wp_held) {
            pthread_mutex_lock(&m->wp_mu);
            for (int k = 0; k < 2 && r == 0; k++)
                if (we[k] > ws[k])
                    r = io_writable(m, ws[k], we[k]);
        }
        if (r == 0) {
            if (!write)
                memmove(ub, dev, n);
            else if (src)
                memmove(dev, ub, n);
            else
                memset(dev, 0, n);
        }
        if (wp_held)
            pthread_mutex_unlock(&m->wp_mu);
        pthread_mutex_unlock(&m->mu);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pos = pe;
    }
    free(tmp);
    return r;
}

static int io_check(struct pms_mem *m, size_t len, uint64_t off, bool write)
{
    if (write && m->ro)
        return pms_err(EROFS, "image '%s' is opened read-only", m->bs->filename);
    if (off > m->size || len > m->size - off)
        return pms_err(EINVAL, "request [%llu, +%zu) is outside the image (size %llu)",
                       (unsigned long long)off, len, (unsigned long long)m->size);
    return 0;
}

int pms_mem_pread(struct pms_mem *m, void *buf, size_t len, uint64_t off)
{
    int r = io_check(m, len, off, false);
    return r < 0 ? r : io_copy(m, buf, NULL, len, off, false);
}

int pms_mem_pwrite(struct pms_mem *m, const void *buf, size_t len, uint64_t off)
{
    int r = io_check(m, len, off, true);
    if (r == 0 && !buf && len)
        r = pms_err(EINVAL, "buf is NULL");
    return r < 0 ? r : io_copy(m, NULL, buf, len, off, true);
}

int pms_mem_write_zeroes(struct pms_mem *m, size_t len, uint64_t off)
{
    int r = io_check(m, len, off, true);
    return r < 0 ? r : io_copy(m, NULL, NULL, len, off, true);
}

/* Drop [s, e) (page aligned) from memory: the pages refault from the image.
 * Dirty state of the range is discarded.  mu held. */
static void forget_range(struct pms_mem *m, uint64_t s, uint64_t e);

static int drop_range(struct pms_mem *m, uint64_t s, uint64_t e)
{
    if (e <= s)
        return 0;
    if (madvise(m->base + s, e - s, MADV_DONTNEED) < 0)
        return pms_err(errno, "madvise(MADV_DONTNEED) failed: %s", strerror(errno));
    forget_range(m, s, e);
    return 0;
}

/* Clear the resident, dirty and poison bits of dropped pages [s, e).  mu
 * held. */
static void forget_range(struct pms_mem *m, uint64_t s, uint64_t e)
{
    pthread_mutex_lock(&m->wp_mu);
    uint64_t dropped = 0;
    for (uint64_t p = s / PG; p < e / PG;) {      /* the dirty runs in the range */
        while (p < e / PG && !bit(m->dirty, p))
            p = m->dirty[p >> 6] ? p + 1 : (p | 63) + 1;
        uint64_t q = p;
        while (q < e / PG && bit(m->dirty, q))
            q++;
        if (q > p) {
            for (uint64_t k = p; k < q; k++)
                bclr(m->dirty, k);
            atomic_fetch_sub(&m->ndirty, q - p);
            runs_cleared(m, p, q);
        }
        p = q;
    }
    for (uint64_t p = s / PG; p < e / PG;) {
        uint64_t w = p >> 6, sh = p & 63, n = 64 - sh;
        if (n > e / PG - p)
            n = e / PG - p;
        uint64_t mask = (n == 64 ? ~0ull : ((1ull << n) - 1)) << sh;
        dropped += (uint64_t)__builtin_popcountll(m->resident[w] & mask);
        __atomic_fetch_and(&m->resident[w], ~mask, __ATOMIC_RELEASE);
        __atomic_fetch_and(&m->poison[w], ~mask, __ATOMIC_RELEASE);
        p += n;
    }
    atomic_fetch_sub(&m->nresident, dropped);
    pthread_mutex_unlock(&m->wp_mu);
}

/* Discard while mapped: the whole pages of the range are written back (so
 * a failing discard leaves the image and memory equal), discarded in the
 * image, then dropped from memory so they refault whatever the image now
 * holds (zeroes, or the backing file's bytes as QEMU's discard leaves them).
 * Partial pages at the ends keep their bytes (discard is advisory).  A
 * store racing the discard on the same pages may be lost, as a write racing
 * a discard on a disk may. */
int pms_mem_discard(struct pms_mem *m, size_t len, uint64_t off)
{
    int r = io_check(m, len, off, true);
    if (r < 0)
        return r;
    uint64_t s = (off + PG - 1) & ~(PG - 1), e = (off + len) & ~(PG - 1);
    if (off + len == m->size)
        e = m->maplen;              /* the image's partial last page is whole here */
    if (e <= s)
        return 0;
    pthread_mutex_lock(&m->wb_mu);
    int64_t w = writeback(m, s, e, false);
    r = w < 0 ? (int)w : 0;
    pthread_mutex_lock(&m->mu);
    if (r == 0)
        r = bdev_discard(m->bs, (e < m->size ? e : m->size) - s, s);
    if (r == 0)
        r = drop_range(m, s, e);
    if (m->since_name)
        since_mark(m, s, e - s);
    pthread_mutex_unlock(&m->mu);
    pthread_mutex_unlock(&m->wb_mu);
    return r;
}

/* ---- snapshots ---------------------------------------------------------------- */

static int snap_locked(struct bdev *bs, int (*fn)(struct bdev *, const char *), const char *name)
{
    pthread_mutex_lock(&bs->lock);
    int r = fn(bs, name);
    pthread_mutex_unlock(&bs->lock);
    return r;
}

/* Copy [off, off+len) of the mapping to dst, leaving poisoned pages out
 * (write_runs skips them too).  Async-signal-safe: runs inside the pause. */
static void copy_out(struct pms_mem *m, uint8_t *dst, uint64_t off, uint64_t len)
{
    for (uint64_t p = off; p < off + len;) {
        uint64_t q = p;
        while (q < off + len && !abit(m->poison, q / PG))
            q += PG;
        if (q > p)
            memcpy(dst + (p - off), m->base + p, q - p);
        p = q + (q < off + len ? PG : 0);
    }
}

/* The cut: copy the final dirty set into the staging area.  Runs with the
 * application stopped: no malloc, no error messages.  The pages are NOT
 * re-protected here: re-arming write protection costs a TLB flush per
 * 2 MiB region touched (tens of ms for a few MB scattered over a large
 * region, all of it inside the pause), so they stay marked dirty and the next
 * writeback (after the snapshot is committed) writes their current
 * content again and re-arms them outside the pause.  The price is that the
 * final set is written twice.  Returns the number of runs or -errno. */
/* Where the cut stages the written runs (stage_batch). */
struct stage_acc { uint64_t nr, staged; };

/* walk_written's fn for the cut: copy a batch into the staging area,
 * appending to runs[]. */
static bool stage_batch(struct pms_mem *m, const struct page_region *vec, int n, void *arg)
{
    struct stage_acc *a = arg;
    for (int i = 0; i < n; i++) {
        uint64_t o = vec[i].start, l = vec[i].end - o;
        copy_out(m, m->stage + a->staged, o, l);
        m->runs[a->nr++] = (struct run){ o, l, a->staged };
        a->staged += l;
    }
    return true;
}

static int64_t cut(struct pms_mem *m)
{
    uint64_t nr = 0, staged = 0;
    if (m->async) {
        struct stage_acc a = { 0, 0 };
        int r = walk_written(m, stage_batch, &a);
        return r < 0 ? r : (int64_t)a.nr;
    }
    pthread_mutex_lock(&m->wp_mu);
    uint64_t cur = 0;
    while (cur < m->maplen) {
        uint64_t first = nr;
        /* without rearm nothing can fail */
        nr += (uint64_t)collect_sync(m, cur, m->maplen, m->nruns_max - nr, false, &cur);
        for (uint64_t i = first; i < nr; i++) {
            copy_out(m, m->stage + staged, m->runs[i].off, m->runs[i].len);
            m->runs[i].stage = staged;
            staged += m->runs[i].len;
        }
        if (nr == first)
            break;
    }
    pthread_mutex_unlock(&m->wp_mu);
    return (int64_t)nr;
}

/* What create and revert refuse before touching anything. */
static int snap_refuse(struct pms_mem *m, const char *name,
                       int (*fn)(struct bdev *, const char *))
{
    if (!name || !*name)
        return pms_err(EINVAL, "snapshot name is empty");
    if (!fn)
        return pms_err(ENOTSUP, "format '%s' does not support internal snapshots",
                       m->bs->drv->name);
    if (m->ro)
        return pms_err(EROFS, "image '%s' is opened read-only", m->bs->filename);
    return 0;
}

/* Policy: pre-copy while writers run, round after round while the dirty
 * set shrinks (as live migration does), slowing the writers' missing-page
 * faults when it does not (auto-converge, CONVERGE_*), so that the final set
 * copied inside the pause is small.  wb_mu held.  Returns the bytes written (the
 * last round's in *last) or -errno. */
/* Whether the dirty set holds at least `want` bytes (1), or not (0), or
 * -errno; read-only: nothing is re-protected.  Sync mode counts its bits;
 * async mode walks (split as the cut is) until it has seen `want`.
 * wb_mu held. */
struct count_acc { uint64_t seen, want; };

/* walk_written's fn for the probe: count, stop once `want` was seen. */
static bool count_batch(struct pms_mem *m, const struct page_region *vec, int n, void *arg)
{
    (void)m;
    struct count_acc *a = arg;
    for (int i = 0; i < n; i++)
        a->seen += vec[i].end - vec[i].start;
    return a->seen < a->want;
}

static int dirty_at_least(struct pms_mem *m, uint64_t want)
{
    if (!m->async)
        return atomic_load(&m->ndirty) * PG >= want;
    struct count_acc a = { 0, want };
    int r = walk_written(m, count_batch, &a);
    return r < 0 ? r : a.seen >= want;
}

static int64_t precopy_rounds(struct pms_mem *m, int64_t *last)
{
    int64_t bytes = 0, prev = INT64_MAX;
    *last = 0;
    /* a backlog the pause would copy in no time is left to the cut: a
     * round costs a re-protecting walk of every resident page's entry
     * (16 GiB fully resident: 5-8 ms for a round that wrote nothing,
     * because the background rounds had) */
    int d = dirty_at_least(m, PRECOPY_DONE_BYTES);
    if (d <= 0)
        return d;
    for (int round = 0; round < PRECOPY_ROUNDS; round++) {
        uint64_t f0 = atomic_load(&m->faults);
        int64_t w = writeback(m, 0, m->maplen, false);
        if (w < 0)
            return w;
        bytes += w;
        *last = w;
        if (w < (int64_t)PRECOPY_DONE_BYTES)
            break;
        /* slowing missing faults helps only when new pages are what gets
         * dirtied (a hot set of resident pages is dirtied without one) */
        bool fresh = (atomic_load(&m->faults) - f0) * PG * 2 >= (uint64_t)w;
        if (round > 0 && w > prev / 2) {            /* not converging */
            unsigned us = atomic_load(&m->converge_us);
            if ((!fresh || us >= CONVERGE_MAX_US) && w >= prev)
                break;                              /* slowing does not help (more) */
            if (fresh)
                atomic_store(&m->converge_us, !us ? CONVERGE_START_US
                             : us * 2 > CONVERGE_MAX_US ? CONVERGE_MAX_US : us * 2);
        }
        prev = w;
    }
    return bytes;
}

/* The pre-copy: its rounds, with writers held to DIRTY_PRECOPY_RUNS. */
static int64_t precopy(struct pms_mem *m, int64_t *last)
{
    atomic_store(&m->precopying, true);
    int64_t r = precopy_rounds(m, last);
    atomic_store(&m->precopying, false);
    return r;
}

/* Touch the staging pages the cut will probably fill (about what the last
 * pre-copy round wrote, twice over) before the pause: a first touch costs a
 * page fault each (and, under a shadow-paging hypervisor, an exit even
 * after MADV_POPULATE_WRITE), which inside the pause was most of it.  The
 * touches are stores from user space for that reason.  Under a memory cap
 * at most the part kept between snapshots is warmed.  wb_mu held. */
static void stage_warm_up(struct pms_mem *m, uint64_t last, uint64_t keep)
{
    uint64_t pre = (last * 2 + (1u << 20) + PG - 1) & ~(uint64_t)(PG - 1);
    if (m->limit_pages && pre > keep)
        pre = keep;
    if (pre > m->maplen)
        pre = m->maplen;
    for (uint64_t o = m->stage_warm; o < pre; o += PG)
        ((volatile uint8_t *)m->stage)[o] = 0;
    if (pre > m->stage_warm)
        m->stage_warm = pre;
    atomic_store(&m->stage_pages, m->stage_warm / PG);
}

/* Keep a warm part of the staging area for the next cut, release the rest.
 * wb_mu held. */
static void stage_trim(struct pms_mem *m, uint64_t staged, uint64_t keep)
{
    uint64_t warm = staged > m->stage_warm ? staged : m->stage_warm;
    warm = (warm + PG - 1) & ~(PG - 1);
    if (warm > keep)
        madvise(m->stage + keep, warm - keep, MADV_DONTNEED);
    m->stage_warm = warm < keep ? warm : keep;
    atomic_store(&m->stage_pages, m->stage_warm / PG);
}

/* The instant of the snapshot: stop the application's other threads
 * (unless the caller quiesced them), copy the final dirty set into the
 * staging area, release.  Returns the number of staged runs or -errno;
 * *pause = how long the application was stopped.  wb_mu held. */
static int64_t stop_and_cut(struct pms_mem *m, bool stop, uint64_t *pause)
{
    uint64_t tp = now_ns();
    int r = 0;
    for (int t = 0; stop && t < SNAP_STOP_TRIES; t++) {
        if (t) {
            pms_err_clear();
            usleep(SNAP_STOP_GAP_MS * 1000);
        }
        tp = now_ns();
        if ((r = pms_sp_stop(SNAP_STOP_MS)) != -EAGAIN)
            break;
    }
    if (r < 0) {
        char why[256];              /* the safepoint's message */
        snprintf(why, sizeof why, "%s", pms_err_get());
        return pms_err(-r, "%s; stop writers and pass PMS_SNAP_QUIESCED", why);
    }
    int64_t nr = cut(m);
    *pause = now_ns() - tp;
    if (stop)
        pms_sp_release();
    if (nr < 0)
        return pms_err((int)-nr, "final dirty scan failed: %s", strerror((int)-nr));
    return nr;
}

/* Write the staged runs (the image then holds memory as it was at the cut)
 * and commit the snapshot in the image: internal (the qcow2 snapshot
 * table), or external (the image as it now is becomes the layer file, the
 * live image a new overlay on it; the node is switched in place, so m->bs
 * stays valid).  Writeback of anything dirtied after the cut waits for
 * wb_mu, so the snapshot never sees a later byte.  wb_mu held.  *staged =
 * bytes written. */
static int commit(struct pms_mem *m, const char *name, struct bdev_extsnap_prep *ext,
                  int64_t nr, uint64_t *staged)
{
    *staged = 0;
    for (int64_t i = 0; i < nr; i++)
        *staged += m->runs[i].len;
    atomic_store(&m->stage_pages, (*staged > m->stage_warm ? *staged : m->stage_warm) / PG);
    uint64_t failed;
    int r = write_runs(m, m->runs, (uint64_t)nr, m->stage, false, &failed);
    /* the driver's create is durable on return (it flushes the staged data
     * with its first barrier); no flush of our own after it */
    if (ext) {
        r = r == 0 ? bdev_extsnap_commit(ext) : (bdev_extsnap_abort(ext), r);
        mark_eager(m, true);
    }
    else if (r == 0)
        r = snap_locked(m->bs, m->bs->drv->snapshot_create, name);
    return r;
}

int pms_mem_snapshot_create(struct pms_mem *m, const char *name, unsigned flags)
{
    int r = snap_refuse(m, name, m->bs->drv->snapshot_create);
    if (r < 0)
        return r;
    /* external: the new overlay is prepared (created, fsynced, opened)
     * while writers run; the commit after the cut only links, renames and
     * switches */
    struct bdev_extsnap_prep *ext = NULL;
    if ((flags & PMS_SNAP_EXTERNAL) && (r = bdev_extsnap_prepare(m->bs, name, &ext)) < 0)
        return r;
    uint64_t keep = STAGE_KEEP_MAX;
    if (m->limit_pages && keep > m->limit_pages * PG / STAGE_KEEP_CAP_DIV)
        keep = m->limit_pages * PG / STAGE_KEEP_CAP_DIV & ~(PG - 1);
    uint64_t t0 = now_ns(), pause = 0, staged = 0;
    bool stop = !(flags & PMS_SNAP_QUIESCED);
    pthread_mutex_lock(&m->wb_mu);
    int64_t last, bytes = precopy(m, &last);
    uint64_t t1 = now_ns();
    int64_t nr = bytes;
    if (bytes >= 0) {
        stage_warm_up(m, (uint64_t)last, keep);
        nr = stop_and_cut(m, stop, &pause);
    }
    atomic_store(&m->converge_us, 0);   /* cut (or failed): writers go freely */
    uint64_t t2 = now_ns();
    if (nr < 0 && ext)
        bdev_extsnap_abort(ext);
    r = nr < 0 ? (int)nr : commit(m, name, ext, nr, &staged);
    if (nr >= 0)
        stage_trim(m, staged, keep);
    if (r == 0) {
        /* the cut's final set stays dirty and is written again: it counts
         * as changed since this snapshot (conservative) */
        since_reset(m, name);
        for (int64_t i = 0; i < nr; i++)
            since_mark(m, m->runs[i].off, m->runs[i].len);
    }
    pthread_mutex_unlock(&m->wb_mu);
    if (getenv("PMS_MEM_DEBUG"))
        fprintf(stderr, "snapshot %s: pre-copy %.2f ms (%lld B), pause %.2f ms, "
                "staged write + commit %.2f ms (%llu B)\n", name, (t1 - t0) / 1e6,
                (long long)bytes, pause / 1e6, (now_ns() - t2) / 1e6,
                (unsigned long long)staged);
    if (r < 0)
        return r;
    atomic_fetch_add(&m->snapshots, 1);
    atomic_store(&m->snap_ns, now_ns() - t0);
    atomic_store(&m->snap_pause_ns, stop ? pause : 0);
    atomic_store(&m->snap_bytes, (uint64_t)bytes + staged);
    return 0;
}

/* The virtual size recorded in snapshot `name` (an internal one matched as
 * the driver's goto does: by id first, then by name; an external one, ext,
 * by name: its layer's size); 0 when unknown or not found. */
static uint64_t snap_disk_size(struct bdev *bs, const char *name, bool ext)
{
    struct pms_snapshot_info *l = NULL;
    size_t n = 0;
    uint64_t size = 0;
    int r;
    if (ext)
        r = bdev_extsnap_list(bs, &l, &n);
    else if (!bs->drv->snapshot_list)
        return 0;
    else {
        pthread_mutex_lock(&bs->lock);
        r = bs->drv->snapshot_list(bs, &l, &n);
        pthread_mutex_unlock(&bs->lock);
    }
    if (r < 0) {
        pms_err_clear();
        return 0;
    }
    for (size_t i = 0; i < n && !size && !ext; i++)
        if (!strcmp(l[i].id, name))
            size = l[i].disk_size;
    for (size_t i = 0; i < n && !size; i++)
        if (l[i].name && !strcmp(l[i].name, name))
            size = l[i].disk_size;
    pms_snapshot_list_free(l, n);
    return size;
}

/* Ranges of the mapping to drop at a revert (page aligned, in order of
 * arrival; adjacent ones merged). */
struct drops {
    struct pms_mem *m;
    struct iovec *v;
    size_t n, cap;
};

static int drops_add(void *opaque, uint64_t off, uint64_t len)
{
    struct drops *d = opaque;
    uint64_t s = off & ~(PG - 1), e = (off + len + PG - 1) & ~(PG - 1);
    if (e > d->m->maplen)
        e = d->m->maplen;
    if (s >= e)
        return 0;
    uint8_t *a = d->m->base + s;
    if (d->n && (uint8_t *)d->v[d->n - 1].iov_base + d->v[d->n - 1].iov_len == a) {
        d->v[d->n - 1].iov_len += e - s;
        return 0;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 256;
        struct iovec *v = realloc(d->v, cap * sizeof *v);
        if (!v)
            return pms_err(ENOMEM, "out of memory");
        d->v = v;
        d->cap = cap;
    }
    d->v[d->n++] = (struct iovec){ a, e - s };
    return 0;
}

/* Add the pages written since their last writeback (they hold bytes the
 * image has never seen).  mu held. */
static int drops_add_dirty(struct drops *d)
{
    struct pms_mem *m = d->m;
    if (!m->wp)
        return 0;
    if (m->async) {
        struct page_region v[256];
        uint64_t cur = 0;
        int k;
        while ((k = scan(m, &cur, m->maplen, false, v, 256)) > 0)
            for (int i = 0; i < k; i++) {
                int r = drops_add(d, v[i].start, v[i].end - v[i].start);
                if (r < 0)
                    return r;
            }
        return k < 0 ? pms_err(-k, "PAGEMAP_SCAN failed: %s", strerror(-k)) : 0;
    }
    pthread_mutex_lock(&m->wp_mu);
    int r = 0;
    for (uint64_t p = 0; p < m->npages && r == 0; p++)
        if (m->dirty[p >> 6] && bit(m->dirty, p))
            r = drops_add(d, p * PG, PG);
        else if (!m->dirty[p >> 6])
            p |= 63;
    pthread_mutex_unlock(&m->wp_mu);
    return r;
}

/* Drop the listed ranges (batches of process_madvise) and forget them.
 * mu held. */
static int drops_apply(struct drops *d)
{
    for (size_t i = 0; i < d->n; i += 1024) {
        int n = d->n - i < 1024 ? (int)(d->n - i) : 1024;
        int r = madvise_batch(d->m, d->v + i, n, MADV_DONTNEED);
        if (r < 0)
            return pms_err(-r, "madvise(MADV_DONTNEED) failed: %s", strerror(-r));
    }
    for (size_t i = 0; i < d->n; i++) {
        uint64_t s = (uint64_t)((uint8_t *)d->v[i].iov_base - d->m->base);
        forget_range(d->m, s, s + d->v[i].iov_len);
    }
    return 0;
}

/* Revert while mapped: only what differs is dropped.  The driver reports
 * the ranges whose image content differs between now and the snapshot;
 * with the pages written since their last writeback they are dropped after
 * the image is reverted and refault from it, while every other resident
 * page already holds the snapshot's bytes and stays.  (A driver that cannot
 * tell, or a failure to tell, drops everything.)  A store racing the revert
 * lands either before it (and is dropped) or after it (and stays). */
/* External snapshot `name`: the ranges allocated above its layer in the
 * live chain (the overlay and the layers between) are what differs; a
 * layer on another branch of the tree: unknown (-ENOENT, drop all).
 * Takes no lock but the node's own.  wb_mu held. */
static int ext_changed(struct pms_mem *m, const char *name, struct drops *d)
{
    char path[4096];
    int r = bdev_extsnap_layer_path(m->bs->filename, name, path, sizeof path);
    if (r < 0)
        return r;
    struct stat want;
    if (stat(path, &want) < 0)
        return -errno;
    int depth = -1;
    pthread_mutex_lock(&m->bs->lock);
    struct bdev *b = m->bs->backing;
    for (int k = 1; b && depth < 0; k++, b = b->backing) {
        struct stat st;
        const char *f = b->file ? b->file->filename : b->filename;
        if (stat(f, &st) == 0 && st.st_ino == want.st_ino && st.st_dev == want.st_dev)
            depth = k;
    }
    pthread_mutex_unlock(&m->bs->lock);
    if (depth < 0)
        return -ENOENT;
    for (uint64_t off = 0; off < m->size;) {
        struct pms_extent e;
        r = bdev_block_status(m->bs, off, m->size - off, &e);
        if (r < 0)
            return r;
        if ((e.flags & PMS_BLOCK_ALLOCATED) && e.depth < depth &&
            (r = drops_add(d, e.start, e.length)) < 0)
            return r;
        off = e.start + e.length;
    }
    return 0;
}

int pms_mem_snapshot_revert(struct pms_mem *m, const char *name)
{
    struct bdev *bs = m->bs;
    bool ext = name && *name && bdev_extsnap_exists(bs, name) > 0;
    int r0 = snap_refuse(m, name, bs->drv->snapshot_goto);
    if (r0 < 0)
        return r0;
    /* the mapping has the image's size: a snapshot of another size would
     * leave it too short or too long */
    uint64_t ss = snap_disk_size(bs, name, ext);
    if (ss && ss != m->size)
        return pms_err(EBUSY, "snapshot '%s' has size %llu, the mapping %llu: unmap before "
                       "reverting to it", name, (unsigned long long)ss,
                       (unsigned long long)m->size);
    struct drops d = { .m = m };
    /* before wb_mu (a create holds it from prepare, before wb_mu); it also
     * keeps a delete from changing the chain ext_changed reads */
    if (ext) bdev_extsnap_lock(bs);
    /* what a background round would still write is dropped below: it
     * stops at its next batch instead of finishing first */
    atomic_fetch_add(&m->wb_cancel, 1);
    pthread_mutex_lock(&m->wb_mu);
    atomic_fetch_sub(&m->wb_cancel, 1);
    bool whole = !bs->drv->snapshot_changed;
    if (m->since_name && !strcmp(m->since_name, name)) {
        /* the snapshot this mapping took or reverted to last: the pages
         * written since are known exactly */
        whole = false;
        for (uint64_t p = 0; p < m->npages; p++)
            if (!m->since[p >> 6])
                p |= 63;
            else if (bit(m->since, p) && (whole = drops_add(&d, p * PG, PG) < 0))
                break;
    } else if (ext) {
        whole = ext_changed(m, name, &d) < 0;
        pms_err_clear();
    } else if (!whole) {
        pthread_mutex_lock(&bs->lock);
        whole = bs->drv->snapshot_changed(bs, name, drops_add, &d) < 0;
        pthread_mutex_unlock(&bs->lock);
        pms_err_clear();
    }
    /* a page that looks clean may hold bytes the image lacks (no_evict:
     * a re-dirty failed): only dropping every page is sure to drop it */
    bool lost = atomic_load(&m->no_evict);
    whole |= lost;
    int r = ext ? bdev_extsnap_revert(bs, name) : snap_locked(bs, bs->drv->snapshot_goto, name);
    mark_eager(m, true);
    if (r == 0) {
        pthread_mutex_lock(&m->mu);
        if (!whole && (r = drops_add_dirty(&d)) == 0)
            r = drops_apply(&d);
        if (whole || r < 0)
            r = drop_range(m, 0, m->maplen);
        if (r == 0 && lost)
            atomic_store(&m->no_evict, false);   /* nothing resident is newer now */
        if (r < 0)
            r = pms_err(-r, "reverted the image to '%s' but could not drop the mapping's "
                        "pages (%s): unmap without persisting", name, pms_err_get());
        zknown_reset(m);
        atomic_store(&m->ra_reset, true);
        pthread_mutex_unlock(&m->mu);
        since_reset(m, r == 0 ? name : NULL);
    }
    pthread_mutex_unlock(&m->wb_mu);
    if (ext) bdev_extsnap_unlock(bs);
    free(d.v);
    return r;
}

static void stats_fill(struct pms_mem *m, struct pms_stats *st);

/* Fills at most st->size bytes (an older caller's shorter struct). */
int pms_mem_stats(struct pms_mem *m, struct pms_stats *st)
{
    struct pms_stats full;
    memset(&full, 0, sizeof full);
    stats_fill(m, &full);
    size_t sz = st->size < sizeof full ? st->size : sizeof full;
    if (sz > sizeof st->size)
        memcpy((char *)st + sizeof st->size, (char *)&full + sizeof st->size,
               sz - sizeof st->size);
    return 0;
}

static void stats_fill(struct pms_mem *m, struct pms_stats *st)
{
    st->faults = atomic_load(&m->faults);
    st->wp_faults = atomic_load(&m->wp_faults);
    st->bytes_faulted_in = atomic_load(&m->bytes_in);
    st->bytes_written_back = atomic_load(&m->bytes_out);
    st->resident_pages = atomic_load(&m->nresident);
    st->staging_pages = atomic_load(&m->stage_pages);
    st->pages_evicted = atomic_load(&m->evicted);
    st->snapshots = atomic_load(&m->snapshots);
    st->last_snapshot_ns = atomic_load(&m->snap_ns);
    st->last_snapshot_pause_ns = atomic_load(&m->snap_pause_ns);
    st->last_snapshot_bytes = atomic_load(&m->snap_bytes);
    st->dirty_mode = !m->wp ? PMS_DIRTY_AUTO : m->async ? PMS_DIRTY_ASYNC_WP : PMS_DIRTY_SYNC_WP;
    if (m->async) {
        /* count written pages without re-protecting them */
        uint64_t cur = 0, n = 0;
        struct page_region v[256];
        while (cur < m->maplen) {
            int k = scan(m, &cur, m->maplen, false, v, 256);
            if (k <= 0)
                break;
            for (int i = 0; i < k; i++)
                n += (v[i].end - v[i].start) / PG;
        }
        st->dirty_pages = n;
    } else
        st->dirty_pages = atomic_load(&m->ndirty);
    st->io_errors = atomic_load(&m->io_errors);
    pthread_mutex_lock(&m->mu);
    snprintf(st->last_error, sizeof st->last_error, "%s", m->lasterr);
    pthread_mutex_unlock(&m->mu);
}
