#!/bin/bash
# A newcomer's first commands: `make`, `make all` and `make install
# PREFIX=...` get their build dependencies the way `make check` does
# (scripts/deps.sh: apt-get as root, else the exact apt-get line and stop),
# and `make install` leaves a usable installation: the tool, the header,
# the libraries, pmemsnap.pc and the man page, against which a small
# program compiles with `pkg-config --cflags --libs pmemsnap` and links
# the shared library, which exports no internal symbol.
# A fresh Debian machine is simulated with stubs in front of PATH:
# dpkg-query reports meson missing, id -u says root or not, apt-get logs.
set -u
ROOT=${1:?usage: make.sh SOURCE_ROOT}
fail() { echo "FAIL: $*" >&2; exit 1; }
for t in make cc pkg-config qemu-img qemu-io; do
    command -v $t >/dev/null || fail "$t not found"
done
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-make.XXXXXX")
trap 'rm -rf "$T"' EXIT
mkdir "$T/stub"
cat >"$T/stub/dpkg-query" <<'STUB'
#!/bin/bash
p=${!#}
if [[ " $FAKE_MISSING " == *" $p "* ]]; then echo -n "unknown ok not-installed"; else echo -n "install ok installed"; fi
STUB
cat >"$T/stub/id" <<'STUB'
#!/bin/bash
if [ "${1:-}" = -u ]; then echo "$FAKE_UID"; else exec /usr/bin/id "$@"; fi
STUB
cat >"$T/stub/apt-get" <<'STUB'
#!/bin/bash
echo "$*" >>"$FAKE_APT_LOG"
STUB
chmod +x "$T/stub"/*
export FAKE_MISSING="meson zlib1g-dev" FAKE_APT_LOG=$T/apt.log
unset PMS_SKIP_DEPS MAKEFLAGS MFLAGS MAKELEVEL
mk() { PATH=$T/stub:$PATH make --no-print-directory -C "$ROOT" BUILD="$T/build" "$@"; }

# 1. not root, packages missing: every building target prints the apt-get
#    line and stops before meson runs
for target in "" all install; do
    rc=0
    FAKE_UID=1000 mk $target PREFIX="$T/prefix" >"$T/out" 2>&1 || rc=$?
    [ $rc != 0 ] || fail "make $target succeeded with meson missing: $(cat "$T/out")"
    grep -q "apt-get install -y meson zlib1g-dev" "$T/out" ||
        fail "make $target did not print the apt-get line: $(cat "$T/out")"
    [ ! -e "$T/build" ] || fail "make $target ran meson although its dependencies were missing"
    [ ! -e "$FAKE_APT_LOG" ] || fail "make $target ran apt-get without root"
    echo "make ${target:-(default)} without root: stops with the apt-get line"
done

# 2. root: make install installs the missing packages first, then builds
#    and installs
rc=0
FAKE_UID=0 mk install PREFIX="$T/prefix" >"$T/out" 2>&1 || rc=$?
[ $rc = 0 ] || fail "make install exit $rc: $(tail -30 "$T/out")"
grep -q "install .*meson zlib1g-dev" "$FAKE_APT_LOG" ||
    fail "make install did not apt-get install the missing packages: $(cat "$FAKE_APT_LOG" 2>&1)"
P=$T/prefix
[ -x "$P/bin/pmemsnap" ] || fail "no bin/pmemsnap"
cmp -s "$P/include/pmemsnap.h" "$ROOT/include/pmemsnap.h" || fail "include/pmemsnap.h missing or different"
[ -f "$P/share/man/man1/pmemsnap.1" ] || [ -f "$P/share/man/man1/pmemsnap.1.gz" ] ||
    fail "no man page: $(find "$P" -name 'pmemsnap.1*')"
pc=$(find "$P" -name pmemsnap.pc)
[ -n "$pc" ] || fail "no pmemsnap.pc under $P"
so=$(find "$P" -name 'libpmemsnap.so' | head -1)
[ -n "$so" ] || fail "no libpmemsnap.so under $P"
[ -n "$(find "$P" -name libpmemsnap.a)" ] || fail "no libpmemsnap.a under $P"
echo "installed: $(cd "$P" && find . -type f -o -type l | sort | tr '\n' ' ')"

# 3. a program built with pkg-config against the installed library
export PKG_CONFIG_PATH=$(dirname "$pc")
flags=$(pkg-config --cflags --libs pmemsnap) || fail "pkg-config --cflags --libs pmemsnap failed"
libdir=$(pkg-config --variable=libdir pmemsnap)
cat >"$T/hello.c" <<'C'
#include <pmemsnap.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv)
{
    pms_dev *d;
    char buf[4096];
    memset(buf, 0x5c, sizeof buf);
    if (pms_create(argv[1], 1 << 20, NULL) < 0 || pms_open(argv[1], NULL, &d) < 0 ||
        pms_pwrite(d, buf, sizeof buf, 8192) < 0 || pms_close(d) < 0) {
        fprintf(stderr, "%s\n", pms_errmsg());
        return 1;
    }
    return argc > 2;
}
C
cc -o "$T/hello" "$T/hello.c" $flags -Wl,-rpath,"$libdir" 2>"$T/cc.err" ||
    fail "cc with pkg-config flags ($flags): $(cat "$T/cc.err")"
ldd "$T/hello" | grep -q "libpmemsnap.so.* => $libdir/" ||
    fail "hello does not load the installed shared library: $(ldd "$T/hello")"
"$T/hello" "$T/h.qcow2" || fail "hello failed"
out=$(qemu-io -f qcow2 -c "read -P 0x5c 8192 4096" -c "read -P 0 0 8192" "$T/h.qcow2" 2>&1) ||
    fail "qemu-io: $out"
grep -qi "fail\|error" <<<"$out" && fail "qemu-io: $out"
qemu-img check -q "$T/h.qcow2" || fail "qemu-img check of hello's image"
# internals are not part of the shared library's ABI
printf '%s\n' 'int qcow2_create(void); int main(void) { return qcow2_create(); }' >"$T/bad.c"
cc -o "$T/bad" "$T/bad.c" -L"$libdir" -lpmemsnap -Wl,-rpath,"$libdir" 2>/dev/null &&
    fail "a program calling the internal qcow2_create links against the installed libpmemsnap.so"
"$P/bin/pmemsnap" info "$T/h.qcow2" >/dev/null || fail "installed pmemsnap info"
echo ok
