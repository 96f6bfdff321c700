/* pmemsnap — persistent memory backed by disk images, with instant
 * incremental snapshots.
 *
 * Public API.  Every function that can fail returns 0 (or a non-negative
 * count) on success and a negative errno on failure; the failing call leaves
 * a human readable message, prefixed with its own name, in a thread-local
 * buffer that pms_errmsg() returns.  There is no other error channel.
 *
 * Threads: a pms_dev may be used from several threads at once; the library
 * serialises what must be serialised (see lib/block/block.h).  Option and
 * info structs carry a size field set by their init function so that fields
 * can be appended without breaking the ABI.
 */
#ifndef PMEMSNAP_H
#define PMEMSNAP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PMS_VERSION_MAJOR 0
#define PMS_VERSION_MINOR 1

typedef struct pms_dev pms_dev;

/* Message of the last failing call in this thread ("" if none). */
const char *pms_errmsg(void);

/* ---- opening ------------------------------------------------------------ */

enum pms_cache_mode {
    PMS_CACHE_WRITEBACK = 0,   /* page cache, flush on pms_flush (default) */
    PMS_CACHE_NONE,            /* O_DIRECT (unaligned requests through aligned
                                  bounce buffers); pms_open fails with EINVAL
                                  where the file system refuses O_DIRECT, as
                                  QEMU does */
    PMS_CACHE_WRITETHROUGH,    /* every write is flushed before returning */
    PMS_CACHE_UNSAFE,          /* flushes are ignored */
    PMS_CACHE_DIRECTSYNC,      /* O_DIRECT + writethrough */
};

/* Deepest backing chain pms_open opens (backing files below the top
 * image): each layer holds a descriptor and some stack while the chain
 * opens, and every external snapshot adds a layer.  Deeper chains fail
 * with ELOOP. */
#define PMS_MAX_BACKING_DEPTH 256

struct pms_open_opts {
    size_t size;               /* sizeof(struct pms_open_opts), set by init */
    int readonly;              /* open read-only (no write ever reaches the file) */
    const char *format;        /* "qcow2", "raw" or NULL to probe */
    uint64_t l2_cache_size;    /* bytes of L2 tables cached; 0 = default (the whole image, 1..32 MiB) */
    uint64_t refcount_cache_size; /* bytes of refcount blocks cached; 0 = default */
    int cache_mode;            /* enum pms_cache_mode */
    int no_backing;            /* do not open the backing file (reads of unallocated
                                  clusters return zeroes) */
    int force_share;           /* accepted for qemu-io compatibility (-U) */
    /* Fault injection for tests: a spec like "seed=N,crash_after=N,mode=drop|tear"
     * (also read_error_at=OFF, read_error_after=N, flush_delay_us=N,
     * flush_error_at=N; lib/block/drivers/faulty.c says what each does)
     * inserts the fault-injecting "faulty" driver between the format and
     * the file.  NULL in normal use. */
    const char *fault_spec;
    /* Open for pms_check (QEMU's BDRV_O_CHECK): damage that a normal open
     * refuses (tables outside the file, bad L1 or refcount-table entries,
     * bad snapshot L1 tables) is left for the check to report, a dirty image
     * is not repaired at open, and a corrupt-flagged image opens writable so
     * that a repairing check can clear the flag.  Only pms_check, pms_info
     * and reads make sense on such a handle. */
    int check;
    /* A writable open of a qcow2 image left dirty (lazy refcounts) repairs
     * its refcounts first, as QEMU does; each line of that repair's report
     * (the lines `pmemsnap check -r all` prints) goes here, as QEMU prints
     * them on stderr.  NULL: the repair is silent. */
    void (*repair_msg)(void *opaque, const char *msg);
    void *repair_opaque;
    /* Format of the backing file, overriding the one the image names
     * (qemu's backing.driver); NULL: the image's, or probed. */
    const char *backing_format;
    /* Lazy refcounts for this open (qemu's lazy-refcounts option): 0 = as
     * the image's compat bit says, > 0 = on (a version 3 qcow2 image: the
     * dirty bit is set while refcount updates are held back in memory, a
     * clean close writes them and clears it), < 0 = off. */
    int lazy_refcounts;
    /* Fault injection for tests (qemu-io's blkdebug rule on event
     * l2_update): writing a changed L2 table back to the file fails with
     * this errno (positive), as each L2 write-back is QEMU's l2_update
     * event.  0 in normal use. */
    int inject_l2_update;
    /* Start the write-out of large writes (64 KiB and more) to the image's
     * file at once, without waiting for it (sync_file_range): for a caller
     * that flushes soon after writing a lot, such as a server whose clients
     * write a file back and then fsync it, so the flush finds the data on its
     * way to the disk.  0 (default): the page cache decides, as for QEMU.
     * A mapped device does this itself while mapped. */
    int eager_writeout;
};
void pms_open_opts_init(struct pms_open_opts *o);

