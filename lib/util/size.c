#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "size.h"

/* qemu_strtosz() semantics: a decimal or 0x hex integer (never octal), an
 * optional decimal fraction (only with a multiplier), one suffix letter, and
 * unless strict the trailing "B"/"iB" after a multiplier that pmemsnap(1)
 * documents.  No exponents, no hex fractions, no wrap-around. */
int pms_parse_size_ex(const char *s, uint64_t *out, bool strict)
{
    if (!s || !(*s >= '0' && *s <= '9'))
        return -EINVAL;
    const char *p = s;
    bool hex = p[0] == '0' && (p[1] == 'x' || p[1] == 'X');
    if (hex && !isxdigit((unsigned char)p[2]))
        return -EINVAL;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(p, &end, hex ? 16 : 10);
    if (errno == ERANGE)
        return -ERANGE;
    if (errno || end == p)
        return -EINVAL;
    p = end;
    double frac = 0;
    if (*p == '.') {
        if (hex)
            return -EINVAL;
        const char *f = p++;
        while (*p >= '0' && *p <= '9')
            p++;
        char tmp[64];
        if ((size_t)(p - f) >= sizeof tmp)
            return -EINVAL;
        memcpy(tmp, f, (size_t)(p - f));
        tmp[p - f] = '\0';
        frac = strtod(tmp, NULL);      /* ".", ".5": digits only, in [0, 1] */
    }
    unsigned shift = 0;
    switch (*p) {
    case 'b': case 'B': shift = 0; p++; break;
    case 'k': case 'K': shift = 10; p++; break;
    case 'm': case 'M': shift = 20; p++; break;
    case 'g': case 'G': shift = 30; p++; break;
    case 't': case 'T': shift = 40; p++; break;
    case 'p': case 'P': shift = 50; p++; break;
    case 'e': case 'E': shift = 60; p++; break;
    default: break;
    }
    if (shift && !strict) {
        if (p[0] == 'i' && p[1] == 'B')
            p += 2;
        else if (*p == 'B' || *p == 'b')
            p++;
    }
    if (*p)
        return -EINVAL;
    if (frac > 0 && !shift)
        return -EINVAL;
    if (v > (UINT64_MAX >> shift))
        return -ERANGE;
    uint64_t r = (uint64_t)v << shift;
    if (frac > 0) {
        double add = frac * (double)(1ULL << shift);   /* <= 2^60 */
        uint64_t a = (uint64_t)add;
        if (a > UINT64_MAX - r)
            return -ERANGE;
        r += a;
    }
    *out = r;
    return 0;
}

int pms_parse_size(const char *s, uint64_t *out)
{
    return pms_parse_size_ex(s, out, false);
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
