/* External snapshots: a chain (a tree, after reverts) of qcow2 layer files.
 *
 * Files, for a live image at DIR/IMG:
 *   DIR/IMG              the live image.  After the first external snapshot
 *                        it is a qcow2 overlay (version 3, 64 KiB clusters,
 *                        extended L2: 2 KiB subclusters) whose backing file
 *                        is the layer of the snapshot it was created on or
 *                        reverted to.
 *   DIR/IMG@NAME         the layer of snapshot NAME: the image as it was at
 *                        the snapshot instant (the live image's former inode,
 *                        renamed by a hard link, never copied).  Read-only
 *                        from then on, except that deleting its parent
 *                        snapshot streams the parent's data into it (its
 *                        content does not change).  Its backing file, a
 *                        name relative to DIR, is the previous layer.
 *   DIR/.IMG.extsnap-tmp a new overlay being prepared (a leftover after a
 *                        crash; removed by the next writable open).
 *   DIR/.IMG@NAME.deleting  snapshot NAME is being deleted by commit (see
 *                        below); the next writable open finishes it.
 * The external snapshots of DIR/IMG are the regular files DIR/IMG@* (a
 * directory scan), whatever their place in the tree.  A name must be a
 * possible file name part: not empty, no '/', not "." or "..", at most
 * BDEV_EXTSNAP_NAME_MAX bytes and short enough for .IMG@NAME.deleting to fit in
 * NAME_MAX.  Names are unique across both kinds (an internal snapshot of the
 * live image and an external one never share a name).
 *
 * Crash rule (kill -9 or power loss at any instant): the live path always
 * names a complete image holding the old or the new state; a layer file is
 * never written except by a content-preserving merge; every file is
 * complete (fsynced) before a directory entry makes it reachable:
 *   create:  flush the live image; create the overlay at the temporary name
 *            (fsynced); link(IMG, IMG@NAME); fsync(DIR); rename(tmp, IMG);
 *            fsync(DIR).  Before the rename the live path is the old image;
 *            a crash between link and rename leaves IMG@NAME as a second name
 *            of the live inode, which the next open removes (same inode as
 *            IMG: the snapshot was not taken).  After it, IMG is the overlay
 *            and IMG@NAME the complete layer it reads through.
 *   revert:  create the overlay on IMG@NAME at the temporary name (fsynced);
 *            rename(tmp, IMG); fsync(DIR).  The old live image is dropped by
 *            the rename, in one step.
 *   delete:  for each image C whose backing file is IMG@NAME (other layers,
 *            the live image): copy every range C does not allocate itself
 *            but IMG@NAME does (data or zero flags, at C's subcluster
 *            granularity: a partial cluster is completed from C's own
 *            backing chain, i.e. with the same bytes) into C, flush, then
 *            point C's header at IMG@NAME's backing file (one header write,
 *            flushed).  C reads the same bytes before, during and after.
 *            Then unlink(IMG@NAME); fsync(DIR).  A crash leaves the
 *            snapshot in place (and intact) with some children already
 *            independent of it; deleting it again finishes the job.
 *            Refused (before anything is written) while IMG@NAME or an
 *            image C holds internal snapshots: the stream completes only
 *            C's active state, so C's internal snapshots would read through
 *            to IMG@NAME's backing afterwards, and IMG@NAME's own would go
 *            with its file.
 *   delete by commit (IMG@NAME has one child, a layer C, smaller on disk
 *            than IMG@NAME: the oldest snapshot of a chain): write the
 *            marker DIR/.IMG@NAME.deleting (C's file name; fsynced, then
 *            fsync(DIR)); copy C's own allocations into IMG@NAME, flush;
 *            rename(IMG@NAME, C); fsync(DIR); unlink the marker; fsync(DIR).
 *            C reads the same throughout (only ranges C has itself are
 *            written below it); IMG@NAME's own content is destroyed, so once
 *            the marker exists the snapshot is gone for list/revert/delete,
 *            and the next writable open (or create/revert/delete) repeats the
 *            copy (idempotent) and the rename.
 * The qcow2 writes themselves keep the driver's rule (a crash may leak
 * clusters, never corrupt), so every layer stays `qemu-img check`-clean
 * apart from leaks.
 *
 * The node switch: pms_dev and the memory device hold the top struct bdev,
 * so the top node is switched in place (bdev_swap_state: driver state,
 * children and file name move, the mutex stays).  Everything a switch needs
 * (the new overlay node, the layer node) is opened before the commit point
 * (the rename), so after it nothing can fail but the directory fsync.
 * Layer nodes are opened read-only (QEMU readers can share them).
 *
 * Threads: any thread.  bs->snap_lock (recursive) serialises the
 * operations on one live image: create (prepare to commit/abort), revert,
 * delete.  bs->lock guards bs and its open chain (the chain's structure,
 * the nodes in it): create and revert hold it for their whole switch;
 * delete holds it only to look (survey), to stream into the live image
 * (section by section) and to swap in the new chain at the end, so writeback
 * and faults of a mapped image go on while layers merge.
 *
 * Merging beside the live chain: a delete writes layer files that our own
 * read-only nodes in the live chain keep reading (the commit target, the
 * layer children being streamed into), through separate writable nodes.
 * That is safe because (1) only ranges the reading node never reads are
 * written: a commit writes into the snapshot's file only what its child
 * allocates, which every reader above finds in the child first; a stream
 * writes into a child only ranges the child does not allocate, with the
 * bytes the reader there already gets from below; (2) the writer releases
 * no cluster until it closes (qcow2_hold_frees), so no cluster a reader's
 * cached table points at is reused for other data; (3) a reader's stale
 * cached L1/L2 entries are stale only for the written ranges, which it
 * never consults (and the chain maps of the nodes above answer them with
 * a layer above).  The read-only node hands its image locks to the writer
 * (bdev_file_unlock), so QEMU writers stay refused throughout.  When the
 * merge is done, restore_chain opens the chain the headers now name and
 * swaps it in under bs->lock.
 *
 * Nodes opened here for a moment (children being merged) are private to
 * the call.  Lock order: snap_lock, bs->lock, then the locks of nodes below
 * or opened here.
 */
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "extsnap.h"
#include "drivers/qcow2.h"
#include "../util/buf.h"
#include "../util/error.h"

#define TMP_SUFFIX ".extsnap-tmp"
/* The new overlay: what the issue asks for (page-granular copy-on-write). */
#define OVERLAY_CLUSTER_SIZE 65536
/* Bytes copied per request while merging: large enough to stream, small
 * enough that progress and other users of the node are not starved. */
#define MERGE_CHUNK (1u << 20)
/* Bytes gathered into one batched write while merging (bdev_pwrite_batch):
 * a merge of random 4 KiB pages then allocates and writes its clusters
 * together and updates metadata once per batch instead of once per page. */
#define MERGE_BATCH_BYTES (8u << 20)
/* Granule of the zero-page test while streaming (skip_zero_pages). */
#define MERGE_PAGE 4096u
/* Runs per batched write: 8 MiB of single pages. */
#define MERGE_BATCH_RUNS (MERGE_BATCH_BYTES / MERGE_PAGE)
/* Extents looked at per hold of a node's lock while streaming into it
 * (stream_section): with a batch of at most MERGE_BATCH_BYTES, what a fault
 * or writeback of the live image waits behind is bounded (1,024 lookups
 * take about a millisecond). */
#define STREAM_SECTION_EXTENTS 1024u
/* L2 cache of the nodes opened here for a moment (bytes): a merge walks and
 * writes the tables in guest order, so a few tables at a time suffice, and
 * the default (enough for the whole image, up to 32 MiB per node) would add
 * to the memory a mapped image under a cap is held to. */
#define MERGE_L2_CACHE (8u << 20)

/* Test hook: PMS_EXTSNAP_KILL_AT=<point> kills the process (SIGKILL) when it
 * gets there, so tests/extsnap/extsnap-kill.sh reaches every step of the
 * crash rule above deterministically (random kills cover the rest). */
static void kill_point(const char *point)
{
    const char *e = getenv("PMS_EXTSNAP_KILL_AT");
    if (e && !strcmp(e, point))
        raise(SIGKILL);
}

/* ---- names and paths ------------------------------------------------------ */

struct paths {
    char dir[PATH_MAX];          /* "." when the live path has no '/' */
    char base[NAME_MAX + 1];     /* file name of the live image */
    char live[PATH_MAX];
    char tmp[PATH_MAX];
};

