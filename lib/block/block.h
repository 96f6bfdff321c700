/* Block core: the layer every driver sits under and every caller goes through.
 *
 * A bdev is one node of a graph: a format node (qcow2, raw) over a protocol
 * node (file, faulty), and optionally a backing node.  Callers use bdev_*();
 * drivers implement struct pms_driver.  The core checks every request
 * (range inside the device, no overflow, writable) before the driver sees it,
 * as nbdkit's server/backend.c does, so drivers may assume sane arguments.
 *
 * Threads: any thread may call bdev_*().  Each bdev has one mutex, `lock`,
 * taken by the core around every driver call of a *format* node that is
 * entered from outside (bdev_* on the top node).  It guards the driver's
 * metadata (caches, tables, allocation) and so serialises overlapping
 * requests: a request is tracked from check to completion under that lock.
 * Protocol nodes (file) are stateless and thread-safe on their own (pread/
 * pwrite), and are called by their parent with the parent's lock held.
 * Lock order: parent before child; a backing node is a separate top with its
 * own lock, taken while holding the child's lock (strictly downward).
 */
#ifndef PMS_BLOCK_H
#define PMS_BLOCK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include "pmemsnap.h"

struct bdev;

/* One run of a batched write: bytes [off, off+len) of the device from buf. */
struct bdev_wvec {
    uint64_t off, len;
    const void *buf;
};
/* Supplies bytes [off, off+len) of the device from the caller's own copy
 * (the memory device's resident pages) when it holds all of them: fills
 * buf and returns true.  false: the driver reads them from the image.
 * A driver calls it for the parts of a cluster (or subcluster) a batch does
 * not cover but must write anyway (copy-on-write of a shared cluster), so
 * that no old data is read back.  Called with the node's lock held: it must
 * not call bdev_*() on the node. */
typedef bool (*bdev_fill_fn)(void *opaque, void *buf, uint64_t len, uint64_t off);
/* Receives one range [off, off+len) of the device; 0 or -errno (stops). */
typedef int (*bdev_range_fn)(void *opaque, uint64_t off, uint64_t len);

/* Flags for pwrite_zeroes. */
#define BDEV_ZERO_MAY_UNMAP  0x1   /* may deallocate, reads must still be zero */

struct pms_driver {
    const char *name;
    size_t state_size;           /* bytes of bs->opaque allocated by the core */
    /* Probe score for the first 512+ bytes of a file: >0 = this format. */
    int  (*probe)(const uint8_t *buf, size_t len);
    /* Open: path for protocol drivers; format drivers use bs->file. */
    int  (*open)(struct bdev *bs, const char *path, const struct pms_open_opts *o);
    void (*close)(struct bdev *bs);
    int  (*pread)(struct bdev *bs, void *buf, uint64_t len, uint64_t off);
    int  (*pwrite)(struct bdev *bs, const void *buf, uint64_t len, uint64_t off);
    int  (*pwrite_zeroes)(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags);
    /* Write whole clusters compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED);
     * the driver checks its alignment rules.  Optional (ENOTSUP). */
    int  (*pwrite_compressed)(struct bdev *bs, const void *buf, uint64_t len, uint64_t off);
    int  (*discard)(struct bdev *bs, uint64_t len, uint64_t off);
    /* Protocol drivers: see bdev_file_reserve; optional (nothing reserved). */
    int  (*reserve)(struct bdev *bs, uint64_t off, uint64_t len);
    /* Write many runs as one request (see bdev_pwrite_batch); optional: the
     * core falls back to one pwrite per run. */
    int  (*pwrite_batch)(struct bdev *bs, const struct bdev_wvec *v, size_t n,
                         bdev_fill_fn fill, void *opaque);
    int  (*flush)(struct bdev *bs);
    int64_t (*getlength)(struct bdev *bs);
    int  (*truncate)(struct bdev *bs, uint64_t size);
    /* First extent of [off, off+len) (len > 0); ext->length <= len. */
    int  (*block_status)(struct bdev *bs, uint64_t off, uint64_t len,
                         struct pms_extent *ext);
    /* Format information; optional. */
    int  (*info)(struct bdev *bs, struct pms_info *info);
    /* See bdev_write_unit; optional (1).  Reads fields fixed until the node's
     * state is swapped (bdev_swap_state); no lock taken. */
    uint64_t (*write_unit)(struct bdev *bs);
    /* Guest offset where the VM state area begins (QEMU's vm state offset:
     * past the last L2 table's coverage of the disk); reads and writes at
     * it and beyond go through pread/pwrite.  Optional (ENOTSUP). */
    uint64_t (*vmstate_offset)(struct bdev *bs);
    int  (*check)(struct bdev *bs, unsigned flags, struct pms_check_result *res,
                  pms_check_msg_fn fn, void *opaque);
    /* Internal snapshots; optional (ENOTSUP). */
    int  (*snapshot_create)(struct bdev *bs, const char *name);
    int  (*snapshot_goto)(struct bdev *bs, const char *name);
    int  (*snapshot_delete)(struct bdev *bs, const char *name);
    int  (*snapshot_list)(struct bdev *bs, struct pms_snapshot_info **list, size_t *n);
    /* Report (fn) every guest range whose content may differ between the
     * current state and snapshot `name` (over-reporting allowed, never
     * under); optional: without it a caller assumes everything differs. */
    int  (*snapshot_changed)(struct bdev *bs, const char *name, bdev_range_fn fn, void *opaque);
    /* Background metadata write-back (bdev_checkpoint), both optional,
     * bs->lock held.  begin writes what needs no flush first and returns
     * a token; end is called after bs->file was flushed up to write count
     * gen, and writes only what that flush made safe to write. */
    int  (*checkpoint_begin)(struct bdev *bs, uint64_t *token);
    int  (*checkpoint_end)(struct bdev *bs, uint64_t gen, uint64_t token);
};

