/* Error reporting: one channel.  Every failing function returns a negative
 * errno and leaves a message in a thread-local buffer (pms_errmsg()).
 * pms_err() formats "FUNC: message"; a deeper layer that already set a
 * message may be wrapped by the API function with pms_err_prefix().
 * Threads: the buffer is thread-local; no locking. */
#ifndef PMS_UTIL_ERROR_H
#define PMS_UTIL_ERROR_H

#include <errno.h>

/* Set the message; returns -err (err given as positive errno). */
int pms_err(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefix the current message with "FUNC: " (used once, by the API layer). */
void pms_err_prefix(const char *func);
/* Clear the message. */
void pms_err_clear(void);
/* Raw message without the API prefix (for internal callers). */
const char *pms_err_get(void);

#define PMS_API_ERR(ret) do { if ((ret) < 0) pms_err_prefix(__func__); } while (0)

#endif
