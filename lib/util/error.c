/* Thread-local error message.  See error.h. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include "pmemsnap.h"
#include "error.h"

#define MSG_MAX 1024
static __thread char msg[MSG_MAX];

int pms_err(int err, const char *fmt, ...)
{
    /* format into a local buffer: an argument may be pms_err_get() itself */
    char tmp[MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    memcpy(msg, tmp, sizeof msg);
    return err > 0 ? -err : (err == 0 ? -EIO : err);
}

void pms_err_prefix(const char *func)
{
    char tmp[MSG_MAX];
    size_t n = strlen(func);
    if (strncmp(msg, func, n) == 0 && msg[n] == ':')
        return;
    memcpy(tmp, msg, sizeof tmp);
    int k = snprintf(msg, sizeof msg, "%s: ", func);
    if (k > 0 && (size_t)k < sizeof msg)
        snprintf(msg + k, sizeof msg - (size_t)k, "%.*s", (int)(sizeof msg - (size_t)k - 1),
                 tmp[0] ? tmp : "failed");
}

void pms_err_clear(void) { msg[0] = '\0'; }
const char *pms_err_get(void) { return msg; }
const char *pms_errmsg(void) { return msg; }