int  pms_open(const char *path, const struct pms_open_opts *opts, pms_dev **devp);
int  pms_close(pms_dev *dev);                 /* unmaps, flushes everything; frees dev even
                                                  when that fails (the error is returned) */
int64_t pms_size(pms_dev *dev);

/* ---- block I/O (bytes; any alignment) ------------------------------------ */

int  pms_pread(pms_dev *dev, void *buf, size_t len, uint64_t off);
int  pms_pwrite(pms_dev *dev, const void *buf, size_t len, uint64_t off);
int  pms_write_zeroes(pms_dev *dev, size_t len, uint64_t off);
/* pms_write_zeroes with flags (qemu-io `write -z [-u]`): with
 * PMS_ZERO_MAY_UNMAP the range's storage may be released (what
 * pms_write_zeroes does); without it allocated qcow2 clusters stay
 * allocated, marked zero.  Other flag bits: EINVAL. */
#define PMS_ZERO_MAY_UNMAP 0x1
int  pms_write_zeroes_ex(pms_dev *dev, size_t len, uint64_t off, unsigned flags);
/* Write whole clusters compressed, as qemu-io's `write -c` (qcow2 only:
 * ENOTSUP otherwise, or with an external data file).  off must be cluster
 * aligned and len a multiple of the cluster size, except that the last
 * cluster of the image may be written partially (it is padded with zeroes).
 * Compression is zlib or zstd, per the image's compression type; a cluster
 * that does not get smaller is written uncompressed, as QEMU does.  Unlike
 * QEMU, which refuses (EIO) to compress over an allocated cluster, an
 * existing cluster is replaced.  EBUSY while the device is mapped. */
int  pms_pwrite_compressed(pms_dev *dev, const void *buf, size_t len, uint64_t off);
int  pms_discard(pms_dev *dev, size_t len, uint64_t off);
/* The VM state area of a qcow2 image (qemu-io `read -b`/`write -b`,
 * QEMU's savevm data): bytes [pos, pos+len) of a region past the disk,
 * stored in the image's clusters like the disk's.  ENOTSUP for raw, EBUSY
 * while mapped. */
int  pms_vmstate_pread(pms_dev *dev, void *buf, size_t len, uint64_t pos);
int  pms_vmstate_pwrite(pms_dev *dev, const void *buf, size_t len, uint64_t pos);
int  pms_flush(pms_dev *dev);                 /* durable on return */
int  pms_truncate(pms_dev *dev, uint64_t new_size);  /* grow or shrink; EBUSY while mapped */

/* Allocation status of [off, off+len): fills *ext with the first extent,
 * which may be shorter than len.  Mirrors qemu-img map --output=json. */
#define PMS_BLOCK_DATA      0x1   /* reads come from data stored in some layer */
#define PMS_BLOCK_ZERO      0x2   /* reads return zeroes */
#define PMS_BLOCK_OFFSET    0x4   /* host_offset is valid (raw data at offset) */
#define PMS_BLOCK_COMPRESSED 0x8
#define PMS_BLOCK_ALLOCATED 0x10  /* stored in some layer of the chain (qemu "present") */
struct pms_extent {
    uint64_t start;            /* guest offset */
    uint64_t length;
    unsigned flags;            /* PMS_BLOCK_* */
    int depth;                 /* 0 = this image, 1 = its backing file, ... */
    uint64_t host_offset;      /* valid with PMS_BLOCK_OFFSET */
};
int  pms_block_status(pms_dev *dev, uint64_t off, uint64_t len, struct pms_extent *ext);

/* ---- image creation ----------------------------------------------------- */

/* Preallocation, as qemu-img create -o preallocation=: metadata allocates
 * every L2 table and data cluster (qcow2 only; the file stays sparse),
 * falloc also reserves the data with fallocate, full writes it (zeroes). */
enum pms_prealloc {
    PMS_PREALLOC_OFF = 0,
    PMS_PREALLOC_METADATA,
    PMS_PREALLOC_FALLOC,
    PMS_PREALLOC_FULL,
};

struct pms_create_opts {
    size_t size;               /* sizeof(struct pms_create_opts), set by init */
    const char *format;        /* "qcow2" (default) or "raw" */
    uint64_t cluster_size;     /* default (and 0): 65536 */
    int compat_v2;             /* write a version 2 image (compat=0.10) */
    int extended_l2;           /* subcluster allocation */
    int refcount_bits;         /* default (and 0): 16 */
    const char *backing_file;
    const char *backing_format;
    int lazy_refcounts;        /* compat bit lazy_refcounts (version 3): the image
                                  carries the dirty bit while it is written, as
                                  with QEMU (refcounts are never actually stale) */
    int preallocation_metadata;/* older callers: same as preallocation = METADATA */
    int backing_unchecked;     /* as qemu-img create -u: the backing file is not
                                  opened (a size must be given) */
    const char *compression_type; /* NULL or "zlib" (default), "zstd" (version 3) */
    int preallocation;         /* enum pms_prealloc (default off) */
};
void pms_create_opts_init(struct pms_create_opts *o);
/* size may be 0 with a backing file: the backing file's size is used. */
int  pms_create(const char *path, uint64_t size, const struct pms_create_opts *opts);