static int split(const char *live, struct paths *p)
{
    const char *sl = strrchr(live, '/');
    const char *b = sl ? sl + 1 : live;
    if (!*b || strlen(b) > NAME_MAX)
        return pms_err(EINVAL, "'%s' is not a usable image file name", live);
    if (sl == live)
        snprintf(p->dir, sizeof p->dir, "/");
    else if (sl)
        snprintf(p->dir, sizeof p->dir, "%.*s", (int)(sl - live), live);
    else
        snprintf(p->dir, sizeof p->dir, ".");
    snprintf(p->base, sizeof p->base, "%s", b);
    if (snprintf(p->live, sizeof p->live, "%s", live) >= (int)sizeof p->live ||
        snprintf(p->tmp, sizeof p->tmp, "%s/.%s" TMP_SUFFIX, p->dir, p->base) >= (int)sizeof p->tmp)
        return pms_err(ENAMETOOLONG, "path '%s' is too long", live);
    return 0;
}

int bdev_extsnap_check_name(const char *live_path, const char *name)
{
    if (!name || !*name)
        return pms_err(EINVAL, "snapshot name is empty");
    if (strchr(name, '/'))
        return pms_err(EINVAL, "external snapshot name '%s' contains '/' (it becomes part of "
                       "a file name)", name);
    if (!strcmp(name, ".") || !strcmp(name, ".."))
        return pms_err(EINVAL, "external snapshot name '%s' is not allowed", name);
    size_t nl = strlen(name);
    if (nl > BDEV_EXTSNAP_NAME_MAX)
        return pms_err(EINVAL, "external snapshot name is %zu bytes long (at most %d)", nl,
                       BDEV_EXTSNAP_NAME_MAX);
    const char *sl = strrchr(live_path, '/');
    size_t bl = strlen(sl ? sl + 1 : live_path);
    /* the longest name made of it: the delete marker .IMG@NAME.deleting */
    if (1 + bl + 1 + nl + strlen(".deleting") > NAME_MAX)
        return pms_err(EINVAL, "external snapshot name '%s' is too long for image '%s' "
                       "(the file names made of it would exceed %d bytes)", name, live_path,
                       NAME_MAX);
    return 0;
}

int bdev_extsnap_layer_path(const char *live_path, const char *name, char *buf, size_t cap)
{
    struct paths p;
    int r = split(live_path, &p);
    if (r < 0) return r;
    /* as the caller spelt the image's path: "img@A" for "img" */
    if (snprintf(buf, cap, "%.*s%s@%s", (int)(strlen(live_path) - strlen(p.base)), live_path,
                 p.base, name) >= (int)cap)
        return pms_err(ENAMETOOLONG, "layer path for snapshot '%s' is too long", name);
    return 0;
}

static int fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return pms_err(errno, "could not open directory '%s': %s", dir, strerror(errno));
    int r = fsync(fd) < 0 ? pms_err(errno, "fsync of directory '%s' failed: %s", dir,
                                    strerror(errno)) : 0;
    close(fd);
    return r;
}

/* Marker of a delete-by-commit in progress (see delete below). */
static int marker_path(const struct paths *p, const char *name, char *buf, size_t cap)
{
    return snprintf(buf, cap, "%s/.%s@%s.deleting", p->dir, p->base, name) >= (int)cap
           ? pms_err(ENAMETOOLONG, "marker path too long") : 0;
}

static bool marked(const struct paths *p, const char *name)
{
    char mk[PATH_MAX];
    struct stat st;
    return marker_path(p, name, mk, sizeof mk) == 0 && lstat(mk, &st) == 0;
}

/* ---- checks ------------------------------------------------------------------ */

static int eligible(struct bdev *bs, const char *what)
{
    if (bs->drv != &pms_drv_qcow2)
        return pms_err(ENOTSUP, "external snapshots need a qcow2 image ('%s' is %s)",
                       bs->filename, bs->drv->name);
    if (bs->readonly)
        return pms_err(EROFS, "image '%s' is opened read-only", bs->filename);
    if (bs->check_only)
        return pms_err(EPERM, "image '%s' is opened for checking only", bs->filename);
    struct stat st;
    if (lstat(bs->filename, &st) < 0)
        return pms_err(errno, "cannot %s: '%s': %s", what, bs->filename, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return pms_err(ENOTSUP, "cannot %s: '%s' is not a regular file (a symbolic link or a "
                       "device: open the file itself)", what, bs->filename);
    return 0;
}

/* 1 if the live image holds an internal snapshot called name. */
static int internal_exists(struct bdev *bs, const char *name)
{
    struct pms_snapshot_info *l = NULL;
    size_t n = 0;
    int r = bs->drv->snapshot_list ? bs->drv->snapshot_list(bs, &l, &n) : 0;
    if (r < 0) return r;
    int found = 0;
    for (size_t i = 0; i < n; i++)
        if (l[i].name && !strcmp(l[i].name, name))
            found = 1;
    pms_snapshot_list_free(l, n);
    return found;
}

int bdev_extsnap_exists(struct bdev *bs, const char *name)
{
    if (!name || !*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
        return 0;
    char path[PATH_MAX];
    if (bdev_extsnap_layer_path(bs->filename, name, path, sizeof path) < 0)
        return 0;
    struct stat st;
    if (lstat(path, &st) < 0)
        return errno == ENOENT || errno == ENAMETOOLONG ? 0
               : pms_err(errno, "cannot look for '%s': %s", path, strerror(errno));
    struct paths p;
    if (S_ISREG(st.st_mode) && split(bs->filename, &p) == 0 && marked(&p, name))
        return 0;                      /* being deleted */
    struct stat live;
    if (S_ISREG(st.st_mode) && stat(bs->filename, &live) == 0 && live.st_dev == st.st_dev &&
        live.st_ino == st.st_ino)
        return 0;                      /* a create that never got to its rename */
    return S_ISREG(st.st_mode);
}

/* ---- node helpers ------------------------------------------------------------ */

static int open_node(const char *path, bool ro, bool no_backing, int cache_mode,
                     struct bdev **out)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = ro;
    o.no_backing = no_backing;
    o.cache_mode = cache_mode;
    o.format = "qcow2";
    if (ro)                            /* a layer of the live chain */
        o.l2_cache_size = QCOW2_BACKING_L2_CACHE;
    return bdev_open(path, &o, out);
}

/* A read-only node of path without its chain, for a merge to read (or a
 * header to look at): small L2 cache (MERGE_L2_CACHE). */
static int open_merge_source(const char *path, int cache_mode, struct bdev **out)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = 1;
    o.no_backing = 1;
    o.cache_mode = cache_mode;
    o.format = "qcow2";
    o.l2_cache_size = MERGE_L2_CACHE;
    return bdev_open(path, &o, out);
}

static int create_overlay(const char *path, uint64_t size, const char *backing)
{
    struct pms_create_opts co;
    pms_create_opts_init(&co);
    co.format = "qcow2";
    co.cluster_size = OVERLAY_CLUSTER_SIZE;
    co.extended_l2 = 1;
    co.backing_file = backing;
    co.backing_format = "qcow2";
    co.backing_unchecked = 1;          /* the caller opened (or is) the layer */
    unlink(path);                      /* a leftover of an earlier crash */
    return qcow2_create(path, size, &co);
}

/* The live node's backing file, resolved against its directory (as the
 * qcow2 driver does), or "" when it has none. */
static int backing_path(struct bdev *bs, const struct paths *p, char *buf, size_t cap,
                        const char **fmt)
{
    struct qcow2_state *s = QS(bs);
    *fmt = s->backing_format;
    if (!s->backing_file) {
        buf[0] = 0;
        return 0;
    }
    int n = s->backing_file[0] == '/' || !strchr(bs->filename, '/')
            ? snprintf(buf, cap, "%s", s->backing_file)
            : snprintf(buf, cap, "%s/%s", p->dir, s->backing_file);
    return n >= (int)cap ? pms_err(ENAMETOOLONG, "backing file name is too long") : 0;
}

/* Open the backing chain at path (format fmt, NULL: probe) read-only, as
 * a live image's backing node. */
static int open_chain(const char *path, const char *fmt, int cache_mode, struct bdev **b)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = 1;
    o.format = fmt;
    o.cache_mode = cache_mode;
    o.l2_cache_size = QCOW2_BACKING_L2_CACHE;
    int r = bdev_open(path, &o, b);
    if (r < 0)
        return pms_err(-r, "could not reopen backing file '%s': %s", path, pms_err_get());
    return 0;
}