struct bdev {
    const struct pms_driver *drv;
    void *opaque;                /* driver state (drv->state_size bytes) */
    char *filename;
    bool readonly;
    bool check_only;             /* opened for pms_check: every write is refused
                                    except the check's own repairs */
    int cache_mode;              /* enum pms_cache_mode */
    struct bdev *file;           /* protocol child of a format node, or NULL */
    struct bdev *backing;        /* backing image, or NULL */
    pthread_mutex_t lock;        /* see header comment */
    /* Serialises external-snapshot operations on a top node (create from
     * prepare to commit or abort, revert, delete; lib/block/extsnap.c),
     * which may run long stretches without `lock`.  Recursive: a caller
     * may hold it around an operation (bdev_extsnap_lock).  Taken before
     * `lock`, never while holding it.  Not moved by bdev_swap_state. */
    pthread_mutex_t snap_lock;
    uint64_t size;               /* cached virtual size */
    bool eager_writeout;         /* protocol node: start the write-out of large writes
                                    at once (set by the memory device, whose writeback
                                    is always followed by a flush; see file.c) */
    /* Protocol node, atomics: wgen counts completed writes (data, zeroes,
     * discards, truncates; bumped after each returns), fgen the highest
     * wgen a completed flush covered (read before that flush began).
     * wgen > fgen: something may not be durable.  A flush may run without
     * the owner's lock beside writes (bdev_checkpoint): a write still in
     * flight when it reads wgen is simply not counted as covered. */
    uint64_t wgen, fgen;
    /* Protocol node: errno of a failed flush, sticky (atomic).  After a
     * failed fdatasync the kernel may have dropped the dirty pages it could
     * not write and reports the error once, to whichever flush saw it (a
     * background one, say), so every later flush fails with it too, as
     * QEMU's file driver does once its page cache is inconsistent. */
    int flush_err;
    /* Format node with a backing node: which layer below first has any
     * entry for each cluster (see qcow2.c read_backing), built lazily under
     * lock; valid while backing is unchanged (layers are read-only), so it
     * is dropped whenever bs->backing changes (bdev_set_backing). */
    void *chain_map;
    void (*chain_map_free)(void *);
};

/* Drivers known to the core. */
extern const struct pms_driver pms_drv_file;    /* protocol: posix file */
extern const struct pms_driver pms_drv_faulty;  /* protocol: fault injection over file */
extern const struct pms_driver pms_drv_raw;     /* format: raw pass-through */
extern const struct pms_driver pms_drv_qcow2;   /* format: qcow2 */

/* Memory the block layer holds for metadata, process-wide: qcow2 table
 * caches, chain maps, merge buffers (charged when allocated or first used,
 * uncharged when freed).  A memory cap counts it beside resident pages
 * (lib/mem/mem.c used_pages), since it grows with the image and the number
 * of layers, not with what is mapped.  Atomic; any thread. */
void     bdev_meta_charge(int64_t bytes);
uint64_t bdev_meta_bytes(void);

