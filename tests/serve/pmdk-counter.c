/* pmdk-counter: a libpmemobj program for the serve tests.  The pool's root
 * holds a counter and a list; each transaction increments the counter and
 * pushes a node holding the new value, so a consistent pool always has
 * list length == counter and values counter, counter-1, ..., 1.
 *
 *   pmdk-counter create POOL          create the pool on an existing file
 *   pmdk-counter run POOL N PROGRESS  N transactions (0: until stdin has
 *                                     input); after each commit the counter
 *                                     is written to the file PROGRESS; prints
 *                                     "counter C tx/s R"
 *   pmdk-counter check POOL           verify the invariant; print "counter C"
 */
#include <err.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <libpmemobj.h>

#define LAYOUT "pmemsnap-counter"

struct node { uint64_t value; PMEMoid next; };
struct root { uint64_t counter; uint64_t len; PMEMoid head; };

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        errx(2, "usage: see the comment at the top");
    const char *cmd = argv[1], *path = argv[2];
    PMEMobjpool *pop;
    if (strcmp(cmd, "create") == 0) {
        if (!(pop = pmemobj_create(path, LAYOUT, 0, 0600)))
            errx(1, "pmemobj_create %s: %s", path, pmemobj_errormsg());
        pmemobj_close(pop);
        return 0;
    }
    if (!(pop = pmemobj_open(path, LAYOUT)))
        errx(1, "pmemobj_open %s: %s", path, pmemobj_errormsg());
    PMEMoid ro = pmemobj_root(pop, sizeof(struct root));
    struct root *r = pmemobj_direct(ro);
    if (!r)          /* a pool whose bytes did not survive (seen on other exports) */
        errx(1, "pmemobj_root %s: %s", path, pmemobj_errormsg());
    if (strcmp(cmd, "check") == 0) {
        uint64_t n = 0, expect = r->counter;
        for (PMEMoid o = r->head; !OID_IS_NULL(o); n++) {
            struct node *nd = pmemobj_direct(o);
            if (nd->value != expect - n)
                errx(1, "node %llu holds %llu, expected %llu", (unsigned long long)n,
                     (unsigned long long)nd->value, (unsigned long long)(expect - n));
            o = nd->next;
        }
        if (n != r->counter || r->len != r->counter)
            errx(1, "counter %llu, len %llu, list %llu", (unsigned long long)r->counter,
                 (unsigned long long)r->len, (unsigned long long)n);
        printf("counter %llu\n", (unsigned long long)r->counter);
        pmemobj_close(pop);
        return 0;
    }
    if (strcmp(cmd, "run") == 0 && argc >= 5) {
        long n = atol(argv[3]);
        int pfd = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (pfd < 0)
            err(1, "%s", argv[4]);
        double t0 = now();
        long done = 0;
        for (;; done++) {
            if (n > 0 && done >= n)
                break;
            if (n == 0 && done % 16 == 0) {
                struct pollfd p = { .fd = 0, .events = POLLIN };
                if (poll(&p, 1, 0) > 0)
                    break;
            }
            volatile int fail = 0;   /* set after the longjmp of an abort */
            TX_BEGIN(pop) {
                PMEMoid no = pmemobj_tx_alloc(sizeof(struct node), 1);
                struct node *nd = pmemobj_direct(no);
                pmemobj_tx_add_range(ro, 0, sizeof(struct root));
                nd->value = r->counter + 1;
                nd->next = r->head;
                r->head = no;
                r->counter++;
                r->len++;
            } TX_ONABORT {
                fail = 1;
            } TX_END
            if (fail)
                errx(1, "transaction aborted: %s", pmemobj_errormsg());
            char b[32];
            int l = snprintf(b, sizeof b, "%llu\n", (unsigned long long)r->counter);
            if (pwrite(pfd, b, (size_t)l, 0) != l)
                err(1, "progress");
        }
        double dt = now() - t0;
        printf("counter %llu tx/s %.0f\n", (unsigned long long)r->counter, done / (dt > 0 ? dt : 1));
        pmemobj_close(pop);
        return 0;
    }
    errx(2, "unknown command %s", cmd);
}