/* Reopen bs's backing chain after it was closed (bs->lock held). */
static int reopen_chain(struct bdev *bs, const struct paths *p)
{
    char path[PATH_MAX];
    const char *fmt;
    int r = backing_path(bs, p, path, sizeof path, &fmt);
    if (r < 0 || !path[0]) return r;
    struct bdev *b;
    r = open_chain(path, fmt, bs->cache_mode, &b);
    if (r == 0) bdev_set_backing(bs, b);
    return r;
}

/* Move the freshly opened overlay nw into bs (whose old state nw then
 * holds, to be closed by the caller); bs keeps its file name. */
static void take_over(struct bdev *bs, struct bdev *nw)
{
    bdev_swap_state(bs, nw);
    char *t = bs->filename; bs->filename = nw->filename; nw->filename = t;
    if (bs->file && nw->file) {
        t = bs->file->filename; bs->file->filename = nw->file->filename; nw->file->filename = t;
        /* the write-out policy belongs to the live image, not to one file */
        __atomic_store_n(&bs->file->eager_writeout,
                         __atomic_load_n(&nw->file->eager_writeout, __ATOMIC_RELAXED),
                         __ATOMIC_RELAXED);
    }
}

/* ---- recovery ---------------------------------------------------------------- */

static int finish_commits(const struct paths *p, int cache_mode);
static int reopen_chain(struct bdev *bs, const struct paths *p);

/* Is there a marker of an interrupted delete-by-commit? */
static bool any_marker(const struct paths *p)
{
    DIR *d = opendir(p->dir);
    if (!d) return false;
    size_t bl = strlen(p->base);
    struct dirent *de;
    bool found = false;
    while (!found && (de = readdir(d))) {
        size_t nl = strlen(de->d_name);
        found = de->d_name[0] == '.' && !strncmp(de->d_name + 1, p->base, bl) &&
                de->d_name[1 + bl] == '@' && nl > 9 && !strcmp(de->d_name + nl - 9, ".deleting");
    }
    closedir(d);
    return found;
}

static int recover(struct bdev *bs, const struct paths *p);

/* recover() before an operation: one that cannot finish an interrupted
 * delete refuses the operation (a delete of the child named in a pending
 * marker let the next open drop the marker and bring the half-overwritten
 * snapshot back). */
static int recover_first(struct bdev *bs, const struct paths *p)
{
    int r = recover(bs, p);
    return r < 0 ? pms_err(-r, "an interrupted delete could not be finished first: %s",
                           pms_err_get()) : 0;
}

static int recover(struct bdev *bs, const struct paths *p)
{
    if (unlink(p->tmp) == 0)
        fsync_dir(p->dir);
    if (any_marker(p)) {
        /* finish interrupted deletes; our read-only nodes of the layers
         * would keep them from being opened for writing */
        bool had_chain = bs->backing != NULL;
        bdev_close(bdev_take_backing(bs));
        int r = finish_commits(p, bs->cache_mode);
        int r2 = had_chain ? reopen_chain(bs, p) : 0;
        if (r < 0 || r2 < 0) return r < 0 ? r : r2;
    }
    struct stat live;
    if (stat(p->live, &live) < 0)
        return 0;
    DIR *d = opendir(p->dir);
    if (!d) return 0;
    size_t bl = strlen(p->base);
    struct dirent *de;
    int removed = 0;
    while ((de = readdir(d))) {
        if (strncmp(de->d_name, p->base, bl) || de->d_name[bl] != '@')
            continue;
        char path[PATH_MAX];
        struct stat st;
        if (snprintf(path, sizeof path, "%s/%s", p->dir, de->d_name) >= (int)sizeof path ||
            lstat(path, &st) < 0)
            continue;
        /* a second name of the live inode: a create that never got to its
         * rename (the snapshot was not taken) */
        if (S_ISREG(st.st_mode) && st.st_dev == live.st_dev && st.st_ino == live.st_ino &&
            unlink(path) == 0)
            removed++;
    }
    closedir(d);
    if (removed)
        fsync_dir(p->dir);
    (void)bs;
    return 0;
}

int bdev_extsnap_recover(struct bdev *bs)
{
    struct paths p;
    if (bs->drv != &pms_drv_qcow2 || bs->readonly || bs->check_only || split(bs->filename, &p) < 0)
        return 0;
    return recover(bs, &p);
}

/* ---- create ------------------------------------------------------------------- */

/* Backing files below bs: its open chain, or (opened without it, as
 * snapshot -c is) its headers, followed up to one past the limit. */
static int chain_depth(struct bdev *bs, const struct paths *p)
{
    int n = 0;
    if (bs->backing) {
        for (struct bdev *y = bs->backing; y; y = y->backing) n++;
        return n;
    }
    char path[PATH_MAX];
    const char *fmt;
    if (backing_path(bs, p, path, sizeof path, &fmt) < 0 || !path[0])
        return 0;
    /* the files seen (the live image first): a chain that comes back to
     * one loops, and is reported as such, not as too deep */
    struct { dev_t dev; ino_t ino; } seen[QCOW2_MAX_CHAIN_DEPTH + 2];
    int nseen = 0;
    struct stat st;
    if (stat(p->live, &st) == 0)
        seen[nseen++] = (typeof(seen[0])){ st.st_dev, st.st_ino };
    while (path[0] && n <= QCOW2_MAX_CHAIN_DEPTH) {
        if (stat(path, &st) == 0) {
            for (int i = 0; i < nseen; i++)
                if (seen[i].dev == st.st_dev && seen[i].ino == st.st_ino)
                    return pms_err(ELOOP, "the backing chain of '%s' loops back to '%s'",
                                   p->live, path);
            seen[nseen++] = (typeof(seen[0])){ st.st_dev, st.st_ino };
        }
        n++;
        struct bdev *y;
        struct pms_open_opts o;
        pms_open_opts_init(&o);
        o.readonly = 1;
        o.no_backing = 1;
        o.force_share = 1;
        if (bdev_open(path, &o, &y) < 0) {
            pms_err_clear();
            break;
        }
        struct qcow2_state *ys = y->drv == &pms_drv_qcow2 ? QS(y) : NULL;
        char next[PATH_MAX] = "";
        if (ys && ys->backing_file) {
            const char *sl = strrchr(path, '/');
            if (ys->backing_file[0] == '/' || !sl)
                snprintf(next, sizeof next, "%s", ys->backing_file);
            else
                snprintf(next, sizeof next, "%.*s/%s", (int)(sl - path), path, ys->backing_file);
        }
        bdev_close(y);
        memcpy(path, next, sizeof path);
    }
    return n;
}

struct bdev_extsnap_prep {
    struct bdev *bs;
    struct paths p;
    char layer[PATH_MAX];
    char name[BDEV_EXTSNAP_NAME_MAX + 1];
    struct bdev *ov;                  /* the new overlay at the temporary name */
    uint64_t size;                    /* bs->size it was made for */
};

static int prepare_locked(struct bdev_extsnap_prep *x)
{
    struct bdev *bs = x->bs;
    const struct paths *p = &x->p;
    int r0 = recover_first(bs, p);
    if (r0 < 0)
        return r0;
    struct stat st;
    if (lstat(x->layer, &st) == 0)
        return pms_err(EEXIST, "snapshot '%s' already exists (layer file '%s')", x->name,
                       x->layer);
    if (errno != ENOENT)
        return pms_err(errno, "cannot look for '%s': %s", x->layer, strerror(errno));
    int r = internal_exists(bs, x->name);
    if (r < 0) return r;
    if (r > 0)
        return pms_err(EEXIST, "an internal snapshot called '%s' exists", x->name);
    char bname[PATH_MAX]; 
    int depth = chain_depth(bs, p);
    if (depth < 0)
        return depth;
    if (depth + 1 > QCOW2_MAX_CHAIN_DEPTH)
        return pms_err(EMLINK, "the image already reads through %d layers (at most %d can be "
                       "opened): delete old snapshots first", depth, QCOW2_MAX_CHAIN_DEPTH);            /* "IMG@NAME": checked to fit NAME_MAX */
    snprintf(bname, sizeof bname, "%s@%s", p->base, x->name);
    r = create_overlay(p->tmp, bs->size, bname);
    if (r < 0) return r;
    r = open_node(p->tmp, false, true, bs->cache_mode, &x->ov);
    if (r < 0) {
        unlink(p->tmp);
        return r;
    }
    x->size = bs->size;
    return 0;
}

