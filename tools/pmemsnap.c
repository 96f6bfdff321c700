/* pmemsnap: command-line tool.
 *
 * `pmemsnap COMMAND [options] ...` — the commands follow qemu-img and
 * qemu-io conventions (same options, same output lines, same exit codes) so
 * that scripts written for QEMU's tools run unchanged:
 *
 *   create, info, check, snapshot, map, resize, convert  (cmd-img.c)
 *   bench                                                (cmd-bench.c)
 *   io                                                   (cmd-io.c, qemu-io)
 *
 * This file only handles --help/--version and dispatches.  Every command
 * returns its exit code; errors are one line on stderr, "pmemsnap: ...".
 * A command never writes to an image it failed to open or refused.
 *
 * Multi-call (as busybox): run through a link whose name is in `applets`
 * (e.g. `qemu-io -> pmemsnap`), the binary behaves as that command and
 * names itself after the link in its messages, so QEMU's own test scripts
 * can use it as $QEMU_IO_PROG.  To add a command, add a row to `cmds`; to
 * add a link name, a row to `applets`.
 */
#include <stdbool.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include "cli.h"
#include "serve/serve.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *synopsis;
} cmds[] = {
    { "create", cmd_create,
      "create [-q] [-f qcow2|raw] [-o OPTIONS] [-b BACKING [-F FMT]] [-u] FILE [SIZE]" },
    { "info", cmd_info,
      "info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE" },
    { "check", cmd_check,
      "check [-q] [-f FMT] [-r leaks|all] [--output=human|json] [-U] FILE" },
    { "snapshot", cmd_snapshot,
      "snapshot [-q] [-f FMT] [-U] -l | -c NAME [--external] | -a NAME | -d NAME [-p] FILE" },
    { "map", cmd_map,
      "map [-f FMT] [--output=human|json] [--start-offset=OFF] [--max-length=LEN] [-U] FILE" },
    { "resize", cmd_resize,
      "resize [-q] [-f FMT] [--shrink] [--preallocation=off] FILE [+|-]SIZE" },
    { "convert", cmd_convert,
      "convert [-c] [-p] [-q] [-n] [-f FMT] [-O qcow2|raw] [-o OPTIONS] [-t CACHE] [-T CACHE] [-U] SRC DST" },
    { "io", cmd_io,
      "io [-f FMT] [-r] [-n] [-s] [-C] [-t CACHE] [-i AIO] [-U] [--image-opts] [-c CMD]... [FILE]" },
    { "serve", cmd_serve,
      "serve [-f FMT] [--qmp VM_SOCK] [--vmstate NODE] [--qmp-timeout MS] [--cache-size SIZE] [--backing-dir DIR] [--allow-other] [--writeback-cache] [--threads N] [--foreground] [--pidfile F] [--log F] IMAGE --fuse FILE --socket SOCK\n"
      "  snapshot -l | -c NAME [--kind internal|external | --external] | -a NAME | -d NAME --socket SOCK [--vm]" },
    { "stats", cmd_stats, "stats --socket SOCK [--output=human|json]" },
    { "bench", cmd_bench,
      "bench [-c COUNT] [-d DEPTH] [-f FMT] [-n] [-i AIO] [-o OFF] [--pattern=N] [-q] [-s SIZE] [-S STEP] [-t CACHE] [-w] [--flush-interval=N] [--no-drain] [-U] FILE" },
};

/* Link name -> command run as if `pmemsnap COMMAND` had been typed. */
static const struct {
    const char *link;
    const char *cmd;
} applets[] = {
    { "qemu-io", "io" },
};

static int run_cmd(size_t i, int argc, char **argv, bool applet)
{
    for (int k = 1; k < argc; k++)
        if (strcmp(argv[k], "--help") == 0 || strcmp(argv[k], "-h") == 0) {
            /* as an applet the command word is the program's name */
            const char *syn = cmds[i].synopsis;
            if (applet && strncmp(syn, cmds[i].name, strlen(cmds[i].name)) == 0)
                syn += strlen(cmds[i].name) + (syn[strlen(cmds[i].name)] == ' ');
            printf("Usage: %s %s\n", progname, syn);
            return 0;
        }
    if (cmds[i].fn == cmd_snapshot)    /* a running daemon's snapshots */
        for (int k = 1; k < argc; k++)
            if (strncmp(argv[k], "--socket", 8) == 0)
                return cmd_snapshot_remote(argc, argv);
    return cmds[i].fn(argc, argv);
}

static int find(const char *name)
{
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (strcmp(name, cmds[i].name) == 0)
            return (int)i;
    return -1;
}

static void help(void)
{
    printf("Usage: %s COMMAND [OPTIONS] ...\n"
           "Disk images (qcow2, raw) as persistent memory; qemu-img/qemu-io compatible tool.\n\n"
           "Commands:\n", progname);
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        printf("  %s\n", cmds[i].synopsis);
    printf("\nSIZE and offsets accept k, M, G, T, P, E suffixes (powers of 1024).\n"
           "Exit status: 0 success, 1 error; check also 2 (corruptions), 3 (leaks),\n"
           "63 (format cannot be checked).  See pmemsnap(1).\n");
}

int main(int argc, char **argv)
{
    /* a file-size limit (ulimit -f) fails the write with EFBIG, reported
     * with the file's name, instead of killing us between two writes */
    signal(SIGXFSZ, SIG_IGN);
    const char *base = argc > 0 && argv[0] ? strrchr(argv[0], '/') : NULL;
    base = base ? base + 1 : argc > 0 && argv[0] ? argv[0] : "";
    for (size_t i = 0; i < sizeof applets / sizeof applets[0]; i++)
        if (strcmp(base, applets[i].link) == 0) {
            progname = applets[i].link;
            return run_cmd((size_t)find(applets[i].cmd), argc, argv, true);
        }
    if (argc < 2)
        return usage_error("missing command");
    const char *c = argv[1];
    if (strcmp(c, "--help") == 0 || strcmp(c, "-h") == 0 || strcmp(c, "help") == 0) {
        help();
        return 0;
    }
    if (strcmp(c, "--version") == 0 || strcmp(c, "-V") == 0) {
        printf("%s version %d.%d (qemu-img/qemu-io 7.2 compatible)\n", progname,
               PMS_VERSION_MAJOR, PMS_VERSION_MINOR);
        return 0;
    }
    int i = find(c);
    if (i >= 0)
        return run_cmd((size_t)i, argc - 1, argv + 1, false);
    return usage_error("unknown command '%s'", c);
}
