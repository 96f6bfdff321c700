/* Internal interfaces of the memory device (lib/mem). */
#ifndef PMS_MEM_INT_H
#define PMS_MEM_INT_H

#include <signal.h>

/* The safepoint (safepoint.c) parks application threads with a real-time
 * signal: SIGRTMIN + this offset unless that one is taken or blocked, or
 * PMEMSNAP_SIGNAL names another (see safepoint.c, pmemsnap.h). */
#define PMS_SP_SIGNAL_DEFAULT_OFFSET 6

/* Choose the signal and install the handler (once per process); 0, or
 * -errno with a message (no free signal, PMEMSNAP_SIGNAL invalid or taken). */
int  pms_sp_init(void);
/* The signal in use; 0 before a successful pms_sp_init. */
int  pms_sp_signal(void);
/* Stop all threads but the caller, exempt ones and kernel workers (io_uring,
 * vhost); 0, else -errno with a message and nothing left stopped: -EAGAIN a
 * thread did not park within timeout_ms, -EBUSY our handler was replaced,
 * -ENOMEM, or the error reading /proc/self/task. */
int  pms_sp_stop(unsigned timeout_ms);
void pms_sp_release(void);
/* Register (add=1) / unregister the calling thread as a library thread;
 * 0, or -ENOMEM with a message (registering only). */
int  pms_sp_exempt(int add);
/* Thread id that failed to park in the last failed pms_sp_stop. */
int  pms_sp_stuck_tid(void);

#endif
