/* qcow2 internal snapshots: table I/O, create, apply (goto), delete, list.
 *
 * A snapshot is an L1 table copy plus one refcount per reference: creating
 * one adds 1 to every L2 table and data cluster reachable from the active
 * L1 (so later writes copy-on-write), which is metadata work proportional
 * to the allocated size, never a data copy.
 *
 * Ordering (crash may leak, never lose a snapshot's data):
 *   create: L1 copy and new snapshot table written (unreferenced) ->
 *           refcounts +1, durable with them -> header switch -> old table freed.
 *   goto:   snapshot tree +1 (durable) -> active L1 overwritten -> old tree -1.
 *   delete: table without the entry + header switch (durable) -> tree -1 ->
 *           its L1 freed.
 * Between a refcount change and the COPIED-flag rewrite that follows it a
 * crash leaves flags that disagree with refcounts (QEMU has the same window);
 * the dirty bracket below makes every later writable open repair them.
 * Inside the bracket (version 3) the ordering barriers between metadata
 * writes are dropped (qcow2_barrier); what stays is the flush that makes a
 * new snapshot table and L1 copy durable before the header points at them.
 * Create is cheapest (create_v3): three flushes in all.
 * Threads: called with bs->lock held.
 */
#include <endian.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "qcow2.h"
#include "../extsnap.h"
#include "../../util/error.h"

void qcow2_free_snapshots(struct qcow2_state *s)
{
    for (int i = 0; i < s->nb_snaps && s->snaps; i++) {
        free(s->snaps[i].id_str);
        free(s->snaps[i].name);
        free(s->snaps[i].extra_unknown);
    }
    free(s->snaps);
    s->snaps = NULL;
}

