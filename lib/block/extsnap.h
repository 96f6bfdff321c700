/* External snapshots of a qcow2 image: read-only layer files beside the
 * live image, the live image an extended-L2 overlay on the newest one.
 * The design, the file naming and the crash rule are in extsnap.c's header
 * comment and docs/snapshots.md.
 *
 * Contract shared by every function here:
 *  - bs is the top node of an open graph (what pms_dev->bs holds), a qcow2
 *    format node over a regular file, opened writable;
 *  - the caller holds no lock: each function takes bs->lock itself for the
 *    whole operation, so other threads' bdev_*() calls on bs wait;
 *  - the node bs is switched in place: after create/revert/delete return
 *    (success or failure) bs is still the live top node, pointers to it
 *    held elsewhere stay valid, bs->lock is the same mutex, and the nodes
 *    below it (bs->backing ...) may have been replaced: never keep pointers
 *    to backing nodes across these calls;
 *  - on error a message is set (pms_err) and -errno is returned; the files
 *    are then in the old state (create, revert) or in a state where every
 *    snapshot still holds its content (delete: it can be retried).
 */
#ifndef PMS_EXTSNAP_H
#define PMS_EXTSNAP_H

#include <stdint.h>
#include <stddef.h>
#include "block.h"

/* Progress of a long merge: done out of total bytes (total may grow). */
typedef void (*bdev_progress_fn)(void *opaque, uint64_t done, uint64_t total);

/* Longest snapshot name, in bytes: the layer file name "<image>@<name>" must
 * also fit in NAME_MAX (255), which is checked against the image's name. */
#define BDEV_EXTSNAP_NAME_MAX 200

/* 0 if name can name an external snapshot of the image at live_path, else
 * -EINVAL with a message saying why. */
int  bdev_extsnap_check_name(const char *live_path, const char *name);

/* Path of the layer file of snapshot name: "<dir>/<image>@<name>".  buf
 * gets it (cap bytes); -ENAMETOOLONG if it does not fit. */
int  bdev_extsnap_layer_path(const char *live_path, const char *name, char *buf, size_t cap);

/* 1 if an external snapshot called name exists (its layer file is there),
 * 0 if not, -errno on error.  Takes no lock (a directory lookup). */
int  bdev_extsnap_exists(struct bdev *bs, const char *name);

/* Take external snapshot name: the current state (flushed) becomes the
 * layer file, the live path a new empty overlay on it, bs that overlay with
 * the layer as its backing node (opened read-only).  EEXIST if a snapshot
 * of either kind has that name. */
int  bdev_extsnap_create(struct bdev *bs, const char *name);

/* The same in two steps, so that a caller with a pause to keep short (the
 * memory device's cut) does the slow part first.  prepare: checks, the new
 * overlay created (fsynced) and opened at the temporary name; nothing
 * visible changes.  commit: flush bs, link the layer, rename the overlay
 * over the live path, switch bs (cost: the flush, two directory fsyncs, one
 * read-only open).  commit and abort free x.  prepare takes bs->snap_lock
 * and commit or abort (called by the same thread) releases it, so other
 * external-snapshot operations on bs wait in between.  All take bs->lock
 * for their own steps; the caller holds none. */
struct bdev_extsnap_prep;
int  bdev_extsnap_prepare(struct bdev *bs, const char *name, struct bdev_extsnap_prep **x);
int  bdev_extsnap_commit(struct bdev_extsnap_prep *x);
void bdev_extsnap_abort(struct bdev_extsnap_prep *x);

/* Hold off every other external-snapshot operation on bs (bs->snap_lock,
 * recursive) around a caller's own sequence, e.g. the memory device's
 * revert, whose wb_mu must come after it: prepare holds snap_lock while its
 * caller takes wb_mu. */
void bdev_extsnap_lock(struct bdev *bs);
void bdev_extsnap_unlock(struct bdev *bs);

/* Revert to external snapshot name: the live image becomes a new empty
 * overlay on name's layer; the live data since is discarded; every layer
 * is left as it is.  ENOENT if there is no such snapshot. */
int  bdev_extsnap_revert(struct bdev *bs, const char *name);

/* A delete of external snapshot name was interrupted after its marker (the
 * snapshot is gone for list/revert, its merge not finished)?  Finishing it
 * (as the next writable open would; not on a read-only node): 1 done, 0
 * none pending, or -errno. */
bool bdev_extsnap_delete_pending(struct bdev *bs, const char *name);
int  bdev_extsnap_finish_delete(struct bdev *bs, const char *name);

/* Delete external snapshot name: its data is copied into every image whose
 * backing file it is (the live image and/or other layers) where they do not
 * have their own, their backing file becomes name's backing file, then the
 * layer file is removed.  fn (may be NULL) is called as the merge goes.
 * The merges run without bs->lock, except streaming into the live image,
 * which takes it section by section: bs's other users (writeback, faults)
 * go on meanwhile. */
int  bdev_extsnap_delete(struct bdev *bs, const char *name, bdev_progress_fn fn, void *opaque);

/* The external snapshots of the image (kind PMS_SNAP_KIND_EXTERNAL, file
 * set), oldest first, appended to *list / *n (which may hold internal
 * snapshots already; the array is realloc'd).  Free with
 * pms_snapshot_list_free. */
int  bdev_extsnap_list(struct bdev *bs, struct pms_snapshot_info **list, size_t *n);

/* Remove what an interrupted create left (see extsnap.c): the temporary
 * overlay, a layer file that is still the live image's inode.  Called by
 * bdev_open on every writable qcow2 open and by create.  Caller holds
 * bs->lock or owns bs exclusively. */
int  bdev_extsnap_recover(struct bdev *bs);

#endif
