/* The public handle and the hooks between the API layer (lib/pmemsnap.c)
 * and the memory device (lib/mem/).
 *
 * Threads: any thread may call the API.  dev->bs is the block graph (its own
 * locking, see block/block.h).  dev->lock is a reader-writer lock guarding
 * dev->mem's lifetime: pms_map, pms_unmap and pms_close take it for writing
 * (they set, free and clear dev->mem); every other call holds it for reading
 * for its whole duration, so a mapping cannot be freed under a call that
 * routes to it, and a call that reaches the image directly cannot race a
 * pms_map that is reading it.  The memory device documents its own threads.
 * pms_close must be the last call on a handle (as close(2)).
 * While mapped, every block-level API call on the device is routed through
 * the memory device so that loads/stores and pms_pread/pms_pwrite agree.
 */
#ifndef PMS_DEV_H
#define PMS_DEV_H

#include <pthread.h>
#include "pmemsnap.h"
#include "block/block.h"

struct pms_mem;

struct pms_dev {
    struct bdev *bs;
    struct pms_mem *mem;          /* non-NULL while mapped */
    pthread_rwlock_t lock;        /* guards mem's lifetime, see above */
    bool eager_writeout;          /* pms_open_opts.eager_writeout (set once at open) */
};

/* Implemented in lib/mem/.  All return 0 or -errno with pms_err set. */
int  pms_mem_map(pms_dev *dev, const struct pms_map_opts *o, struct pms_mem **memp,
                 void **addrp, size_t *lenp);
int  pms_mem_unmap(struct pms_mem *m, bool force); /* persists everything, frees m; if the
                                                  persist fails and !force, m stays mapped */
int  pms_mem_persist(struct pms_mem *m, const void *addr, size_t len);
int  pms_mem_pread(struct pms_mem *m, void *buf, size_t len, uint64_t off);
int  pms_mem_pwrite(struct pms_mem *m, const void *buf, size_t len, uint64_t off);
int  pms_mem_write_zeroes(struct pms_mem *m, size_t len, uint64_t off);
int  pms_mem_discard(struct pms_mem *m, size_t len, uint64_t off);
int  pms_mem_flush(struct pms_mem *m);
int  pms_mem_snapshot_create(struct pms_mem *m, const char *name, unsigned flags);
int  pms_mem_snapshot_revert(struct pms_mem *m, const char *name);
int  pms_mem_stats(struct pms_mem *m, struct pms_stats *st);

#endif
