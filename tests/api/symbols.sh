#!/bin/bash
# The shared library's ABI is what pmemsnap.h says: nm -D --defined-only on
# the built libpmemsnap.so must list exactly the functions the header
# declares (each under the version node PMEMSNAP_1) and nothing else.
set -u
LIB=${1:?usage: symbols.sh LIBPMEMSNAP.SO HEADER}
HDR=${2:?usage: symbols.sh LIBPMEMSNAP.SO HEADER}
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v nm >/dev/null || fail "nm (binutils) not found"
[ -f "$LIB" ] || fail "no library $LIB"
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-sym.XXXXXX")
trap 'rm -rf "$T"' EXIT
nm -D --defined-only "$LIB" >"$T/nm" 2>&1 || fail "nm -D $LIB: $(cat "$T/nm")"
# "ADDR TYPE NAME@@VERSION"; the version node itself is an absolute (A) symbol
awk '$2 != "A" { print $3 }' "$T/nm" | sort -u >"$T/versioned"
sed 's/@.*//' "$T/versioned" | sort -u >"$T/exported"
awk '$2 == "A" { print $3 }' "$T/nm" | sort -u >"$T/nodes"
grep -E '^[a-z_].*[ *]pms_[a-z0-9_]+\(' "$HDR" | grep -oE 'pms_[a-z0-9_]+\(' | tr -d '(' |
    sort -u >"$T/declared"
[ -s "$T/declared" ] || fail "no function declarations found in $HDR"
extra=$(comm -23 "$T/exported" "$T/declared")
missing=$(comm -13 "$T/exported" "$T/declared")
[ -z "$extra" ] || fail "$LIB exports symbols pmemsnap.h does not declare:" $extra
[ -z "$missing" ] || fail "$LIB does not export functions pmemsnap.h declares:" $missing
grep -qx PMEMSNAP_1 "$T/nodes" || fail "no version node PMEMSNAP_1 in $LIB: $(cat "$T/nodes")"
# every exported function carries the version
unversioned=$(grep -v '@@PMEMSNAP_1$' "$T/versioned")
[ -z "$unversioned" ] || fail "exports without version PMEMSNAP_1:" $unversioned
echo "ok: $(wc -l <"$T/exported") symbols, all declared in pmemsnap.h, version PMEMSNAP_1"
