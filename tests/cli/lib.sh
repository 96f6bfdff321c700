# Shared helpers for the CLI tests (sourced).  Each test gets a scratch dir
# that is removed on exit; `fail` prints one line and exits 1.
set -u
: "${PMEMSNAP:?PMEMSNAP must point at the pmemsnap binary}"
P=$(realpath "$PMEMSNAP")
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-cli.XXXXXX")
trap 'rm -rf "$T"' EXIT
cd "$T" || exit 1
export TZ=UTC
nfail=0
fail() { echo "FAIL: $*"; nfail=$((nfail + 1)); }
pass() { echo "ok: $*"; }
finish() { [ "$nfail" -eq 0 ] && { echo "all passed"; exit 0; }; echo "$nfail failures"; exit 1; }

# expect_rc WANT DESC cmd...: run, compare exit code; output kept in out/err
expect_rc() {
    local want=$1 desc=$2; shift 2
    "$@" >out 2>err
    local rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "$desc: exit $rc, want $want ($(head -c 300 err))"
        return 1
    fi
    pass "$desc"
}

# Timing numbers are the only nondeterministic part of qemu-io's output.
norm_io() {
    sed -E 's/[0-9]+\.[0-9]+ sec \(.*\)$/TIME/; s/^[0-9]+,[0-9]+,[0-9:.]+,.*$/CSV/; s/^qemu-io: /pmemsnap: /'
}
# qemu-img's file name in its output -> ours
same() { # same DESC FILE_A FILE_B
    if cmp -s "$2" "$3"; then pass "$1"; else fail "$1"; diff "$2" "$3" | head -20; fi
}
