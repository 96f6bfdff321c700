# QEMU 7.2's own iotests against `pmemsnap io` (sourced by run.sh, fast.sh).
#
# The QEMU source comes from Debian's source package (`apt-get source qemu`,
# bookworm: 7.2), fetched with a private apt configuration so the system's
# sources are untouched, and cached in $IOT_CACHE (default <repo>/.cache,
# ignored by git).  A run happens in its own work directory: `check` is a
# link to QEMU's (so TEST_DIR, the timing cache and *.out.bad stay there)
# and `qemu-io` a link to our binary, which then behaves as `pmemsnap io`
# (multi-call).  The other programs (qemu-img, qemu-nbd, ...) are QEMU's:
# they are the oracle the scripts compare against.

IOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IOT_REPO=$(cd "$IOT_DIR/../.." && pwd)
IOT_CACHE=${IOT_CACHE:-$IOT_REPO/.cache}
# Debian's bookworm archive (the machine reaches Debian's mirrors)
IOT_MIRROR=${IOT_MIRROR:-http://deb.debian.org/debian}

iot_log() { echo "iotests: $*" >&2; }

# Prints the path of tests/qemu-iotests of QEMU 7.2; fetches it if needed.
# Returns 1 (with a message) when it cannot.
iot_fetch() {
    local c=$IOT_CACHE/qemu-src src
    mkdir -p "$c" || return 1
    exec 9>"$c/.lock"
    flock 9
    src=$(ls -d "$c"/qemu-7.2*/tests/qemu-iotests 2>/dev/null | head -n1)
    if [ -n "$src" ] && [ -x "$src/check" ]; then
        echo "$src"; exec 9>&-; return 0
    fi
    if ! command -v apt-get >/dev/null; then
        iot_log "apt-get not found: cannot fetch the QEMU 7.2 source package"
        exec 9>&-; return 1
    fi
    local a=$c/apt
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/parts"
    cat > "$a/parts/bookworm-src.sources" <<SRC
Types: deb-src
URIs: $IOT_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    local o=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$a/parts"
             -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache"
             -o "APT::Sandbox::User=root" -q)
    iot_log "fetching the QEMU 7.2 source package from $IOT_MIRROR (once; cached in $c)"
    if ! apt-get "${o[@]}" update > "$c/fetch.log" 2>&1; then
        iot_log "apt-get update failed (see $c/fetch.log)"
        exec 9>&-; return 1
    fi
    local dl=(--download-only)
    command -v dpkg-source >/dev/null && dl=()
    if ! (cd "$c" && apt-get "${o[@]}" source "${dl[@]}" qemu) >> "$c/fetch.log" 2>&1; then
        iot_log "apt-get source qemu failed (see $c/fetch.log)"
        exec 9>&-; return 1
    fi
    if [ ${#dl[@]} -gt 0 ]; then       # no dpkg-source: the upstream tarball
        local t
        t=$(ls "$c"/qemu_7.2*.orig.tar.* 2>/dev/null | head -n1)
        [ -n "$t" ] && (cd "$c" && tar -xf "$t" --wildcards '*/tests/qemu-iotests/*' \
                        >> "$c/fetch.log" 2>&1)
    fi
    src=$(ls -d "$c"/qemu-7.2*/tests/qemu-iotests 2>/dev/null | head -n1)
    exec 9>&-
    if [ -z "$src" ]; then
        iot_log "the source package is not QEMU 7.2 (see $c/fetch.log)"
        return 1
    fi
    echo "$src"
}

# iot_check SRC WORKDIR IO_PROG JOBS TEST... : runs QEMU's check for qcow2,
# prints "TEST STATUS" lines (pass, fail, not run).
iot_check() {
    local src=$1 w=$2 io=$3 jobs=$4
    shift 4
    rm -rf "$w"
    mkdir -p "$w/scratch"
    ln -s "$src/check" "$w/check"
    ln -s "$io" "$w/qemu-io"
    (cd "$w" && QEMU_IO_PROG=$w/qemu-io QEMU_IMG_PROG=$(command -v qemu-img) \
        QEMU_PROG=$(command -v qemu-system-x86_64) QEMU_NBD_PROG=$(command -v qemu-nbd) \
        QSD_PROG=$(command -v qemu-storage-daemon) TEST_DIR=$w/scratch \
        nice -n 10 ./check -j "$jobs" -qcow2 "$@" > "$w/check.log" 2>&1)
    tr '\r' '\n' < "$w/check.log" |
        sed -nE 's/(^|.*[[:space:]])([A-Za-z0-9_-]+) +(pass|fail|not run) +\[.*/\2 \3/p' |
        sed 's/ not run$/ notrun/'
}

# The tests of the set (tests.txt without comments).
iot_set() {
    sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$IOT_DIR/tests.txt" | awk '{print $1}'
}