int bdev_extsnap_prepare(struct bdev *bs, const char *name, struct bdev_extsnap_prep **xp)
{
    *xp = NULL;
    int r = eligible(bs, "create an external snapshot");
    if (r < 0) return r;
    r = bdev_extsnap_check_name(bs->filename, name);
    if (r < 0) return r;
    struct bdev_extsnap_prep *x = calloc(1, sizeof *x);
    if (!x) return pms_err(ENOMEM, "out of memory");
    x->bs = bs;
    snprintf(x->name, sizeof x->name, "%s", name);
    if ((r = split(bs->filename, &x->p)) < 0 ||
        (r = bdev_extsnap_layer_path(bs->filename, name, x->layer, sizeof x->layer)) < 0) {
        free(x);
        return r;
    }
    pthread_mutex_lock(&bs->snap_lock);   /* held until commit or abort */
    pthread_mutex_lock(&bs->lock);
    r = prepare_locked(x);
    pthread_mutex_unlock(&bs->lock);
    if (r < 0) {
        pthread_mutex_unlock(&bs->snap_lock);
        free(x);
        return r;
    }
    *xp = x;
    return 0;
}

void bdev_extsnap_abort(struct bdev_extsnap_prep *x)
{
    if (!x) return;
    bdev_close(x->ov);
    unlink(x->p.tmp);
    pthread_mutex_unlock(&x->bs->snap_lock);
    free(x);
}

static int commit_locked(struct bdev_extsnap_prep *x)
{
    struct bdev *bs = x->bs, *lower = NULL;
    const struct paths *p = &x->p;
    if (bs->size != x->size)
        return pms_err(EBUSY, "the image was resized since the snapshot was prepared");
    int r = bs->drv->flush(bs);
    if (r < 0) return r;
    kill_point("create-overlay");
    if (link(p->live, x->layer) < 0)
        return pms_err(errno, "could not create layer file '%s': %s", x->layer, strerror(errno));
    /* the layer's date is the snapshot instant (the list shows it) */
    utimensat(AT_FDCWD, x->layer, NULL, 0);
    r = fsync_dir(p->dir);
    if (r == 0)
        r = open_node(x->layer, true, true, bs->cache_mode, &lower);
    if (r < 0)
        goto drop_layer;
    kill_point("create-link");
    /* commit point */
    if (rename(p->tmp, p->live) < 0) {
        r = pms_err(errno, "could not switch '%s' to the new overlay: %s", p->live,
                    strerror(errno));
        goto drop_layer;
    }
    kill_point("create-rename");
    r = fsync_dir(p->dir);
    bdev_set_backing(lower, bdev_take_backing(bs));
    take_over(bs, x->ov);
    bdev_set_backing(bs, lower);
    bdev_close(x->ov);                 /* the old live state, flushed above */
    x->ov = NULL;
    return r;

drop_layer:
    bdev_close(lower);
    unlink(x->layer);
    fsync_dir(p->dir);
    return r;
}

int bdev_extsnap_commit(struct bdev_extsnap_prep *x)
{
    pthread_mutex_lock(&x->bs->lock);
    int r = commit_locked(x);
    pthread_mutex_unlock(&x->bs->lock);
    if (x->ov) {                       /* not switched: the old state stays */
        bdev_close(x->ov);
        unlink(x->p.tmp);
    }
    pthread_mutex_unlock(&x->bs->snap_lock);
    free(x);
    return r;
}

int bdev_extsnap_create(struct bdev *bs, const char *name)
{
    struct bdev_extsnap_prep *x;
    int r = bdev_extsnap_prepare(bs, name, &x);
    return r < 0 ? r : bdev_extsnap_commit(x);
}

void bdev_extsnap_lock(struct bdev *bs)
{
    pthread_mutex_lock(&bs->snap_lock);
}

void bdev_extsnap_unlock(struct bdev *bs)
{
    pthread_mutex_unlock(&bs->snap_lock);
}

/* ---- revert ------------------------------------------------------------------- */

static int revert_locked(struct bdev *bs, const char *name, const struct paths *p,
                         const char *layer)
{
    int r0 = recover_first(bs, p);
    if (r0 < 0)
        return r0;
    struct pms_snapshot_info *l = NULL;
    size_t n = 0;
    int r = bs->drv->snapshot_list ? bs->drv->snapshot_list(bs, &l, &n) : 0;
    if (r < 0) return r;
    pms_snapshot_list_free(l, n);
    if (n)
        return pms_err(EBUSY, "the live image '%s' holds %zu internal snapshot%s, which a "
                       "revert to an external snapshot would discard: delete %s first",
                       p->live, n, n == 1 ? "" : "s", n == 1 ? "it" : "them");
    struct bdev *nb = NULL, *ov = NULL;
    r = open_node(layer, true, false, bs->cache_mode, &nb);
    if (r < 0)
        return pms_err(-r, "cannot revert to '%s': %s", name, pms_err_get());
    char bname[PATH_MAX];             /* "IMG@NAME": checked to fit NAME_MAX */
    snprintf(bname, sizeof bname, "%s@%s", p->base, name);
    r = create_overlay(p->tmp, nb->size, bname);
    if (r < 0) goto out;
    r = open_node(p->tmp, false, true, bs->cache_mode, &ov);
    if (r < 0) goto out;
    kill_point("revert-overlay");
    if (rename(p->tmp, p->live) < 0) {        /* commit point */
        r = pms_err(errno, "could not switch '%s' to the new overlay: %s", p->live,
                    strerror(errno));
        goto out;
    }
    r = fsync_dir(p->dir);
    take_over(bs, ov);
    bdev_set_backing(bs, nb);
    nb = NULL;
    bdev_close_later(ov);             /* the discarded live state and its chain */
    return r;
out:
    bdev_close(ov);
    bdev_close(nb);
    unlink(p->tmp);
    return r;
}

/* What revert and delete check first: the node is eligible for op, snapshot
 * name exists; its paths and layer file name (PATH_MAX bytes). */
static int locate(struct bdev *bs, const char *op, const char *name, struct paths *p,
                  char *layer)
{
    int r = eligible(bs, op);
    if (r < 0) return r;
    if ((r = split(bs->filename, p)) < 0)
        return r;
    r = bdev_extsnap_exists(bs, name);
    if (r <= 0)
        return r < 0 ? r : pms_err(ENOENT, "no external snapshot '%s'", name);
    return bdev_extsnap_layer_path(bs->filename, name, layer, PATH_MAX);
}

int bdev_extsnap_revert(struct bdev *bs, const char *name)
{
    struct paths p;
    char layer[PATH_MAX];
    int r = locate(bs, "revert", name, &p, layer);
    if (r < 0)
        return r;
    pthread_mutex_lock(&bs->snap_lock);
    pthread_mutex_lock(&bs->lock);
    r = revert_locked(bs, name, &p, layer);
    pthread_mutex_unlock(&bs->lock);
    pthread_mutex_unlock(&bs->snap_lock);
    return r;
}

/* ---- delete ------------------------------------------------------------------- */

struct merge {
    bdev_progress_fn fn;
    void *opaque;
    uint64_t done, total;
    uint8_t *buf;
    /* Descriptors of files this delete removed: the file system frees a
     * removed file's blocks when its last descriptor closes, which for a
     * large sparse layer takes long (1 s seen on ext4): closed by a
     * background thread once the delete is done (bdev_fd_close_later). */
    int late_fd[4];
    int nlate;
    /* the batch being gathered: runs read into buf (MERGE_BATCH_BYTES) */
    struct bdev_wvec *v;
    size_t nv;
    uint64_t used;
    /* streaming out of a layer with no backing file: a range the target
     * does not allocate will read as zeroes once rebased, so the layer's
     * all-zero pages need not be copied (a layer without subclusters holds
     * a random 4 KiB store as a whole 64 KiB cluster, mostly zeroes) */
    bool skip_zero_pages;
};

/* Keep path's inode open until the delete is done (then closed in the
 * background). */
static void hold_until_done(struct merge *m, const char *path)
{
    if (m->nlate < (int)(sizeof m->late_fd / sizeof *m->late_fd)) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) m->late_fd[m->nlate++] = fd;
    }
}

/* The batch buffers, charged to the block layer's metadata memory (a cap
 * counts them: bdev_meta_charge). */
#define MERGE_MEM (MERGE_BATCH_BYTES + MERGE_BATCH_RUNS * sizeof(struct bdev_wvec))

