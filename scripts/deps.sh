#!/bin/bash
# Install the Debian packages named on the command line that are missing.
# As root: apt-get update once, then apt-get install -y.  Otherwise print
# the exact command to run and stop (exit 1): the make target that asked
# cannot work without them.  PMS_SKIP_DEPS=1 skips the check (a machine
# that is not Debian, or tools installed some other way).
if [ -n "${PMS_SKIP_DEPS:-}" ]; then
    exit 0
fi
if ! command -v dpkg-query >/dev/null; then
    echo "deps: no dpkg-query (not Debian?); make sure these are installed: $*" >&2
    echo "deps: then run make with PMS_SKIP_DEPS=1" >&2
    exit 1
fi
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then
    echo "deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
        echo "deps: apt-get install failed" >&2; exit 1; }
else
    echo "deps: missing Debian packages; run as root (or with sudo):" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    echo "deps: or set PMS_SKIP_DEPS=1 if they are installed some other way" >&2
    exit 1
fi