/* ---- information -------------------------------------------------------- */

struct pms_snapshot_info {
    char id[32];
    char *name;                /* owned by the list; freed by pms_snapshot_list_free */
    uint64_t vm_state_size;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t disk_size;        /* virtual size at snapshot time */
    uint32_t icount_lo, icount_hi; /* instruction count, -1 if unknown */
    int has_icount;
    int kind;                  /* PMS_SNAP_KIND_INTERNAL or PMS_SNAP_KIND_EXTERNAL */
    char *file;                /* external: path of its layer file (owned by the list,
                                  freed by pms_snapshot_list_free); NULL if internal */
};
#define PMS_SNAP_KIND_INTERNAL 0   /* inside the image file (qemu-img snapshot) */
#define PMS_SNAP_KIND_EXTERNAL 1   /* a read-only layer file beside the image */

struct pms_info {
    size_t size;               /* set by caller to sizeof(struct pms_info); less
                                  than sizeof(size_t) (0) is EINVAL */
    char format[16];
    uint64_t virtual_size;
    uint64_t actual_size;      /* bytes allocated on the host file system */
    uint64_t cluster_size;     /* 0 for raw */
    int qcow2_version;         /* 2 or 3; 0 for raw */
    int refcount_bits;
    int extended_l2;
    int lazy_refcounts;
    int corrupt;
    int dirty_flag;
    char compression_type[8];  /* "zlib" / "zstd" */
    char backing_file[1024];
    char backing_format[32];
    char full_backing_file[4096]; /* resolved path of the backing file */
    int readonly;
    /* qcow2: more clusters carry a refcount than the host file occupies
     * (QEMU's metadata-preallocation heuristic).  qemu-img map reports
     * holes of the host file inside data clusters as zeroes only then. */
    int metadata_preallocated;
};
int  pms_info(pms_dev *dev, struct pms_info *info);

/* ---- consistency check (qcow2) ------------------------------------------ */

#define PMS_CHECK_REPAIR_LEAKS  0x1
#define PMS_CHECK_REPAIR_ALL    0x3
struct pms_check_result {
    size_t size;               /* set by caller to the struct's sizeof (an older,
                                  smaller one gets a prefix); 0 is EINVAL */
    uint64_t corruptions;
    uint64_t leaks;
    uint64_t check_errors;
    uint64_t corruptions_fixed;
    uint64_t leaks_fixed;
    uint64_t image_end_offset;
    uint64_t allocated_clusters;
    uint64_t total_clusters;
    uint64_t fragmented_clusters;
    uint64_t compressed_clusters;
};
/* Messages describing each problem go to the callback (may be NULL). */
typedef void (*pms_check_msg_fn)(void *opaque, const char *msg);
int  pms_check(pms_dev *dev, unsigned flags, struct pms_check_result *res,
               pms_check_msg_fn fn, void *opaque);

/* ---- internal snapshots --------------------------------------------------- */

int  pms_snapshot_create(pms_dev *dev, const char *name);
int  pms_snapshot_revert(pms_dev *dev, const char *name);   /* name or id; while mapped:
                                                  EBUSY if its size differs */
int  pms_snapshot_delete(pms_dev *dev, const char *name);   /* name or id */
/* Progress of a long operation: done out of total bytes. */
typedef void (*pms_progress_fn)(void *opaque, uint64_t done, uint64_t total);
/* Delete with progress (fn may be NULL): deleting an external snapshot
 * merges its layer's data into the images that read through it; EBUSY
 * (nothing written) while the layer or one of those images holds internal
 * snapshots, which the merge would drop or change.  flags: 0. */
int  pms_snapshot_delete_ex(pms_dev *dev, const char *name, unsigned flags,
                            pms_progress_fn fn, void *opaque);
int  pms_snapshot_list(pms_dev *dev, struct pms_snapshot_info **list, size_t *n);
void pms_snapshot_list_free(struct pms_snapshot_info *list, size_t n);

/* ---- the memory device (lib/mem) ---------------------------------------- */

enum pms_dirty_mode {
    PMS_DIRTY_AUTO = 0,        /* async WP + PAGEMAP_SCAN when present, else sync; sync when
                                  mem_limit keeps at most 1/256 of the mapping resident */
    PMS_DIRTY_ASYNC_WP,
    PMS_DIRTY_SYNC_WP,
};