int qcow2_read_snapshots(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    int n = s->nb_snaps;
    s->snaps = NULL;
    s->snapshots_size = 0;
    if (n == 0) return 0;
    int64_t flen = bdev_file_length(bs->file);
    s->snaps = calloc((size_t)n, sizeof *s->snaps);
    if (!s->snaps) return pms_err(ENOMEM, "out of memory");
    uint64_t pos = s->snapshots_offset;
    int r = 0;
    for (int i = 0; i < n; i++) {
        struct qcow2_snapshot *sn = &s->snaps[i];
        pos = (pos + 7) & ~7ull;
        if (pos - s->snapshots_offset > QCOW2_MAX_SNAPSHOT_TABLE ||
            (pos + 40 > (uint64_t)flen && !s->check_mode)) {
            r = pms_err(EINVAL, "snapshot table runs past the end of the file");
            break;
        }
        struct qcow2_snapshot_header h;
        r = bdev_file_pread(bs->file, &h, sizeof h, pos);
        if (r < 0) break;
        pos += sizeof h;
        sn->l1_table_offset = be64toh(h.l1_table_offset);
        sn->l1_size = be32toh(h.l1_size);
        sn->date_sec = be32toh(h.date_sec);
        sn->date_nsec = be32toh(h.date_nsec);
        sn->vm_clock_nsec = be64toh(h.vm_clock_nsec);
        sn->vm_state_size = be32toh(h.vm_state_size);
        sn->extra_data_size = be32toh(h.extra_data_size);
        sn->icount = UINT64_MAX;
        uint16_t idl = be16toh(h.id_str_size), nml = be16toh(h.name_size);
        if (sn->extra_data_size > QCOW2_MAX_SNAPSHOT_EXTRA) {
            r = pms_err(EINVAL, "snapshot %d has too much extra data (%u bytes)", i,
                        sn->extra_data_size);
            break;
        }
        uint64_t rest = (uint64_t)sn->extra_data_size + idl + nml;
        if (pos + rest > (uint64_t)flen && !s->check_mode) {
            r = pms_err(EINVAL, "snapshot %d entry runs past the end of the file", i);
            break;
        }
        uint8_t *buf = malloc(rest + 1);
        if (!buf) { r = pms_err(ENOMEM, "out of memory"); break; }
        r = bdev_file_pread(bs->file, buf, rest, pos);
        if (r < 0) { free(buf); break; }
        pos += rest;
        struct qcow2_snapshot_extra ex;
        memset(&ex, 0, sizeof ex);
        memcpy(&ex, buf, sn->extra_data_size < sizeof ex ? sn->extra_data_size : sizeof ex);
        if (sn->extra_data_size >= 8) sn->vm_state_size = be64toh(ex.vm_state_size_large);
        if (sn->extra_data_size >= 16) sn->disk_size = be64toh(ex.disk_size);
        else sn->disk_size = s->size;
        if (sn->extra_data_size >= 24) sn->icount = be64toh(ex.icount);
        if (sn->extra_data_size > sizeof ex) {
            sn->extra_unknown_size = sn->extra_data_size - (uint32_t)sizeof ex;
            sn->extra_unknown = malloc(sn->extra_unknown_size);
            if (!sn->extra_unknown) { free(buf); r = pms_err(ENOMEM, "out of memory"); break; }
            memcpy(sn->extra_unknown, buf + sizeof ex, sn->extra_unknown_size);
        }
        sn->id_str = strndup((char *)buf + sn->extra_data_size, idl);
        sn->name = strndup((char *)buf + sn->extra_data_size + idl, nml);
        free(buf);
        if (!sn->id_str || !sn->name) { r = pms_err(ENOMEM, "out of memory"); break; }
        if (s->check_mode)
            continue;                   /* the check reports bad L1 tables */
        if ((uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
            r = pms_err(EFBIG, "snapshot '%s' has a too large L1 table", sn->name);
            break;
        }
        if (sn->l1_size && ((sn->l1_table_offset & (s->cluster_size - 1)) ||
                            sn->l1_table_offset < s->cluster_size ||
                            sn->l1_table_offset + (uint64_t)sn->l1_size * 8 > (uint64_t)flen)) {
            r = pms_err(EINVAL, "snapshot '%s' has an invalid L1 table offset %llu", sn->name,
                        (unsigned long long)sn->l1_table_offset);
            break;
        }
    }
    if (r < 0) {
        /* count what we filled for free_snapshots */
        return r;
    }
    s->snapshots_size = pos - s->snapshots_offset;
    return 0;
}

/* Serialise the table; returns malloc'd buffer. */
static uint8_t *build_table(struct qcow2_state *s, struct qcow2_snapshot *snaps, int n,
                            uint64_t *lenp)
{
    uint64_t len = 0;
    for (int i = 0; i < n; i++) {
        uint32_t extra = 24 + snaps[i].extra_unknown_size;
        len += 40 + extra + strlen(snaps[i].id_str) + strlen(snaps[i].name);
        len = (len + 7) & ~7ull;
    }
    uint8_t *buf = calloc(1, len ? len : 8);
    if (!buf) return NULL;
    uint64_t pos = 0;
    for (int i = 0; i < n; i++) {
        struct qcow2_snapshot *sn = &snaps[i];
        uint32_t extra = 24 + sn->extra_unknown_size;
        size_t idl = strlen(sn->id_str), nml = strlen(sn->name);
        struct qcow2_snapshot_header h = {
            .l1_table_offset = htobe64(sn->l1_table_offset),
            .l1_size = htobe32(sn->l1_size),
            .id_str_size = htobe16((uint16_t)idl),
            .name_size = htobe16((uint16_t)nml),
            .date_sec = htobe32(sn->date_sec),
            .date_nsec = htobe32(sn->date_nsec),
            .vm_clock_nsec = htobe64(sn->vm_clock_nsec),
            .vm_state_size = htobe32(sn->vm_state_size > UINT32_MAX ? 0 : (uint32_t)sn->vm_state_size),
            .extra_data_size = htobe32(extra),
        };
        memcpy(buf + pos, &h, sizeof h);
        pos += sizeof h;
        struct qcow2_snapshot_extra ex = {
            htobe64(sn->vm_state_size), htobe64(sn->disk_size), htobe64(sn->icount) };
        memcpy(buf + pos, &ex, sizeof ex);
        pos += sizeof ex;
        if (sn->extra_unknown_size) {
            memcpy(buf + pos, sn->extra_unknown, sn->extra_unknown_size);
            pos += sn->extra_unknown_size;
        }
        memcpy(buf + pos, sn->id_str, idl); pos += idl;
        memcpy(buf + pos, sn->name, nml); pos += nml;
        pos = (pos + 7) & ~7ull;
    }
    (void)s;
    *lenp = len;
    return buf;
}

/* Allocate clusters for a table of snaps[0..n) and write it there: not yet
 * flushed, not yet referenced (a failure frees the clusters again). */
static int table_write(struct bdev *bs, struct qcow2_snapshot *snaps, int n, uint64_t *offp,
                       uint64_t *lenp)
{
    struct qcow2_state *s = QS(bs);
    uint64_t len = 0;
    uint8_t *buf = build_table(s, snaps, n, &len);
    if (!buf) return pms_err(ENOMEM, "out of memory");
    if (len > QCOW2_MAX_SNAPSHOT_TABLE) {
        free(buf);
        return pms_err(EFBIG, "snapshot table too large");
    }
    int64_t off = 0;
    int r = 0;
    if (n) {
        off = qcow2_alloc_clusters(bs, qc_size_to_clusters(s, len));
        if (off < 0) { free(buf); return (int)off; }
        r = qcow2_flush_metadata(bs);
        if (r == 0) r = bdev_file_pwrite(bs->file, buf, len, (uint64_t)off);
        if (r < 0) qcow2_free_clusters(bs, (uint64_t)off, len);
    }
    free(buf);
    *offp = (uint64_t)off;
    *lenp = len;
    return r;
}

/* Point the header at a written and flushed table of n entries, then free
 * the old one.  With `clean` (version 3, end of a create bracket) the same
 * 20-byte write also clears the dirty bit: nb_snapshots, snapshots_offset
 * and incompatible_features are adjacent (bytes 60..79), so the switch and
 * the end of the bracket land together, flushed before returning. */
static int table_switch(struct bdev *bs, int n, uint64_t off, uint64_t len, bool clean)
{
    struct qcow2_state *s = QS(bs);
    clean = clean && s->version >= 3;
    uint64_t incompat = s->incompat & ~QCOW2_INCOMPAT_DIRTY;
    struct { uint32_t nb; uint64_t off; uint64_t incompat; } __attribute__((packed)) h = {
        htobe32((uint32_t)n), htobe64(off), htobe64(incompat) };
    int r = bdev_file_pwrite(bs->file, &h, clean ? 20 : 12, 60);
    if (r == 0) r = clean ? bdev_file_flush(bs->file) : qcow2_barrier(bs);
    if (r < 0) return r;
    if (clean) s->incompat = incompat;
    uint64_t old = s->snapshots_offset, oldlen = s->snapshots_size;
    s->snapshots_offset = off;
    s->snapshots_size = len;
    return oldlen ? qcow2_free_clusters(bs, old, oldlen) : 0;
}

/* Write a new snapshot table for snaps[0..n) and switch the header to it. */
static int write_table(struct bdev *bs, struct qcow2_snapshot *snaps, int n)
{
    uint64_t off, len;
    int r = table_write(bs, snaps, n, &off, &len);
    if (r == 0 && n) r = bdev_file_flush(bs->file);
    return r < 0 ? r : table_switch(bs, n, off, len, false);
}

/* Check repair: write the table again in the current format (every entry
 * with complete extra data, as version 3 requires). */
int qcow2_rewrite_snapshot_table(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    int r = write_table(bs, s->snaps, s->nb_snaps);
    if (r == 0) r = qcow2_flush_metadata(bs);
    for (int i = 0; r == 0 && i < s->nb_snaps; i++)
        s->snaps[i].extra_data_size = 24 + s->snaps[i].extra_unknown_size;
    return r;
}

static int find_snapshot(struct qcow2_state *s, const char *name)
{
    for (int i = 0; i < s->nb_snaps; i++)
        if (strcmp(s->snaps[i].id_str, name) == 0)
            return i;
    for (int i = 0; i < s->nb_snaps; i++)
        if (strcmp(s->snaps[i].name, name) == 0)
            return i;
    return -1;
}

static int read_l1(struct bdev *bs, uint64_t off, uint32_t n, uint64_t **out)
{
    struct qcow2_state *s = QS(bs);
    uint64_t *l1 = calloc(n ? n : 1, 8);
    if (!l1) return pms_err(ENOMEM, "out of memory");
    int r = bdev_file_pread(bs->file, l1, (uint64_t)n * 8, off);
    if (r < 0) { free(l1); return r; }
    int64_t flen = bdev_file_length(bs->file);
    for (uint32_t i = 0; i < n; i++) {
        l1[i] = be64toh(l1[i]);
        uint64_t l2 = l1[i] & L1E_OFFSET_MASK;
        if (l2 && ((l2 & (s->cluster_size - 1)) || l2 >= (uint64_t)flen)) {
            free(l1);
            return qcow2_signal_corruption(bs, "snapshot L1 entry %u points to invalid offset %llu",
                                           i, (unsigned long long)l2);
        }
    }
    *out = l1;
    return 0;
}

static int write_active_l1(struct bdev *bs)
{
    struct qcow2_state *s = QS(bs);
    int r = qcow2_flush_metadata(bs);
    if (r == 0) r = qcow2_write_l1(bs, 0, s->l1_size);
    return r;
}

/* Everything that needs new space (the L1 copy, the new table) is allocated
 * and written before the first refcount changes, so a full disk refuses
 * the snapshot with nothing but a leak; *touched says whether the tree was
 * changed before a failure. */
static int do_create(struct bdev *bs, const char *name, bool *touched)
{
    struct qcow2_state *s = QS(bs);
    *touched = false;
    if (strlen(name) > 65535)
        return pms_err(EINVAL, "snapshot name too long");
    if (find_snapshot(s, name) >= 0)
        return pms_err(EEXIST, "a snapshot named '%s' already exists", name);
    if (s->nb_snaps >= QCOW2_MAX_SNAPSHOTS)
        return pms_err(ENOSPC, "too many snapshots");
    /* A snapshot adds a reference to every cluster the image uses: with
     * 1-bit refcounts that cannot be counted.  Refused before anything is
     * written (found halfway, it left the image for a repair). */
    if (s->refcount_bits == 1)
        for (uint32_t i = 0; i < s->l1_size; i++)
            if (s->l1[i] & L1E_OFFSET_MASK)
                return pms_err(EINVAL, "cannot take an internal snapshot: refcount_bits=1 "
                               "cannot count the second reference a snapshot adds to every "
                               "cluster in use");
    int r = qcow2_drain_pending(bs);
    if (r < 0) return r;
    r = qcow2_flush_metadata(bs);
    if (r < 0) return r;

    unsigned long maxid = 0;
    for (int i = 0; i < s->nb_snaps; i++) {
        unsigned long v = strtoul(s->snaps[i].id_str, NULL, 10);
        if (v > maxid) maxid = v;
    }
    struct qcow2_snapshot sn;
    memset(&sn, 0, sizeof sn);
    /* An ID names the snapshot as well as its name does (lookups take
     * either), so the new ID skips what is already a name: an internal
     * snapshot's, or an external one's (IMG@ID, also one whose delete is
     * pending), else -a/-d ID would name two snapshots. */
    char idbuf[32];
    do
        snprintf(idbuf, sizeof idbuf, "%lu", ++maxid);
    while (find_snapshot(s, idbuf) >= 0 || bdev_extsnap_exists(bs, idbuf) > 0 ||
           bdev_extsnap_delete_pending(bs, idbuf));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    sn.date_sec = (uint32_t)ts.tv_sec;
    sn.date_nsec = (uint32_t)ts.tv_nsec;
    sn.disk_size = s->size;
    sn.icount = 0;                 /* what qemu-img snapshot -c stores */
    sn.l1_size = s->l1_size;

    /* 1. the snapshot's L1 copy: the active L1 without COPIED flags (the
     *    refcount +1 below changes only those flags, never an offset) */
    uint64_t l1bytes = (uint64_t)s->l1_size * 8;
    if (s->l1_size) {
        int64_t off = qcow2_alloc_clusters(bs, qc_size_to_clusters(s, l1bytes));
        if (off < 0) return (int)off;
        r = qcow2_flush_metadata(bs);
        uint64_t *tmp = calloc(1, qc_size_to_clusters(s, l1bytes) << s->cluster_bits);
        if (r == 0 && !tmp) r = pms_err(ENOMEM, "out of memory");
        if (r == 0) {
            for (uint32_t i = 0; i < s->l1_size; i++)
                tmp[i] = htobe64(s->l1[i] & ~QCOW_OFLAG_COPIED);
            r = bdev_file_pwrite(bs->file, tmp, l1bytes, (uint64_t)off);
        }
        free(tmp);
        if (r < 0) {
            qcow2_free_clusters(bs, (uint64_t)off, l1bytes);
            return r;
        }
        sn.l1_table_offset = (uint64_t)off;
    }
    /* 2. the new table with the entry, written but not yet referenced */
    sn.id_str = strdup(idbuf);
    sn.name = strdup(name);
    struct qcow2_snapshot *ns = realloc(s->snaps, (size_t)(s->nb_snaps + 1) * sizeof *ns);
    if (ns) s->snaps = ns;
    uint64_t toff = 0, tlen = 0;
    if (!sn.id_str || !sn.name || !ns)
        r = pms_err(ENOMEM, "out of memory");
    else {
        s->snaps[s->nb_snaps] = sn;
        r = table_write(bs, s->snaps, s->nb_snaps + 1, &toff, &tlen);
    }
    if (r < 0) {
        free(sn.id_str); free(sn.name);
        if (s->l1_size) qcow2_free_clusters(bs, sn.l1_table_offset, l1bytes);
        return r;
    }
    /* 3. refcounts of everything reachable +1, COPIED flags cleared; then
     *    all of it durable before the header points at the new table */
    *touched = true;
    r = qcow2_update_snapshot_refcount(bs, s->l1, s->l1_size, 1);
    if (r == 0) r = write_active_l1(bs);
    if (r == 0) r = qcow2_flush_metadata(bs);
    if (r == 0) r = bdev_file_flush(bs->file);
    /* 4. header switch (on version 3 it also ends the dirty bracket) */
    if (r == 0) r = table_switch(bs, s->nb_snaps + 1, toff, tlen, true);
    if (r < 0) {
        free(sn.id_str); free(sn.name);
        return r;
    }
    s->nb_snaps++;
    return qcow2_flush_metadata(bs);
}

static int do_goto(struct bdev *bs, const char *name)
{
    struct qcow2_state *s = QS(bs);
    int i = find_snapshot(s, name);
    if (i < 0)
        return pms_err(ENOENT, "snapshot '%s' not found", name);
    struct qcow2_snapshot *sn = &s->snaps[i];
    int r = qcow2_drain_pending(bs);
    if (r < 0) return r;
    uint64_t *snl1;
    r = read_l1(bs, sn->l1_table_offset, sn->l1_size, &snl1);
    if (r < 0) return r;
    /* 1. the snapshot's tree gains a reference (the active L1) */
    r = qcow2_update_snapshot_refcount(bs, snl1, sn->l1_size, 1);
    if (r == 0) r = qcow2_flush_metadata(bs);
    if (r == 0 && sn->l1_size > s->l1_size) r = qcow2_grow_l1(bs, sn->l1_size);
    if (r < 0) { free(snl1); return r; }
    /* 2. overwrite the active L1 */
    uint64_t *old = malloc((size_t)s->l1_size * 8 + 8);
    if (!old) { free(snl1); return pms_err(ENOMEM, "out of memory"); }
    memcpy(old, s->l1, (size_t)s->l1_size * 8);
    uint32_t oldn = s->l1_size;
    for (uint32_t k = 0; k < s->l1_size; k++)
        s->l1[k] = k < sn->l1_size ? snl1[k] : 0;
    free(snl1);
    r = write_active_l1(bs);
    if (r == 0 && sn->disk_size != s->size) {
        uint64_t be = htobe64(sn->disk_size);
        r = bdev_file_pwrite(bs->file, &be, 8, 24);
        if (r == 0) { r = qcow2_barrier(bs); s->size = sn->disk_size; bs->size = s->size; }
    }
    /* 3. the old tree loses its reference; 4. COPIED flags of the new tree */
    if (r == 0) r = qcow2_update_snapshot_refcount(bs, old, oldn, -1);
    free(old);
    if (r == 0) r = qcow2_update_snapshot_refcount(bs, s->l1, s->l1_size, 0);
    if (r == 0) r = write_active_l1(bs);
    if (r == 0) r = qcow2_flush_metadata(bs);
    return r;
}

static int do_delete(struct bdev *bs, const char *name)
{
    struct qcow2_state *s = QS(bs);
    int i = find_snapshot(s, name);
    if (i < 0)
        return pms_err(ENOENT, "snapshot '%s' not found", name);
    int r = qcow2_drain_pending(bs);
    if (r < 0) return r;
    struct qcow2_snapshot sn = s->snaps[i];
    uint64_t *snl1;
    r = read_l1(bs, sn.l1_table_offset, sn.l1_size, &snl1);
    if (r < 0) return r;
    r = qcow2_validate_tree(bs, snl1, sn.l1_size);
    if (r < 0) { free(snl1); return r; }
    /* 1. table without the entry */
    struct qcow2_snapshot *rest = malloc((size_t)s->nb_snaps * sizeof *rest + 1);
    if (!rest) { free(snl1); return pms_err(ENOMEM, "out of memory"); }
    int n = 0;
    for (int k = 0; k < s->nb_snaps; k++)
        if (k != i) rest[n++] = s->snaps[k];
    r = write_table(bs, rest, n);
    if (r < 0) { free(rest); free(snl1); return r; }
    free(s->snaps);
    s->snaps = rest;
    s->nb_snaps = n;
    /* 2. its tree and L1 lose their reference */
    r = qcow2_update_snapshot_refcount(bs, snl1, sn.l1_size, -1);
    if (r == 0 && sn.l1_size)
        r = qcow2_free_clusters(bs, sn.l1_table_offset, (uint64_t)sn.l1_size * 8);
    free(snl1);
    free(sn.id_str); free(sn.name); free(sn.extra_unknown);
    /* 3. COPIED flags of the active tree */
    if (r == 0) r = qcow2_update_snapshot_refcount(bs, s->l1, s->l1_size, 0);
    if (r == 0) r = write_active_l1(bs);
    if (r == 0) r = qcow2_flush_metadata(bs);
    return r;
}

/* The dirty bracket.  A snapshot operation changes refcounts and the COPIED
 * flags of the active tree in different clusters, which no write order can
 * make atomic.  On version 3 images the operation therefore runs with the
 * incompatible "dirty" bit set (durably, before the first change): a crash
 * inside leaves an image that every qcow2 implementation (QEMU and us)
 * repairs on its next writable open, instead of one whose stale COPIED
 * flags could let a later writer overwrite a cluster a snapshot still uses.
 * A failed operation leaves the bit set for the same reason. */
static int set_dirty(struct bdev *bs, bool dirty)
{
    struct qcow2_state *s = QS(bs);
    if (s->version < 3)
        return 0;
    int r = qcow2_flush_metadata(bs);
    if (r < 0) return r;
    uint64_t v = dirty ? (s->incompat | QCOW2_INCOMPAT_DIRTY) : (s->incompat & ~QCOW2_INCOMPAT_DIRTY);
    s->lazy_dirty = false;      /* the bracket owns the bit now */
    uint64_t be = htobe64(v);
    r = bdev_file_pwrite(bs->file, &be, 8, 72);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r == 0) s->incompat = v;
    return r;
}