/* Open a whole graph: protocol node, format node (probed unless o->format),
 * backing chain.  On error returns -errno with pms_err set. */
int  bdev_open(const char *path, const struct pms_open_opts *o, struct bdev **bsp);
/* Open only a protocol node (file, or faulty when o->fault_spec). */
/* 0, or -EBUSY when another process holds QEMU-style locks on the file at
 * path that creating an image there would violate. */
int  bdev_file_busy(const char *path);
/* Preallocate [off, off+len) of an open file as qemu-img's preallocation
 * mode (enum pms_prealloc): FALLOC reserves it (fallocate), FULL writes
 * zeroes; the file grows to at least off+len in every mode. */
int  bdev_fd_prealloc(int fd, const char *path, uint64_t off, uint64_t len, int mode);
/* pwrite all of buf at off: 0, or -errno (a short write that cannot go on
 * is -ENOSPC).  No message: the caller names the file and the step. */
int  bdev_fd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
int  bdev_open_protocol(const char *path, const struct pms_open_opts *o, bool readonly,
                        struct bdev **bsp);
void bdev_close(struct bdev *bs);
/* Close bs from a background thread.  For a node nobody needs any more whose
 * file was just replaced (a revert's discarded live image): the kernel frees
 * an unlinked file's blocks and page cache at its last close, which took
 * seconds on a loaded machine, and no caller must wait for that.  The
 * graph's image locks are dropped at once (its files may be opened for
 * writing next).  bdev_close_wait() waits for every such close (pms_close
 * calls it). */
void bdev_close_later(struct bdev *bs);
/* The same for a plain descriptor (one held to a removed file). */
void bdev_fd_close_later(int fd);
void bdev_close_wait(void);

/* Graph surgery for external snapshots (lib/block/extsnap.c); the caller
 * holds the locks of the nodes involved or owns them exclusively. */
/* Exchange everything but the mutex between a and b (driver and its state,
 * children, file name, flags, size): the node a stays where it is (pointers
 * to it stay valid, its lock too) and holds what b held. */
void bdev_swap_state(struct bdev *a, struct bdev *b);
/* Replace bs->backing by b (NULL: none) without closing the old one. */
void bdev_set_backing(struct bdev *bs, struct bdev *b);
/* Detach and return bs->backing. */
struct bdev *bdev_take_backing(struct bdev *bs);
/* Give up the image locks of a protocol node (file), keeping it open: for a
 * read-only node whose file an external-snapshot merge opens for writing
 * (which takes the locks itself); no-op for other drivers. */
void bdev_file_unlock(struct bdev *file);

/* A new descriptor of a protocol node's (file's) open file description, for
 * work that must not hold any node lock; -ENOTSUP for other drivers (the
 * fault-injecting one keeps unflushed writes to itself). */
int  bdev_file_dup(struct bdev *file);
/* Start the write-out of every dirty page-cache page of top node bs's data
 * file (sync_file_range WRITE, no wait for completion), so that the next
 * flush only waits for what is in flight.  It blocks while the device's
 * queue is full: call it with no lock held.  Skipped (0) while an
 * external-snapshot operation holds bs's file (snap_lock busy), and for
 * protocol drivers other than file.  Any thread. */
int  bdev_writeout_start(struct bdev *bs);
/* Background metadata write-back of top node bs (any thread, no lock
 * held): the driver writes what it can with no wait under bs->lock
 * (qcow2: refcount blocks), the file is flushed with no node lock held,
 * then the driver writes the metadata whose dependencies that flush made
 * durable (qcow2: dirty L2 slices whose data and refcounts it covered), as
 * plain page-cache writes.  Nothing becomes visible in the image's durable
 * state that a crash could not already have shown; it only leaves less
 * for the next flush (a snapshot's, a persist's) to write and wait for.
 * Skipped (0) while an external-snapshot operation holds bs's file
 * (snap_lock busy), and for drivers without the two hooks.  Holds
 * snap_lock across the flush: a snapshot prepared meanwhile waits for it,
 * and then finds that much less to flush. */
int  bdev_checkpoint(struct bdev *bs);
/* bdev_file_flush, and *gen = the write count it covered (every write
 * that had returned before the call is durable when it returns 0). */
int  bdev_file_flush_gen(struct bdev *file, uint64_t *gen);
/* The protocol node's completed-write count (see struct bdev.wgen). */
static inline uint64_t bdev_file_wgen(const struct bdev *file)
{
    return __atomic_load_n(&file->wgen, __ATOMIC_ACQUIRE);
}

