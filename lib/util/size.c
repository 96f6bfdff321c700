#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "size.h"

int pms_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s || *s == '-' || isspace((unsigned char)*s))
        return -EINVAL;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (end == s)
        return -EINVAL;
    if (errno == ERANGE)
        return -ERANGE;
    double frac = 0;
    if (*end == '.') {           /* "1.5G" */
        char *e2;
        frac = strtod(end, &e2);
        end = e2;
    }
    unsigned shift = 0;
    switch (*end) {
    case 'b': case 'B': if (end[1] == '\0') { end++; } break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    case 'p': case 'P': shift = 50; end++; break;
    case 'e': case 'E': shift = 60; end++; break;
    default: break;
    }
    if (shift && (*end == 'i') && end[1] == 'B') end += 2;
    else if (shift && (*end == 'B' || *end == 'b')) end++;
    if (*end != '\0')
        return -EINVAL;
    if (shift && v > (UINT64_MAX >> shift))
        return -ERANGE;
    uint64_t r = (uint64_t)v << shift;
    if (frac > 0) {
        if (!shift) return -EINVAL;
        r += (uint64_t)(frac * (double)(1ULL << shift));
    }
    *out = r;
    return 0;
}

void pms_fmt_size(uint64_t v, char *buf, size_t len)
{
    static const char *units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
    int u = 0;
    double d = (double)v;
    while (d >= 1024 && u < 6) { d /= 1024; u++; }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", v);
    else if (d == (double)(uint64_t)d)
        snprintf(buf, len, "%.0f %s", d, units[u]);
    else
        snprintf(buf, len, "%.3g %s", d, units[u]);
}
