/* CLI clients of a running `pmemsnap serve`:
 *   pmemsnap snapshot -l | -c NAME | -a NAME | -d NAME --socket SOCK [--vm]
 *                     [--kind K | --external]
 *   pmemsnap stats --socket SOCK [--output=human|json]
 * They speak QMP to the daemon's control socket (vmqmp.c) and print what
 * the local commands print (the snapshot table of `snapshot -l`).
 * Single threaded.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "cli.h"
#include "serve.h"

/* A snapshot of a VM (savevm-sized) may take minutes on a slow disk. */
#define CLIENT_TIMEOUT_MS 900000

static int connect_or_fail(const char *sock, struct vmqmp **q)
{
    char m[512];
    if (vmqmp_connect(sock, VMQMP_TIMEOUT_MS, q, m, sizeof m) < 0) {
        errorf("%s", m);
        return -1;
    }
    return 0;
}

static int64_t geti(json_object *o, const char *k)
{
    json_object *v;
    return json_object_is_type(o, json_type_object) && json_object_object_get_ex(o, k, &v) &&
           json_object_is_type(v, json_type_int) ? json_object_get_int64(v) : 0;
}

static void print_table(json_object *l)
{
    bool ext = false;                        /* KIND and LAYER columns, as snapshot -l */
    for (size_t i = 0; i < json_object_array_length(l); i++) {
        json_object *v;
        ext |= json_object_object_get_ex(json_object_array_get_idx(l, i), "file", &v);
    }
    printf("Snapshot list:\n");
    printf("%-10s%-17s%8s%20s%13s%11s", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    printf(ext ? "  %-9s%s\n" : "\n", "KIND", "LAYER");
    for (size_t i = 0; i < json_object_array_length(l); i++) {
        json_object *o = json_object_array_get_idx(l, i);
        char size[64], date[64] = "", clk[128];
        struct tm tm;
        time_t t = (time_t)geti(o, "date-sec");
        if (localtime_r(&t, &tm))
            strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
        int64_t secs = geti(o, "vm-clock-sec");
        snprintf(clk, sizeof clk, "%02d:%02d:%02d.%03d", (int)(secs / 3600),
                 (int)((secs / 60) % 60), (int)(secs % 60),
                 (int)((geti(o, "vm-clock-nsec") / 1000000) % 1000));
        size_to_str((uint64_t)geti(o, "vm-state-size"), size, sizeof size);
        printf("%-9s %-16s %8s%20s%13s%11s",
               json_member_str(o, "id") ? json_member_str(o, "id") : "",
               json_member_str(o, "name") ? json_member_str(o, "name") : "",
               size, date, clk, "");
        if (ext)
            printf("  %-9s%s", json_member_str(o, "kind") ? json_member_str(o, "kind") : "",
                   json_member_str(o, "file") ? json_member_str(o, "file") : "");
        printf("\n");
    }
}

int cmd_snapshot_remote(int argc, char **argv)
{
    static const struct option lo[] = {
        { "socket", required_argument, NULL, 's' },
        { "vm", no_argument, NULL, 'v' },
        { "kind", required_argument, NULL, 'k' },
        { "external", no_argument, NULL, 'e' },      /* as the local form: --kind external */
        { NULL, 0, NULL, 0 },
    };
    const char *sock = NULL, *name = NULL, *kind = NULL;
    int action = 0, vm = 0, ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":la:c:d:q", lo, NULL)) != -1) {
        switch (ch) {
        case 's': sock = optarg; break;
        case 'v': vm = 1; break;
        case 'k':
        case 'e':
        {
            const char *k = ch == 'e' ? "external" : optarg;
            if (kind && strcmp(kind, k))
                return usage_error("snapshot kinds '%s' and '%s' contradict each other "
                                   "(--kind, --external)", kind, k);
            kind = k;
            break;
        }
        case 'q': break;
        case 'l': case 'a': case 'c': case 'd':
            if (action)
                return usage_error("Cannot mix '-l', '-a', '-c', '-d'");
            action = ch;
            name = optarg;
            break;
        default: return getopt_error("snapshot", ch, argv, lo);
        }
    }
    if (optind < argc)
        return usage_error("snapshot --socket takes no image file ('%s')", argv[optind]);
    if (!sock)
        return usage_error("snapshot: --socket SOCK is required here");
    if (!action)
        action = 'l';
    if (kind && action != 'c')
        return usage_error("--kind/--external is only valid with -c");
    if (vm && action == 'l')
        return usage_error("--vm is not valid with -l");
    struct vmqmp *q;
    if (connect_or_fail(sock, &q) < 0)
        return 1;
    static const char *const cmds[] = { ['l'] = "snapshot-list", ['c'] = "snapshot-create",
                                        ['a'] = "snapshot-revert", ['d'] = "snapshot-delete" };
    json_object *args = NULL, *ret = NULL;
    if (action != 'l') {
        args = json_object_new_object();
        json_object_object_add(args, "name", json_object_new_string(name));
        if (vm)
            json_object_object_add(args, "vm", json_object_new_boolean(1));
        if (kind)
            json_object_object_add(args, "kind", json_object_new_string(kind));
    }
    char m[600];
    int r = vmqmp_exec(q, cmds[action], args, &ret, CLIENT_TIMEOUT_MS, m, sizeof m);
    vmqmp_close(q);
    if (r < 0) {
        static const char *const what[] = { ['l'] = "list snapshots", ['c'] = "create snapshot",
                                            ['a'] = "apply snapshot", ['d'] = "delete snapshot" };
        if (strstr(m, DONE_BUT_PAUSED))
            errorf("%s", m);            /* it was done: only the resume failed */
        else if (action == 'l')
            errorf("Could not %s: %s", what[action], m);
        else
            errorf("Could not %s '%s': %s", what[action], name, m);
        return 1;
    }
    if (action == 'l' && !json_object_is_type(ret, json_type_array)) {
        errorf("Could not list snapshots: the daemon's answer is not a list");
        json_object_put(ret);
        return 1;
    }
    if (action == 'l' && json_object_array_length(ret))
        print_table(ret);
    json_object_put(ret);
    return 0;
}

