/* QEMU-style block options for `pmemsnap io`: key=value lists, json:{...}
 * and blkdebug: filenames, flattened to dotted keys and resolved to the one
 * format-over-file stack pms_open() opens.  See blkopts.c. */
#ifndef PMS_BLKOPTS_H
#define PMS_BLKOPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bo_kv {
    char *key, *val;
};
struct blkopts {
    struct bo_kv *v;
    size_t n;
};

/* What pms_open() gets: pointers into the blkopts (valid until bo_free). */
struct bo_target {
    const char *filename;
    const char *format;        /* NULL: probe (or the -f given) */
    bool readonly;             /* in: how the image is opened (error wording) */
    bool cor;                  /* a copy-on-read filter node is in the graph */
    bool compress;             /* a compress filter node: every write is compressed */
    /* A blkdebug rule on the one event the tool itself produces, a
     * copy-on-read write ("cor_write"): its writes fail with cor_errno
     * when they touch cor_sector (-1: any), once or every time. */
    bool cor_rule;
    int64_t cor_sector;
    int cor_errno;
    bool cor_once;
    /* a blkdebug rule on event l2_update (every time): errno, 0 = none */
    int l2_update_errno;
};

int bo_parse_keyval(struct blkopts *o, const char *s, char *err, size_t errlen);
int bo_parse_json(struct blkopts *o, const char *s, char *err, size_t errlen);
/* A filename: "json:{...}", "blkdebug:[CONF]:FILE" or a plain path (key
 * "filename"); the top node's driver decides where a blkdebug: name goes. */
int bo_parse_filename(struct blkopts *o, const char *name, char *err, size_t errlen);
int bo_set(struct blkopts *o, const char *key, const char *val);
const char *bo_get(const struct blkopts *o, const char *key);
bool bo_has_prefix(const struct blkopts *o, const char *prefix);
void bo_free(struct blkopts *o);
/* 0, or -1 with QEMU's wording of why the graph cannot be opened. */
int bo_resolve(const struct blkopts *o, struct bo_target *t, char *err, size_t errlen);

#endif