static int merge_alloc(struct merge *m)
{
    if (m->buf) return 0;                   /* both or neither are allocated */
    m->buf = malloc(MERGE_BATCH_BYTES);
    m->v = malloc(MERGE_BATCH_RUNS * sizeof *m->v);
    if (!m->buf || !m->v) {
        free(m->buf);
        free(m->v);
        m->buf = NULL;
        m->v = NULL;
        return pms_err(ENOMEM, "out of memory");
    }
    bdev_meta_charge(MERGE_MEM);
    return 0;
}

static void merge_free(struct merge *m)
{
    if (!m->buf) return;
    free(m->buf);
    free(m->v);
    m->buf = NULL;
    m->v = NULL;
    bdev_meta_charge(-(int64_t)MERGE_MEM);
}

/* Write the gathered runs into dst as one batch.  locked: the caller holds
 * dst->lock. */
static int merge_write(struct bdev *dst, bool locked, struct merge *m)
{
    int r = 0;
    if (m->nv)
        r = locked ? (dst->drv->pwrite_batch ? dst->drv->pwrite_batch(dst, m->v, m->nv, NULL, NULL)
                                             : pms_err(ENOTSUP, "no batched writes"))
                   : bdev_pwrite_batch(dst, m->v, m->nv, NULL, NULL);
    m->nv = 0;
    m->used = 0;
    return r;
}

/* Copy [off, off+len) (len <= MERGE_CHUNK) from src into dst: zeroes at
 * once, data gathered into the batch (written when it is full). */
static int merge_copy(struct bdev *src, struct bdev *dst, bool locked, bool zero,
                      uint64_t off, uint64_t len, struct merge *m)
{
    int r;
    if (zero)
        return locked ? dst->drv->pwrite_zeroes(dst, len, off, 0)
                      : bdev_pwrite_zeroes(dst, len, off, 0);
    /* len adds at most len / MERGE_PAGE + 1 runs */
    if (m->nv + len / MERGE_PAGE + 1 > MERGE_BATCH_RUNS || m->used + len > MERGE_BATCH_BYTES) {
        r = merge_write(dst, locked, m);
        if (r < 0) return r;
    }
    uint8_t *p = m->buf + m->used;
    r = locked ? src->drv->pread(src, p, len, off) : bdev_pread(src, p, len, off);
    if (r < 0) return r;
    for (uint64_t at = 0; at < len;) {
        uint64_t n = len - at < MERGE_PAGE ? len - at : MERGE_PAGE;
        if (m->skip_zero_pages && n == MERGE_PAGE && (off + at) % MERGE_PAGE == 0 &&
            pms_buf_is_zero(p + at, n)) {
            at += n;
            continue;
        }
        struct bdev_wvec *last = m->nv ? &m->v[m->nv - 1] : NULL;
        if (last && last->off + last->len == off + at &&
            (const uint8_t *)last->buf + last->len == p + at)
            last->len += n;                    /* contiguous with the last run */
        else                                   /* room: checked above */
            m->v[m->nv++] = (struct bdev_wvec){ off + at, n, p + at };
        at += n;
    }
    m->used += len;
    return 0;
}

/* Stream [off, off+len) of c's backing file, whose data lies at host..host+len
 * in that layer's own file, skipping the holes of that file (with
 * skip_zero_pages only: they read as zeroes, and so will c once it has no
 * backing file).  A layer without subclusters holds a random 4 KiB store as
 * a 64 KiB cluster of which the rest was never written: reading it whole
 * made the page cache zero-fill 15 pages per page copied (a layer of 5 s of
 * random stores at scale took 12-33 s to stream). */
static int copy_file_data(struct bdev *c, uint64_t off, uint64_t len, uint64_t host,
                          struct merge *m)
{
    struct bdev *f = c->backing ? c->backing->file : NULL;
    if (!f)
        return merge_copy(c, c, true, false, off, len, m);
    for (uint64_t at = 0; at < len;) {
        bool hole;
        uint64_t n = bdev_file_extent(f, host + at, len - at, &hole);
        int r = hole ? 0 : merge_copy(c, c, true, false, off + at, n, m);
        if (r < 0) return r;
        at += n;
    }
    return 0;
}

/* One stretch of stream() under c->lock: from *offp, until the batch is
 * nearly full or STREAM_SECTION_EXTENTS extents were looked at. */
static int stream_section(struct bdev *c, uint64_t *offp, struct merge *m)
{
    uint64_t size = c->size, off = *offp;
    for (unsigned k = 0; off < size && k < STREAM_SECTION_EXTENTS &&
                         m->used + MERGE_CHUNK <= MERGE_BATCH_BYTES; k++) {
        struct pms_extent e;
        uint64_t want = size - off;       /* one query covers a whole unallocated run */
        memset(&e, 0, sizeof e);
        int r = c->drv->block_status(c, off, want, &e);
        if (r < 0) return r;
        if (e.length == 0 || e.length > want)
            return pms_err(EIO, "bad extent while merging into '%s'", c->filename);
        if (e.depth == 1 && (e.flags & PMS_BLOCK_ALLOCATED)) {
            if (e.length > MERGE_CHUNK) e.length = MERGE_CHUNK;   /* copies go by chunks */
            bool zero = (e.flags & PMS_BLOCK_ZERO) && !(e.flags & PMS_BLOCK_DATA);
            if (zero && m->skip_zero_pages)
                r = 0;                    /* reads as zeroes once c has no backing file */
            else if (m->skip_zero_pages && (e.flags & PMS_BLOCK_OFFSET))
                r = copy_file_data(c, off, e.length, e.host_offset, m);
            else
                r = merge_copy(c, c, true, zero, off, e.length, m);
            if (r < 0) return r;
            kill_point("delete-streaming");
        }
        off += e.length;
        m->done += e.length;
    }
    *offp = off;
    return 0;
}

/* Copy into c every range that c reads from its backing file (depth 1)
 * and that file allocates itself.  c->lock is taken per section (a look
 * at the allocation and the batch it leads to are one step under it), so
 * other users of c (the live image's writeback and faults) wait at most
 * one section: what they write meanwhile c then allocates itself, and the
 * next section leaves it alone. */
static int stream(struct bdev *c, struct merge *m)
{
    int r = 0;
    for (uint64_t off = 0; r == 0;) {
        pthread_mutex_lock(&c->lock);
        bool more = off < c->size;
        if (more) r = stream_section(c, &off, m);
        if (more && r == 0) r = merge_write(c, true, m);
        m->nv = 0;
        m->used = 0;
        pthread_mutex_unlock(&c->lock);
        if (!more) break;
        if (m->fn) m->fn(m->opaque, m->done, m->total);   /* outside the lock */
    }
    return r;
}

/* Point c's header at a new backing file (NULL: none); one header write. */
static int rebase(struct bdev *c, const char *bname, const char *bfmt)
{
    struct qcow2_state *s = QS(c);
    char *nb = bname ? strdup(bname) : NULL, *nf = bname && bfmt ? strdup(bfmt) : NULL;
    if ((bname && !nb) || (bname && bfmt && !nf)) {
        free(nb); free(nf);
        return pms_err(ENOMEM, "out of memory");
    }
    char *ob = s->backing_file, *of = s->backing_format;
    s->backing_file = nb;
    s->backing_format = nf;
    int r = qcow2_update_header(c);
    if (r < 0) {
        s->backing_file = ob; s->backing_format = of;
        free(nb); free(nf);
        return r;
    }
    free(ob); free(of);
    return 0;
}

/* Is the file at path a layer as the list judges one (a regular file, qcow2
 * by its magic)?  1 yes (*vsize: its virtual size, if not NULL), 0 no (or
 * missing), -errno when it cannot be read. */
static int layer_header(const char *path, uint64_t *vsize)
{
    struct stat pst;
    if (lstat(path, &pst) < 0)
        return errno == ENOENT ? 0 : pms_err(errno, "%s", strerror(errno));
    if (!S_ISREG(pst.st_mode))
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return pms_err(errno, "%s", strerror(errno));
    uint8_t h[32];
    ssize_t got = pread(fd, h, sizeof h, 0);
    close(fd);
    if (got != (ssize_t)sizeof h || memcmp(h, "QFI\xfb", 4))
        return 0;
    if (vsize) {
        memcpy(vsize, h + 24, 8);
        *vsize = be64toh(*vsize);
    }
    return 1;
}

/* Does the image at path have the layer (dev/ino) as its backing file?
 * 1 yes, 0 no (also for what is not a layer at all, as the list judges:
 * not a regular file, not qcow2 by its magic), -errno when a qcow2 file
 * cannot be inspected: it may read through the layer, so a delete must
 * not go on (it removed the layer under an unreadable child). */