/* Checked, locked entry points (top level or child). */
int  bdev_pread(struct bdev *bs, void *buf, uint64_t len, uint64_t off);
int  bdev_pwrite(struct bdev *bs, const void *buf, uint64_t len, uint64_t off);
/* Write n runs, sorted by offset and not overlapping, as one request: a
 * format driver allocates their new clusters together, writes them with few
 * large writes and updates its metadata once.  fill may be NULL.  On an
 * error some runs may have been written, none half-committed in metadata. */
int  bdev_pwrite_batch(struct bdev *bs, const struct bdev_wvec *v, size_t n,
                       bdev_fill_fn fill, void *opaque);
/* The unit a write into an unallocated or shared range writes whole (qcow2:
 * a cluster; a subcluster with extended L2), as a cost estimate of a batch:
 * a 4 KiB run that copies a 64 KiB cluster on write costs 64 KiB of I/O.
 * 1 for drivers that write in place. */
uint64_t bdev_write_unit(struct bdev *bs);
int  bdev_pwrite_zeroes(struct bdev *bs, uint64_t len, uint64_t off, unsigned flags);
/* Compressed write (qcow2 only): off cluster aligned, len a multiple of the
 * cluster size or ending at the end of the image. */
int  bdev_pwrite_compressed(struct bdev *bs, const void *buf, uint64_t len, uint64_t off);
/* The VM state area (qemu-io read/write -b): bytes [pos, pos+len) of it. */
int  bdev_vmstate_rw(struct bdev *bs, void *buf, uint64_t len, uint64_t pos, bool write);
int  bdev_discard(struct bdev *bs, uint64_t len, uint64_t off);
int  bdev_flush(struct bdev *bs);
int64_t bdev_getlength(struct bdev *bs);
int  bdev_truncate(struct bdev *bs, uint64_t size);
int  bdev_block_status(struct bdev *bs, uint64_t off, uint64_t len, struct pms_extent *ext);
/* Every extent of [off, off+len), in order, under one hold of the node's
 * lock (a scan that takes the lock per extent queues behind every other
 * request once per extent).  fn runs with the lock held: it must not call
 * into this node.  A negative return from fn stops the walk and is
 * returned. */
typedef int (*bdev_extent_fn)(void *opaque, const struct pms_extent *e);
int  bdev_block_status_walk(struct bdev *bs, uint64_t off, uint64_t len, bdev_extent_fn fn,
                            void *opaque);

/* Unchecked-lock variants for protocol children: the child is stateless, so
 * the parent calls these with its own lock held.  Writes past the end of a
 * protocol node extend it. */
/* Bytes from off (at most len) that the protocol file is known to read as
 * zeroes without reading them (a hole); 0 when not known. */
uint64_t bdev_file_zero_prefix(struct bdev *file, uint64_t off, uint64_t len);
/* Bytes from off (1..len; 0 when len is 0) that are all a hole (*hole) or
 * all data of the protocol file; what lies past the file's end is a hole,
 * and a range the driver cannot tell about is data. */
uint64_t bdev_file_extent(struct bdev *file, uint64_t off, uint64_t len, bool *hole);
int  bdev_file_pread(struct bdev *file, void *buf, uint64_t len, uint64_t off);
int  bdev_file_pwrite(struct bdev *file, const void *buf, uint64_t len, uint64_t off);
int  bdev_file_flush(struct bdev *file);
int64_t bdev_file_length(struct bdev *file);
int  bdev_file_truncate(struct bdev *file, uint64_t size);
int  bdev_file_discard(struct bdev *file, uint64_t len, uint64_t off);
int  bdev_file_zero(struct bdev *file, uint64_t len, uint64_t off);
/* Give [off, off+len) storage in the file (extending the file if it ends
 * before), keeping its bytes, so that writes there later cannot fail for
 * want of space: a metadata table the cache writes after the data write
 * that needed it was acknowledged (QEMU writes a new L2 table at once for
 * the same reason).  0 where the file system cannot reserve (best effort);
 * -ENOSPC, -EFBIG, ... when it can and there is no room. */
int  bdev_file_reserve(struct bdev *file, uint64_t off, uint64_t len);

/* Probe the format of an open protocol node: "qcow2" or "raw". */
const char *bdev_probe(struct bdev *file);

#endif