static int bracket(struct bdev *bs, const char *name, int (*op)(struct bdev *, const char *))
{
    struct qcow2_state *s = QS(bs);
    int r = set_dirty(bs, true);
    if (r < 0) return r;
    s->relaxed = s->version >= 3;
    r = op(bs, name);
    s->relaxed = false;
    if (r < 0) {
        /* nothing changed when the operation refused up front; any other
         * failure (a full disk, an I/O error) may have stopped half-way */
        if (r == -EEXIST || r == -ENOENT)
            set_dirty(bs, false);
        return r;
    }
    return set_dirty(bs, false);
}

/* Refuse a corrupt tree before the bracket, so a refusal writes nothing. */
static int validate_snapshot(struct bdev *bs, int i)
{
    struct qcow2_state *s = QS(bs);
    uint64_t *l1;
    int r = read_l1(bs, s->snaps[i].l1_table_offset, s->snaps[i].l1_size, &l1);
    if (r < 0) return r;
    r = qcow2_validate_tree(bs, l1, s->snaps[i].l1_size);
    free(l1);
    return r;
}

/* Tables allocated since the last flush may not be in the file yet: make
 * the file complete before validating against its length. */
static int settle(struct bdev *bs)
{
    int r = qcow2_drain_pending(bs);
    return r < 0 ? r : qcow2_flush_metadata(bs);
}