static int backs(const char *path, const struct paths *p, const struct stat *lst,
                 char **bname)
{
    int r = layer_header(path, NULL);
    if (r <= 0)
        return r;
    struct bdev *c;
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.readonly = 1;
    o.no_backing = 1;
    o.force_share = 1;                 /* reading a header only */
    r = bdev_open(path, &o, &c);
    if (r < 0)
        return r;                      /* (the open's message) */
    int yes = 0;
    struct qcow2_state *s = c->drv == &pms_drv_qcow2 ? QS(c) : NULL;
    if (s && s->backing_file) {
        char full[PATH_MAX];
        struct stat st;
        int n = s->backing_file[0] == '/' ? snprintf(full, sizeof full, "%s", s->backing_file)
                : snprintf(full, sizeof full, "%s/%s", p->dir, s->backing_file);
        yes = n < (int)sizeof full && stat(full, &st) == 0 && st.st_dev == lst->st_dev &&
              st.st_ino == lst->st_ino;
        if (yes && bname)
            *bname = strdup(s->backing_file);
    }
    bdev_close(c);
    return yes;
}

/* ---- delete by commit (a parent with one layer child) -------------------------
 *
 * Deleting snapshot N whose only child is layer C (the usual case: the
 * oldest of a chain) by streaming would copy all of N's data into C; the
 * other direction copies only C's own data: write C's allocations into N
 * (QEMU's commit), so N reads as C does, then rename(N, C).  N's own content
 * is destroyed on the way, so a marker DIR/.IMG@N.deleting (holding C's file
 * name) is made durable first: a marked snapshot is no longer listed or
 * usable, and the next writable open (or delete) finishes the job, which
 * is idempotent (C is intact until the rename replaces it by N, which by
 * then reads the same).  C reads the same bytes throughout: only ranges C
 * allocates itself are written into N.
 */
