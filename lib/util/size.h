/* Number and size parsing shared by the library options and the CLI.
 * Pure functions; any thread. */
#ifndef PMS_UTIL_SIZE_H
#define PMS_UTIL_SIZE_H
#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>
/* "64k", "1M", "1.5G", "0x1000", "512" as qemu_strtosz reads them (bytes;
 * suffixes k/K M G T P E are powers of 1024; unless strict, an optional
 * trailing 'B' or 'iB' after a suffix).  Returns 0 or -EINVAL / -ERANGE. */
int pms_parse_size_ex(const char *s, uint64_t *out, bool strict);
int pms_parse_size(const char *s, uint64_t *out);
/* Human form like qemu-img: "64 KiB", "1 GiB", "1.5 MiB". */
void pms_fmt_size(uint64_t v, char *buf, size_t len);
#endif