/* Create on version 3: three flushes when no write is pending, up to five
 * after writes that allocated tables or freed clusters.
 *   1. dirty bit written; flush: it is durable together with every data
 *      cluster written since the last flush (the caller's pending writes).
 *   (settle: pending metadata written back; refcount updates need no order
 *      inside the bracket, but a new L2 table is flushed before the L1 entry
 *      pointing at it (qcow2_flush_metadata), and clusters freed here are
 *      flushed free before anything can reuse them.)
 *   2. L1 copy and new table written, refcounts +1, COPIED cleared, with no
 *      order among them; flush.
 *   3. one 20-byte header write switches the table and clears the dirty bit;
 *      flush.  Freeing the old table afterwards can only leak.
 * What the bracket relaxes is refcount ordering only (a repair rebuilds
 * refcounts); a pointer is never durable before what it points at.
 * Data-before-L2 still holds: step 1 makes all data durable before any
 * L2 entry that points at it is written.  do_create allocates and writes
 * the L1 copy and the new table before the first refcount change, so a
 * refusal after step 1 (a corrupt tree, a full disk) flushes the consistent
 * metadata and clears the bit again, leaving at most a leak. */
static int create_v3(struct bdev *bs, const char *name)
{
    struct qcow2_state *s = QS(bs);
    uint64_t v = htobe64(s->incompat | QCOW2_INCOMPAT_DIRTY);
    s->lazy_dirty = false;      /* the bracket owns the bit now */
    int r = bdev_file_pwrite(bs->file, &v, 8, 72);
    if (r == 0) r = bdev_file_flush(bs->file);
    if (r < 0) return r;
    s->incompat |= QCOW2_INCOMPAT_DIRTY;
    s->relaxed = true;
    bool frees = s->npending > 0;
    r = settle(bs);
    bool touched = r < 0;       /* metadata written out of order, maybe half-way */
    /* clusters freed by settle may be allocated again below: the tables
     * that stopped pointing at them must be durable first */
    if (r == 0 && frees)
        r = bdev_file_flush(bs->file);
    touched = touched || r < 0;
    if (r == 0)
        r = qcow2_validate_tree(bs, s->l1, s->l1_size);
    if (r == 0)
        r = do_create(bs, name, &touched);
    s->relaxed = false;
    /* a failure after the tree changed keeps the bit set for the repair;
     * before it (a refusal, a full disk) the metadata is consistent */
    if (r < 0 && !touched && bdev_file_flush(bs->file) == 0)
        set_dirty(bs, false);
    return r;
}

