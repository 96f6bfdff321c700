/* pmemsnap CLI: declarations shared by the command files.
 *
 * Layout (nbdkit-like): pmemsnap.c parses the global options and dispatches
 * on the first word; each cmd-*.c implements one family of commands as
 * `int cmd_<name>(int argc, char **argv)` returning the process exit code.
 * util.c holds what several commands need: error printing, size parsing,
 * qemu-style number formatting, a tiny JSON writer that prints keys in the
 * same order as QEMU 7.2's QDict (so `--output=json` is byte-identical),
 * and the open helper.
 *
 * The tool uses only the public API in include/pmemsnap.h (sizes are parsed
 * here, as qemu_strtosz() does).  Single threaded except `bench`.
 */
#ifndef PMS_CLI_H
#define PMS_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include "pmemsnap.h"

extern const char *progname;          /* "pmemsnap" */

/* Print "pmemsnap: <msg>\n" to stderr. */
void errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Usage error: message + "Try 'pmemsnap --help' ..." hint; returns 1. */
int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
struct option;
/* After getopt_long() returned '?' or ':' (optstring starts with ':'): one
 * usage line naming the bad option as getopt would; returns 1. */
int getopt_error(const char *cmd, int ch, char **argv, const struct option *lo);
/* The library's last message without a leading "pms_xxx: " prefix. */
const char *libmsg(void);

/* Sizes: "64k", "1M", "1.5G", "0x1000" (k/M/G/T/P/E powers of 1024; decimal,
 * never octal).  0 or -1. */
int parse_size(const char *s, uint64_t *out);
/* With qemu_strtosz()'s error codes and the strict form (qemu-io's cvtnum
 * refuses the "B"/"iB" tail): pms_parse_size_ex() in util/size.h. */
/* Plain non-negative integer (decimal or 0x); 0 or -1. */
int parse_uint(const char *s, uint64_t *out);
/* qemu's size_to_str(): "%0.3g" with KiB/MiB/... ("324 KiB", "0 B"). */
void size_to_str(uint64_t v, char *buf, size_t len);
/* qemu-io's cvtstr(): "%.3f" with ".000" trimmed ("64 KiB", "1.062 MiB"). */
void cvtstr(double v, char *buf, size_t len);
/* Cache mode name (none, writeback, writethrough, unsafe, directsync). */
int parse_cache_mode(const char *s, int *mode);
/* "--output=json" style: 0 human, 1 json, -1 invalid (error printed). */
int parse_output(const char *s);

/* qemu-img info's "Format specific information:" block of a qcow2 image. */
void print_qcow2_specific(const struct pms_info *info);
/* Set by check: opens are for pms_check (pms_open_opts.check). */
extern bool open_for_check;
/* Open helper: fmt may be NULL (probe).  Prints the error and returns NULL. */
pms_dev *open_image(const char *path, const char *fmt, bool readonly,
                    int cache_mode, bool no_backing, bool force_share);
/* Same without printing (pms_errmsg() has the reason). */
pms_dev *open_quiet(const char *path, const char *fmt, bool readonly, int cache_mode,
                    bool no_backing, bool force_share);
/* Close, report a failure; returns 0 or -1. */
int close_image(pms_dev *dev);
/* Close after a command that ends with exit status rc: when rc says it
 * failed (its error printed), the close's own error, which can only repeat
 * it, is not printed.  Returns rc, or 1 when only the close failed. */
int close_after(pms_dev *dev, int rc);

/* Would creating path conflict with QEMU-style image locks another open
 * file description holds?  Prints the error and returns 1, else 0. */
int target_in_use(const char *path);

/* Bytes the host file system has allocated for path (qemu "actual-size"). */
int64_t host_allocated(const char *path);

/* ---- JSON writer -------------------------------------------------------- */
/* Objects print their members in QEMU's QDict iteration order (hash bucket
 * order, most recently inserted first inside a bucket), values as QEMU's
 * pretty printer does, so output is byte-identical to qemu-img's. */
enum jtype { J_OBJ, J_ARR, J_STR, J_INT, J_BOOL };
struct jval;
struct jval *jobj(void);
struct jval *jarr(void);
struct jval *jstr(const char *s);
struct jval *jint(int64_t v);
struct jval *jbool(bool b);
/* Add to an object (key copied) or append to an array (key NULL). */
struct jval *jadd(struct jval *parent, const char *key, struct jval *v);
void jprint(FILE *f, const struct jval *v);   /* pretty, trailing newline */
void jfree(struct jval *v);

/* ---- commands ----------------------------------------------------------- */
int cmd_create(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_io(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_resize(int argc, char **argv);

#endif
