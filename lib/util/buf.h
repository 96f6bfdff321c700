/* Byte-buffer helpers shared by the library and the CLI.  Pure functions;
 * any thread. */
#ifndef PMS_UTIL_BUF_H
#define PMS_UTIL_BUF_H
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

/* Are all n bytes at p zero?  (Compares the buffer with itself shifted by
 * one byte: memcmp's vectorised loop, no zero page needed.) */
static inline bool pms_buf_is_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    return n == 0 || (b[0] == 0 && memcmp(b, b + 1, n - 1) == 0);
}
#endif