int qcow2_snapshot_create(struct bdev *bs, const char *name)
{
    struct qcow2_state *s = QS(bs);
    if (find_snapshot(s, name) >= 0)
        return pms_err(EEXIST, "a snapshot named '%s' already exists", name);
    if (strlen(name) > 65535)
        return pms_err(EINVAL, "snapshot name too long");
    if (s->nb_snaps >= QCOW2_MAX_SNAPSHOTS)
        return pms_err(ENOSPC, "too many snapshots");
    if (s->version >= 3)
        return create_v3(bs, name);
    int r = settle(bs);
    if (r == 0) r = qcow2_validate_tree(bs, s->l1, s->l1_size);
    bool touched;
    return r < 0 ? r : do_create(bs, name, &touched);
}

int qcow2_snapshot_goto(struct bdev *bs, const char *name)
{
    struct qcow2_state *s = QS(bs);
    int i = find_snapshot(s, name);
    if (i < 0)
        return pms_err(ENOENT, "snapshot '%s' not found", name);
    int r = settle(bs);
    if (r == 0) r = validate_snapshot(bs, i);
    if (r == 0) r = qcow2_validate_tree(bs, s->l1, s->l1_size);
    return r < 0 ? r : bracket(bs, name, do_goto);
}

int qcow2_snapshot_delete(struct bdev *bs, const char *name)
{
    int i = find_snapshot(QS(bs), name);
    if (i < 0)
        return pms_err(ENOENT, "snapshot '%s' not found", name);
    int r = settle(bs);
    if (r == 0) r = validate_snapshot(bs, i);
    return r < 0 ? r : bracket(bs, name, do_delete);
}