struct pms_map_opts {
    size_t size;               /* sizeof(struct pms_map_opts), set by init */
    uint64_t mem_limit;        /* resident-memory cap in bytes, 0 = none; it holds the
                                  mapping's pages, snapshot staging, the device's
                                  per-page bitmaps (3-4 bits per page of the mapping)
                                  and the block layer's metadata memory (the
                                  metadata_bytes of pms_stats); those two together
                                  are counted up to 1/4 of the cap */
    int dirty_tracking;        /* enum pms_dirty_mode */
    uint64_t chunk_size;       /* fault-in unit in bytes (power of two, page .. 64 MiB) */
    unsigned writeback_interval_ms; /* background writeback period; 0 = default */
    int prefetch;              /* stream the whole image in the background */
};
void pms_map_opts_init(struct pms_map_opts *o);

int  pms_map(pms_dev *dev, const struct pms_map_opts *opts, void **addrp, size_t *lenp);
int  pms_persist(pms_dev *dev, const void *addr, size_t len);
int  pms_unmap(pms_dev *dev);   /* persists, then unmaps; if the persist fails (e.g. a full
                                   disk) it stays mapped, nothing lost, and may be retried */

/* A snapshot of a mapped device (pms_snapshot_create) is live: the library
 * parks every other application thread for the final copy with a real-time
 * signal and its own handler.  The signal is PMEMSNAP_SIGNAL from the
 * environment if set ("34", "RTMIN+6", "RTMAX-2"; pms_map fails with EBUSY
 * if that signal already has a handler, EINVAL if it is no real-time
 * signal), else SIGRTMIN+6 if it has the default disposition and the
 * thread calling pms_map first does not block it, else the first such of
 * SIGRTMIN+7 .. SIGRTMAX, SIGRTMIN+5 .. SIGRTMIN.  A handler the
 * application installed before pms_map is never replaced; one it installs
 * on the library's signal afterwards makes live snapshots fail with EBUSY.
 * A thread that blocks the signal makes them fail with EAGAIN (after 1 s);
 * pass PMS_SNAP_QUIESCED when the writers are stopped by other means.
 * Kernel threads of the process (io_uring's iou-wrk/iou-sqp, vhost) run no
 * handlers and are not waited for; data they write into the mapping is in
 * the snapshot if its I/O completed before the call, not if submitted after
 * it returned, and byte-wise old or new if in flight across it (as after a
 * crash); it is never lost for the next snapshot or persist.  Stores that
 * bypass the page tables into pinned pages (io_uring fixed buffers, RDMA,
 * O_DIRECT reads racing a writeback) are not tracked: keep such buffers
 * outside the mapping (lib/mem/README.md). */

/* Flags for pms_snapshot_create_ex. */
#define PMS_SNAP_QUIESCED 0x1  /* caller already stopped every writer */
#define PMS_SNAP_EXTERNAL 0x2  /* external snapshot: the state becomes a read-only
                                  layer file beside the image, the image an overlay
                                  on it (see docs/snapshots.md) */
int  pms_snapshot_create_ex(pms_dev *dev, const char *name, unsigned flags);

struct pms_stats {
    size_t size;               /* set by caller to the struct's sizeof (an older,
                                  smaller one gets a prefix); 0 is EINVAL */
    uint64_t faults;           /* missing faults served */
    uint64_t wp_faults;        /* synchronous write-protect faults served */
    uint64_t bytes_faulted_in;
    uint64_t bytes_written_back;
    uint64_t dirty_pages;
    uint64_t resident_pages;
    uint64_t pages_evicted;
    uint64_t snapshots;
    uint64_t last_snapshot_ns; /* wall time of the last snapshot */
    uint64_t last_snapshot_pause_ns; /* time other threads were stopped */
    uint64_t last_snapshot_bytes;    /* bytes written by the last snapshot */
    int dirty_mode;            /* enum pms_dirty_mode actually in use */
    uint64_t io_errors;        /* fault-ins that failed (the access got SIGBUS) */
    char last_error[160];      /* message of the last such failure, "" if none */
    uint64_t staging_pages;    /* snapshot staging pages kept in memory between snapshots;
                                  resident_pages + staging_pages stay within mem_limit
                                  less the bitmaps' share (see pms_map_opts) */
    uint64_t metadata_bytes;   /* memory the block layer holds for image metadata in
                                  this process (table caches of the image and of each
                                  external snapshot layer, chain maps, a delete's merge
                                  buffers); counted against mem_limit (see pms_map_opts) */
};
int  pms_stats(pms_dev *dev, struct pms_stats *st);

#ifdef __cplusplus
}
#endif
#endif