static int write_marker(const struct paths *p, const char *marker, const char *child_base)
{
    int fd = open(marker, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return pms_err(errno, "could not create '%s': %s", marker, strerror(errno));
    size_t l = strlen(child_base);
    int r = write(fd, child_base, l) == (ssize_t)l && fsync(fd) == 0 ? 0
            : pms_err(errno ? errno : EIO, "could not write '%s'", marker);
    close(fd);
    if (r == 0) r = fsync_dir(p->dir);
    return r;
}

/* Open parent for a commit into it (writable, with its backing chain):
 * read-only nodes of the same file may go on reading it meanwhile, so the
 * clusters the merge releases stay allocated until it closes. */
static int open_commit_target(const char *parent, int cache_mode, struct bdev **par)
{
    struct pms_open_opts o;
    pms_open_opts_init(&o);
    o.cache_mode = cache_mode;
    o.l2_cache_size = MERGE_L2_CACHE;
    int r = bdev_open(parent, &o, par);
    if (r < 0)
        return pms_err(-r, "cannot merge into '%s': %s", parent, pms_err_get());
    qcow2_hold_frees(*par);
    return 0;
}

/* Copy child's own allocations into parent (both paths; par: parent opened
 * by open_commit_target, or NULL to open it here; closed in any case),
 * rename parent over child, drop the marker.  No node of the live image is
 * involved, nor its lock: the live chain's nodes of both files read the
 * same bytes throughout. */
static int commit_finish(const struct paths *p, struct bdev *par, const char *parent,
                         const char *child, const char *marker, int cache_mode,
                         struct merge *m)
{
    struct bdev *ch = NULL;
    int r = par ? 0 : open_commit_target(parent, cache_mode, &par);
    if (r == 0 && (r = open_merge_source(child, cache_mode, &ch)) < 0)
        r = pms_err(-r, "cannot merge '%s': %s", child, pms_err_get());
    if (r < 0)
        goto out;
    uint64_t size = ch->size < par->size ? ch->size : par->size;
    m->total += size;
    for (uint64_t off = 0; off < size && r == 0;) {
        struct pms_extent e;
        r = bdev_block_status(ch, off, size - off, &e);
        if (r < 0) break;
        if (e.depth == 0 && (e.flags & PMS_BLOCK_ALLOCATED)) {
            if (e.length > MERGE_CHUNK) e.length = MERGE_CHUNK;   /* copies go by chunks */
            r = merge_copy(ch, par, false,
                           (e.flags & PMS_BLOCK_ZERO) && !(e.flags & PMS_BLOCK_DATA),
                           off, e.length, m);
            if (r == 0) kill_point("delete-committing");
        }
        off += e.length;
        m->done += e.length;
        if (m->fn) m->fn(m->opaque, m->done, m->total);
    }
    if (r == 0) r = merge_write(par, false, m);
    m->nv = 0;
    m->used = 0;
    if (r == 0) r = bdev_flush(par);
    if (r == 0 && ch->size != par->size)
        r = pms_err(ENOTSUP, "cannot merge '%s' into '%s': their sizes differ", child, parent);
out:
    bdev_close(ch);
    bdev_close(par);
    if (r < 0) return r;
    kill_point("delete-committed");
    struct stat cst;
    bool have_time = stat(child, &cst) == 0;
    hold_until_done(m, child);       /* the file the rename drops */
    if (rename(parent, child) < 0)
        return pms_err(errno, "could not rename '%s' to '%s': %s", parent, child, strerror(errno));
    if (have_time) {                   /* the child's snapshot instant */
        struct timespec ts[2] = { cst.st_atim, cst.st_mtim };
        utimensat(AT_FDCWD, child, ts, 0);
    }
    r = fsync_dir(p->dir);
    kill_point("delete-commit-renamed");
    if (r == 0 && unlink(marker) < 0 && errno != ENOENT)
        r = pms_err(errno, "could not remove '%s': %s", marker, strerror(errno));
    if (r == 0) r = fsync_dir(p->dir);
    return r;
}

/* Finish every interrupted delete-by-commit of the image (markers). */
static int finish_commits(const struct paths *p, int cache_mode)
{
    DIR *d = opendir(p->dir);
    if (!d) return 0;
    size_t bl = strlen(p->base);
    struct dirent *de;
    int r = 0;
    struct merge m = { .fn = NULL };
    while ((de = readdir(d)) && r == 0) {
        size_t nl = strlen(de->d_name);
        if (de->d_name[0] != '.' || strncmp(de->d_name + 1, p->base, bl) ||
            de->d_name[1 + bl] != '@' || nl < bl + 11 || strcmp(de->d_name + nl - 9, ".deleting"))
            continue;
        char marker[PATH_MAX], parent[PATH_MAX], child[PATH_MAX], cb[NAME_MAX + 1];
        if (snprintf(marker, sizeof marker, "%s/%s", p->dir, de->d_name) >= (int)sizeof marker ||
            snprintf(parent, sizeof parent, "%s/%.*s", p->dir, (int)(nl - 10), de->d_name + 1)
                >= (int)sizeof parent)
            continue;
        int fd = open(marker, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd < 0 ? -1 : read(fd, cb, sizeof cb - 1);
        if (fd >= 0) close(fd);
        struct stat st;
        if (n <= 0 || memchr(cb, '/', (size_t)n) || stat(parent, &st) < 0) {
            /* nothing to finish (renamed already) or a marker we did not
             * finish writing (then nothing was merged yet) */
            unlink(marker);
            fsync_dir(p->dir);
            continue;
        }
        cb[n] = 0;
        if (snprintf(child, sizeof child, "%s/%s", p->dir, cb) >= (int)sizeof child)
            continue;
        if ((r = merge_alloc(&m)) < 0) break;
        if (stat(child, &st) < 0) {
            /* the child went (removed from outside while the delete was
             * pending): the parent's own content was overwritten by the
             * copy and nothing reads through it any more, so it goes too,
             * before its marker (it must not come back as the snapshot) */
            if (unlink(parent) == 0 || errno == ENOENT) {
                fsync_dir(p->dir);
                unlink(marker);
                fsync_dir(p->dir);
            } else
                r = pms_err(errno, "could not remove '%s': %s", parent, strerror(errno));
            continue;
        }
        r = commit_finish(p, NULL, parent, child, marker, cache_mode, &m);
    }
    closedir(d);
    merge_free(&m);
    return r;
}

/* Bytes a file occupies on disk (0 if unknown). */
static uint64_t disk_bytes(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

/* The snapshot being deleted and the images that read through it. */
struct victim {
    char *bname, *bfmt;               /* its backing file (its children's next), or NULL */
    uint64_t lsize;                   /* its virtual size */
    char **ch;                        /* layer files whose backing file it is */
    size_t nch;
    uint64_t ch0_size;                /* virtual size of ch[0] */
    bool live_child;                  /* the live image's backing file is it */
    bool commit;                      /* by commit into it (see above), not by streaming */
};

static void victim_free(struct victim *v)
{
    for (size_t i = 0; i < v->nch; i++)
        free(v->ch[i]);
    free(v->ch);
    free(v->bname);
    free(v->bfmt);
}

/* Refuse a delete that would lose an internal snapshot: one held by the
 * layer itself (its file goes, or, by commit, takes another's content), or
 * by an image that reads through the layer (a stream completes only the
 * active state, so the snapshot's unallocated clusters would read the
 * layer's own backing afterwards).  n: a qcow2 node of `path`. */
static int keeps_internal(struct bdev *n, const char *path, bool own)
{
    const struct qcow2_state *s = QS(n);
    if (s->nb_snaps == 0)
        return 0;
    const char *in = s->snaps[0].name && *s->snaps[0].name ? s->snaps[0].name
                                                           : s->snaps[0].id_str;
    const char *many = s->nb_snaps > 1 ? ", ..." : "";
    if (own)
        return pms_err(EBUSY, "its layer '%s' holds %d internal snapshot(s) ('%s'%s), which "
                       "the delete would lose: delete them first (qemu-img snapshot -d)",
                       path, s->nb_snaps, in, many);
    return pms_err(EBUSY, "'%s' holds %d internal snapshot(s) ('%s'%s) that read through it, "
                   "which the delete would change: delete them first", path, s->nb_snaps, in,
                   many);
}

/* Find what deleting the snapshot with layer file `layer` involves.
 * bs->lock held (the live node's header is read). */
static int survey(struct bdev *bs, const char *name, const struct paths *p, const char *layer,
                  struct victim *v)
{
    struct stat lst;
    if (stat(layer, &lst) < 0)
        return pms_err(errno, "cannot delete snapshot '%s': '%s': %s", name, layer,
                       strerror(errno));
    /* the layer's own backing file becomes its children's */
    struct bdev *ln;
    int r = open_merge_source(layer, bs->cache_mode, &ln);
    if (r < 0)
        return pms_err(-r, "cannot delete snapshot '%s': %s", name, pms_err_get());
    v->bname = QS(ln)->backing_file ? strdup(QS(ln)->backing_file) : NULL;
    v->bfmt = QS(ln)->backing_format ? strdup(QS(ln)->backing_format) : NULL;
    v->lsize = ln->size;
    bool oom = (QS(ln)->backing_file && !v->bname) || (QS(ln)->backing_format && !v->bfmt);
    r = keeps_internal(ln, layer, true);
    bdev_close(ln);
    if (r < 0) return r;
    if (oom) return pms_err(ENOMEM, "out of memory");

    /* the delete ends by removing the layer's name: a directory we cannot
     * write is refused before a child is written */
    if (faccessat(AT_FDCWD, p->dir, W_OK, AT_EACCESS) < 0)
        return pms_err(errno, "cannot remove '%s' from directory '%s': %s", layer, p->dir,
                       strerror(errno));

    /* children: other layers, then the live image */
    size_t cap = 0;
    DIR *d = opendir(p->dir);
    if (!d)
        return pms_err(errno, "cannot read directory '%s': %s", p->dir, strerror(errno));
    size_t bl = strlen(p->base);
    struct dirent *de;
    while (r == 0 && (de = readdir(d))) {
        if (strncmp(de->d_name, p->base, bl) || de->d_name[bl] != '@' ||
            !strcmp(de->d_name + bl + 1, name))
            continue;
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", p->dir, de->d_name) >= (int)sizeof path)
            continue;
        int b = backs(path, p, &lst, NULL);
        if (b < 0) {
            r = pms_err(-b, "'%s' may read through it and cannot be inspected: %s", path,
                        pms_err_get());
            break;
        }
        if (!b)
            continue;
        if (v->nch == cap) {
            char **n2 = realloc(v->ch, (cap = cap ? 2 * cap : 8) * sizeof *v->ch);
            if (!n2) { r = pms_err(ENOMEM, "out of memory"); break; }
            v->ch = n2;
        }
        if (!(v->ch[v->nch] = strdup(path))) r = pms_err(ENOMEM, "out of memory");
        else v->nch++;
    }
    closedir(d);
    for (size_t i = 0; r == 0 && i < v->nch; i++) {
        struct bdev *cn;
        if ((r = open_merge_source(v->ch[i], bs->cache_mode, &cn)) < 0)
            return pms_err(-r, "cannot delete snapshot '%s': %s", name, pms_err_get());
        r = keeps_internal(cn, v->ch[i], false);
        if (i == 0)
            v->ch0_size = cn->size;
        bdev_close(cn);
    }
    if (r < 0) return r;
    const char *fmt;
    char bp[PATH_MAX];
    struct stat st;
    v->live_child = backing_path(bs, p, bp, sizeof bp, &fmt) == 0 && bp[0] &&
                    stat(bp, &st) == 0 && st.st_dev == lst.st_dev && st.st_ino == lst.st_ino;
    if (v->live_child && (r = keeps_internal(bs, bs->filename, false)) < 0)
        return r;
    /* one layer child holding less than the snapshot: commit it into the
     * snapshot's file instead of streaming the snapshot into it (only at
     * the same virtual size: the file becomes the child's, and the image
     * was resized between them otherwise) */
    v->commit = v->nch == 1 && !v->live_child && v->ch0_size == v->lsize &&
                disk_bytes(v->ch[0]) < disk_bytes(layer);
    return 0;
}

/* Our read-only node of the file at path in bs's open chain, if any, hands
 * its image locks to the writable node the merge opens next (two open file
 * descriptions' locks conflict, even in one process).  bs->lock held. */
static void hand_over_locks(struct bdev *bs, const char *path)
{
    struct stat want;
    if (stat(path, &want) < 0) return;
    for (struct bdev *y = bs->backing; y; y = y->backing) {
        struct stat st;
        const char *f = y->file ? y->file->filename : y->filename;
        if (stat(f, &st) == 0 && st.st_dev == want.st_dev && st.st_ino == want.st_ino)
            bdev_file_unlock(y->file);
    }
}

/* Delete by commit: v->ch[0] is committed into the layer, which then takes
 * its name.  Runs without bs->lock. */
static int delete_by_commit(struct bdev *bs, const char *name, const struct paths *p,
                            const char *layer, const struct victim *v, struct merge *m)
{
    char marker[PATH_MAX];
    const char *cb = strrchr(v->ch[0], '/');
    int r = marker_path(p, name, marker, sizeof marker);
    if (r < 0) return r;
    /* the snapshot's file must open for writing (no QEMU reader on it)
     * before the marker hides it */
    struct bdev *par = NULL;
    r = open_commit_target(layer, bs->cache_mode, &par);
    if (r < 0)
        return pms_err(-r, "cannot delete snapshot '%s': %s", name, pms_err_get());
    r = write_marker(p, marker, cb ? cb + 1 : v->ch[0]);
    if (r < 0) {
        bdev_close(par);
        return r;
    }
    kill_point("delete-commit-marker");
    return commit_finish(p, par, layer, v->ch[0], marker, bs->cache_mode, m);
}

/* Delete by streaming the layer into each child.  The layer children are
 * written through nodes of our own, without bs->lock (what they are given
 * is what the live chain reads there through them already); the live
 * image, when a child, through bs itself, section by section (stream). */
static int delete_by_stream(struct bdev *bs, const struct paths *p, const char *layer,
                            const struct victim *v, struct merge *m)
{
    int r = 0;
    m->skip_zero_pages = v->bname == NULL;
    m->total = (v->nch + (v->live_child ? 1 : 0)) * v->lsize;
    /* every child opens for writing before any is written: a refusal (a
     * QEMU reader on one, no write permission) changes nothing */
    struct bdev **cs = calloc(v->nch ? v->nch : 1, sizeof *cs);
    if (!cs)
        return pms_err(ENOMEM, "out of memory");
    for (size_t i = 0; i < v->nch && r == 0; i++)
        r = open_commit_target(v->ch[i], bs->cache_mode, &cs[i]);
    for (size_t i = 0; i < v->nch && r == 0; i++) {
        struct bdev *c = cs[i];
        cs[i] = NULL;
        struct stat cst;
        bool have_time = stat(v->ch[i], &cst) == 0;
        r = stream(c, m);
        if (r == 0) r = bdev_flush(c);
        if (r == 0) {
            kill_point("delete-streamed-layer");
            pthread_mutex_lock(&c->lock);
            r = rebase(c, v->bname, v->bfmt);
            pthread_mutex_unlock(&c->lock);
            kill_point("delete-rebased-layer");
        }
        bdev_close(c);
        /* a layer's date is its snapshot's instant: keep it */
        if (have_time) {
            struct timespec ts[2] = { cst.st_atim, cst.st_mtim };
            utimensat(AT_FDCWD, v->ch[i], ts, 0);
        }
    }
    for (size_t i = 0; i < v->nch; i++)
        if (cs[i])
            bdev_close(cs[i]);
    free(cs);
    if (r == 0 && v->live_child) {
        pthread_mutex_lock(&bs->lock);
        if (!bs->backing)              /* opened without its chain (snapshot -d) */
            r = reopen_chain(bs, p);
        pthread_mutex_unlock(&bs->lock);
        if (r == 0) r = stream(bs, m);
        /* the copies' data reach the disk before the lock is taken for the
         * flush that must precede the rebase (which then syncs little) */
        if (r == 0 && bs->file) r = bdev_file_flush(bs->file);
        pthread_mutex_lock(&bs->lock);
        if (r == 0) r = bs->drv->flush(bs);
        if (r == 0) kill_point("delete-streamed-live");
        if (r == 0) r = rebase(bs, v->bname, v->bfmt);
        pthread_mutex_unlock(&bs->lock);
    }
    if (r == 0) {
        kill_point("delete-unlink");
        hold_until_done(m, layer);
        if (unlink(layer) < 0)
            r = pms_err(errno, "could not remove '%s': %s", layer, strerror(errno));
        else
            r = fsync_dir(p->dir);
    }
    return r;
}

/* After a delete: bs reads through the chain its header now names (with
 * had_chain), or through none.  The new chain is opened before the old one
 * is dropped, so a failure leaves the old nodes, which still read the same
 * bytes (renamed or removed files stay readable through them). */
static int restore_chain(struct bdev *bs, const struct paths *p, bool had_chain)
{
    char path[PATH_MAX];
    const char *fmt;
    struct bdev *nb = NULL, *old;
    pthread_mutex_lock(&bs->lock);
    int r = had_chain ? backing_path(bs, p, path, sizeof path, &fmt) : 0;
    char *f = r == 0 && had_chain && fmt ? strdup(fmt) : NULL;
    pthread_mutex_unlock(&bs->lock);
    if (r == 0 && had_chain && path[0])
        r = open_chain(path, f, bs->cache_mode, &nb);
    free(f);
    if (r < 0) return r;
    pthread_mutex_lock(&bs->lock);
    old = bdev_take_backing(bs);
    bdev_set_backing(bs, nb);
    pthread_mutex_unlock(&bs->lock);
    bdev_close_later(old);             /* may hold the last handle of removed files */
    return 0;
}

bool bdev_extsnap_delete_pending(struct bdev *bs, const char *name)
{
    struct paths p;
    return name && *name && !strchr(name, '/') && split(bs->filename, &p) == 0 &&
           marked(&p, name);
}

int bdev_extsnap_finish_delete(struct bdev *bs, const char *name)
{
    /* only where a delete could run: a read-only or check-only node, or
     * one that is not qcow2, leaves the marker for a writable open */
    if (!bdev_extsnap_delete_pending(bs, name) || bs->drv != &pms_drv_qcow2 ||
        bs->readonly || bs->check_only)
        return 0;
    struct paths p;
    int r = split(bs->filename, &p);
    if (r < 0)
        return r;
    pthread_mutex_lock(&bs->snap_lock);
    pthread_mutex_lock(&bs->lock);
    r = recover(bs, &p);
    pthread_mutex_unlock(&bs->lock);
    pthread_mutex_unlock(&bs->snap_lock);
    if (r == 0 && marked(&p, name))
        r = pms_err(EIO, "the interrupted delete of snapshot '%s' could not be finished", name);
    return r < 0 ? r : 1;
}

int bdev_extsnap_delete(struct bdev *bs, const char *name, bdev_progress_fn fn, void *opaque)
{
    struct paths p;
    char layer[PATH_MAX];
    int r = bdev_extsnap_finish_delete(bs, name);
    if (r != 0)
        return r < 0 ? r : 0;       /* that was this delete, interrupted */
    r = locate(bs, "delete", name, &p, layer);
    if (r < 0)
        return r;
    struct merge m = { .fn = fn, .opaque = opaque };
    struct victim v;
    memset(&v, 0, sizeof v);
    pthread_mutex_lock(&bs->snap_lock);
    pthread_mutex_lock(&bs->lock);
    bool had_chain = bs->backing != NULL;
    r = recover_first(bs, &p);
    if (r == 0)
        r = survey(bs, name, &p, layer, &v);
    if (r == 0) {
        if (v.commit)
            hand_over_locks(bs, layer);
        else
            for (size_t i = 0; i < v.nch; i++)
                hand_over_locks(bs, v.ch[i]);
    }
    pthread_mutex_unlock(&bs->lock);
    if (r == 0 && (r = merge_alloc(&m)) == 0)
        r = v.commit ? delete_by_commit(bs, name, &p, layer, &v, &m)
                     : delete_by_stream(bs, &p, layer, &v, &m);
    if (v.commit || v.nch || v.live_child) {
        int r2 = restore_chain(bs, &p, had_chain);
        if (r == 0) r = r2;
    }
    pthread_mutex_unlock(&bs->snap_lock);
    victim_free(&v);
    merge_free(&m);
    for (int i = 0; i < m.nlate; i++)
        bdev_fd_close_later(m.late_fd[i]);
    return r;
}

/* ---- list --------------------------------------------------------------------- */

static int cmp_info(const void *a, const void *b)
{
    const struct pms_snapshot_info *x = a, *y = b;
    if (x->date_sec != y->date_sec) return x->date_sec < y->date_sec ? -1 : 1;
    if (x->date_nsec != y->date_nsec) return x->date_nsec < y->date_nsec ? -1 : 1;
    return strcmp(x->name, y->name);
}

int bdev_extsnap_list(struct bdev *bs, struct pms_snapshot_info **list, size_t *n)
{
    struct paths p;
    if (split(bs->filename, &p) < 0)
        return 0;                      /* not a file: no external snapshots */
    DIR *d = opendir(p.dir);
    if (!d)
        return pms_err(errno, "cannot read directory '%s': %s", p.dir, strerror(errno));
    size_t bl = strlen(p.base), first = *n;
    struct dirent *de;
    int r = 0;
    struct stat live;
    bool have_live = stat(bs->filename, &live) == 0;
    while ((de = readdir(d)) && r == 0) {
        if (strncmp(de->d_name, p.base, bl) || de->d_name[bl] != '@' || !de->d_name[bl + 1])
            continue;
        char path[PATH_MAX];
        struct stat st;
        if (bdev_extsnap_layer_path(bs->filename, de->d_name + bl + 1, path, sizeof path) < 0 ||
            lstat(path, &st) < 0 || !S_ISREG(st.st_mode) || marked(&p, de->d_name + bl + 1))
            continue;
        /* a second name of the live file: a create that never got to its
         * rename (the snapshot was not taken; the next writable open
         * removes it) */
        if (have_live && st.st_dev == live.st_dev && st.st_ino == live.st_ino)
            continue;
        /* the virtual size from the header; files that are not qcow2 are
         * not layers */
        uint64_t vsize;
        if (layer_header(path, &vsize) <= 0) {
            pms_err_clear();
            continue;
        }
        struct pms_snapshot_info *l = realloc(*list, (*n + 1) * sizeof *l);
        if (!l) { r = pms_err(ENOMEM, "out of memory"); break; }
        *list = l;
        struct pms_snapshot_info *sn = &l[*n];
        memset(sn, 0, sizeof *sn);
        sn->name = strdup(de->d_name + bl + 1);
        sn->file = strdup(path);
        if (!sn->name || !sn->file) {
            free(sn->name); free(sn->file);
            r = pms_err(ENOMEM, "out of memory");
            break;
        }
        sn->kind = PMS_SNAP_KIND_EXTERNAL;
        sn->date_sec = (uint32_t)st.st_mtim.tv_sec;
        sn->date_nsec = (uint32_t)st.st_mtim.tv_nsec;
        sn->disk_size = vsize;
        (*n)++;
    }
    closedir(d);
    if (*n > first)
        qsort(*list + first, *n - first, sizeof **list, cmp_info);
    return r;
}