int qcow2_snapshot_list(struct bdev *bs, struct pms_snapshot_info **list, size_t *np)
{
    struct qcow2_state *s = QS(bs);
    *list = NULL;
    *np = 0;
    if (!s->nb_snaps) return 0;
    struct pms_snapshot_info *l = calloc((size_t)s->nb_snaps, sizeof *l);
    if (!l) return pms_err(ENOMEM, "out of memory");
    for (int i = 0; i < s->nb_snaps; i++) {
        struct qcow2_snapshot *sn = &s->snaps[i];
        snprintf(l[i].id, sizeof l[i].id, "%s", sn->id_str);
        l[i].name = strdup(sn->name);
        if (!l[i].name) { pms_snapshot_list_free(l, (size_t)i); return pms_err(ENOMEM, "out of memory"); }
        l[i].vm_state_size = sn->vm_state_size;
        l[i].date_sec = sn->date_sec;
        l[i].date_nsec = sn->date_nsec;
        l[i].vm_clock_nsec = sn->vm_clock_nsec;
        l[i].disk_size = sn->disk_size;
        l[i].has_icount = sn->icount != UINT64_MAX;
        l[i].icount_lo = (uint32_t)sn->icount;
        l[i].icount_hi = (uint32_t)(sn->icount >> 32);
    }
    *list = l;
    *np = (size_t)s->nb_snaps;
    return 0;
}