int cmd_stats(int argc, char **argv)
{
    static const struct option lo[] = {
        { "socket", required_argument, NULL, 's' },
        { "output", required_argument, NULL, 'o' },
        { NULL, 0, NULL, 0 },
    };
    const char *sock = NULL;
    int json = 0, ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, ":", lo, NULL)) != -1) {
        switch (ch) {
        case 's': sock = optarg; break;
        case 'o':
            if ((json = parse_output(optarg)) < 0)
                return 1;
            break;
        default: return getopt_error("stats", ch, argv, lo);
        }
    }
    if (optind < argc)
        return usage_error("stats: unexpected argument '%s'", argv[optind]);
    if (!sock)
        return usage_error("stats: --socket SOCK is required");
    struct vmqmp *q;
    if (connect_or_fail(sock, &q) < 0)
        return 1;
    json_object *ret = NULL;
    char m[600];
    int r = vmqmp_exec(q, "query-stats", NULL, &ret, VMQMP_TIMEOUT_MS, m, sizeof m);
    vmqmp_close(q);
    if (r < 0) {
        errorf("query-stats: %s", m);
        return 1;
    }
    if (!json_object_is_type(ret, json_type_object)) {
        errorf("query-stats: the daemon's answer is not an object");
        json_object_put(ret);
        return 1;
    }
    if (json)
        printf("%s\n", json_object_to_json_string_ext(ret, JSON_C_TO_STRING_PRETTY |
                                                          JSON_C_TO_STRING_SPACED));
    else {
        json_object_object_foreach(ret, k, v)
            printf("%s: %s\n", k, json_object_get_string(v));
    }
    json_object_put(ret);
    return 0;
}
