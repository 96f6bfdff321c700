/* Internal interfaces of the memory device (lib/mem). */
#ifndef PMS_MEM_INT_H
#define PMS_MEM_INT_H

#include <signal.h>

/* Real-time signal used to park application threads (see safepoint.c). */
#define PMS_SP_SIGNAL (SIGRTMIN + 6)

int  pms_sp_init(void);
/* Stop all threads but the caller and exempt ones; 0, -EAGAIN on timeout. */
int  pms_sp_stop(unsigned timeout_ms);
void pms_sp_release(void);
/* Register (add=1) / unregister the calling thread as a library thread. */
void pms_sp_exempt(int add);
/* Thread id that failed to park in the last failed pms_sp_stop. */
int  pms_sp_stuck_tid(void);

#endif