/* Adjacent ranges merged before the callback sees them, clipped at end. */
struct merge {
    uint64_t s, l, end;
    bdev_range_fn fn;
    void *opaque;
};

static int merge_add(struct merge *g, uint64_t o, uint64_t l)
{
    if (o >= g->end)
        return 0;
    if (o + l > g->end)
        l = g->end - o;
    if (g->l && g->s + g->l == o) {
        g->l += l;
        return 0;
    }
    int r = g->l ? g->fn(g->opaque, g->s, g->l) : 0;
    g->s = o;
    g->l = l;
    return r;
}

/* Report every guest range whose mapping differs between the active L1 and
 * snapshot `name`'s (conservatively: a range may be reported that holds the
 * same bytes, never the other way round).  An L1 entry pointing at the same
 * L2 table in both means the same mappings: a shared table is copied before
 * any change.  Otherwise the two tables are compared entry by entry, COPIED
 * flags aside.  Reads only metadata; bs->lock held. */
int qcow2_snapshot_changed(struct bdev *bs, const char *name, bdev_range_fn fn, void *opaque)
{
    struct qcow2_state *s = QS(bs);
    int i = find_snapshot(s, name);
    if (i < 0)
        return pms_err(ENOENT, "snapshot '%s' not found", name);
    struct qcow2_snapshot *sn = &s->snaps[i];
    uint64_t *snl1;
    int r = read_l1(bs, sn->l1_table_offset, sn->l1_size, &snl1);
    if (r < 0)
        return r;
    uint8_t *copy = malloc(s->cluster_size);
    if (!copy) {
        free(snl1);
        return pms_err(ENOMEM, "out of memory");
    }
    uint64_t per_l2 = 1ull << s->l2_bits, span = per_l2 << s->cluster_bits;
    struct merge g = { .end = s->size > sn->disk_size ? s->size : sn->disk_size,
                       .fn = fn, .opaque = opaque };
    uint32_t n = s->l1_size > sn->l1_size ? s->l1_size : sn->l1_size;
    for (uint32_t k = 0; k < n && r == 0; k++) {
        uint64_t a = k < s->l1_size ? s->l1[k] & L1E_OFFSET_MASK : 0;
        uint64_t b = k < sn->l1_size ? snl1[k] & L1E_OFFSET_MASK : 0;
        if (a == b)
            continue;
        if (!a || !b) {
            r = merge_add(&g, (uint64_t)k * span, span);
            continue;
        }
        uint8_t *t;
        if ((r = qcow2_cache_get(bs, &s->l2_cache, b, &t)) < 0)
            break;
        memcpy(copy, t, s->cluster_size);
        if ((r = qcow2_cache_get(bs, &s->l2_cache, a, &t)) < 0)
            break;
        for (uint64_t j = 0; j < per_l2 && r == 0; j++) {
            uint64_t ea = qcow2_l2_get(s, t, j) & ~QCOW_OFLAG_COPIED;
            uint64_t eb = qcow2_l2_get(s, copy, j) & ~QCOW_OFLAG_COPIED;
            if (ea != eb || (s->l2_entry_size == 16 &&
                             qcow2_l2_get_bitmap(s, t, j) != qcow2_l2_get_bitmap(s, copy, j)))
                r = merge_add(&g, ((uint64_t)k * per_l2 + j) << s->cluster_bits,
                              s->cluster_size);
        }
    }
    if (r == 0 && g.l)
        r = fn(opaque, g.s, g.l);
    free(copy);
    free(snl1);
    return r < 0 ? r : 0;
}
