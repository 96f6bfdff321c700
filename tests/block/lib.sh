# Shared helpers for the block shell tests.  Source after setting TT (the
# pms-testtool path, passed as $1 by meson).
#
# PMS is the tool used for our side: the pmemsnap CLI when it answers --help,
# else pms-testtool (same syntax).  PMS_USE_TESTTOOL=1 forces the test tool.
set -u
TT=${1:?usage: $0 PMS_TESTTOOL}
TT=$(readlink -f "$TT")
SRCDIR_BLOCK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HAVE_CLI=0
if [ -z "${PMS_USE_TESTTOOL:-}" ] && [ -n "${PMEMSNAP:-}" ] && [ -x "$PMEMSNAP" ] &&
   "$PMEMSNAP" --help >/dev/null 2>&1; then
    HAVE_CLI=1
    PMS=$PMEMSNAP
else
    PMS=$TT
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/pms-block.XXXXXX")
trap 'rm -rf "$T"' EXIT
cd "$T" || exit 1
FAILS=0
PY=/usr/bin/python3; [ -x $PY ] || PY=python3   # the pyenv shim costs ~0.7 s a start
NTESTS=0
FAILED_NAMES=()
echo "# using $( [ $HAVE_CLI = 1 ] && echo "CLI $PMS" || echo "test tool $PMS")"

fail() {
    FAILS=$((FAILS + 1))
    FAILED_NAMES+=("$CASE")
    echo "FAIL [$CASE]: $*"
}
ok() { echo "ok   [$CASE]${1:+ $1}"; }
begin() { CASE=$1; NTESTS=$((NTESTS + 1)); }

# run CMD...: run quietly; on failure report the command and its output.
run() {
    local out
    if ! out=$("$@" 2>&1); then
        fail "command failed: $* :: $(echo "$out" | tail -n 5)"
        return 1
    fi
}

# same_raw IMG [QEMU_FMT]: qemu-img's raw image == ours, byte for byte.
same_raw() {
    local img=$1 fmt=${2:-qcow2}
    rm -f q.raw p.raw
    if ! qemu-img convert -f "$fmt" -O raw "$img" q.raw 2>err.txt; then
        fail "qemu-img convert $img: $(cat err.txt)"; return 1
    fi
    if ! "$PMS" convert -f "$fmt" -O raw "$img" p.raw >out.txt 2>&1; then
        fail "our convert -O raw $img: $(tail -n 5 out.txt)"; return 1
    fi
    local d
    if ! d=$(cmp q.raw p.raw 2>&1); then
        fail "content differs from qemu-img ($img): $d ($(cmp -l q.raw p.raw 2>/dev/null | wc -l) bytes differ; first: $(cmp -l q.raw p.raw 2>/dev/null | head -n 3 | tr '\n' ' '))"
        return 1
    fi
}

# qcheck IMG: qemu-img check exits 0.
qcheck() {
    local out rc
    out=$(qemu-img check "$1" 2>&1); rc=$?
    if [ $rc -ne 0 ]; then
        fail "qemu-img check $1 exit $rc: $(echo "$out" | head -n 12 | tr '\n' '|')"
        return 1
    fi
}

# snaplist TOOL IMG: "id name" lines from a snapshot -l listing (qemu-img's
# table or a tool's tab-separated list).
snaplist() {
    "$@" 2>/dev/null | awk 'NR==1 && /Snapshot list/ {next} /^ID[ \t]/ {next} NF>=2 {print $1, $2}'
}

# map_json_cmp IMG: our map --output=json equals qemu-img's (CLI only).
map_cmp() {
    [ $HAVE_CLI = 1 ] || return 0
    qemu-img map --output=json "$1" > qmap.json 2>err.txt || { fail "qemu-img map: $(cat err.txt)"; return 1; }
    if ! "$PMS" map --output=json "$1" > pmap.json 2>err.txt; then
        fail "our map --output=json $1: $(tail -n 3 err.txt)"; return 1
    fi
    local d
    if ! d=$($PY - qmap.json pmap.json <<'PY'
import json, sys
q = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2]))
keys = ("start", "length", "depth", "present", "zero", "data", "offset")
norm = lambda l: [{k: e.get(k) for k in keys} for e in l]
if norm(q) != norm(p):
    for a, b in zip(norm(q), norm(p)):
        if a != b:
            print("qemu", a, "ours", b); break
    else:
        print("lengths", len(q), len(p))
    sys.exit(1)
PY
    ); then
        fail "map differs from qemu-img map ($1): $d"
        return 1
    fi
}

# info_cmp IMG: our info --output=json agrees with qemu-img's on the fields
# that describe the format.
info_cmp() {
    qemu-img info --output=json "$1" > qinfo.json 2>err.txt || { fail "qemu-img info: $(cat err.txt)"; return 1; }
    "$PMS" info --output=json "$1" > pinfo.json 2>err.txt || { fail "our info --output=json: $(tail -n 3 err.txt)"; return 1; }
    local d
    if ! d=$($PY - qinfo.json pinfo.json <<'PY'
import json, sys
q = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2]))
bad = []
for k in ("virtual-size", "cluster-size", "format", "backing-filename", "backing-filename-format"):
    if q.get(k) != p.get(k):
        bad.append("%s: qemu %r ours %r" % (k, q.get(k), p.get(k)))
qd = q.get("format-specific", {}).get("data", {})
pd = p.get("format-specific", {}).get("data", {})
for k in ("compat", "refcount-bits", "extended-l2", "compression-type", "lazy-refcounts", "corrupt"):
    if k in qd and qd.get(k) != pd.get(k):
        bad.append("format-specific.%s: qemu %r ours %r" % (k, qd.get(k), pd.get(k)))
if bad:
    print("; ".join(bad)); sys.exit(1)
PY
    ); then
        fail "info differs: $d"; return 1
    fi
}

finish() {
    echo "# $NTESTS cases, $FAILS failures${FAILED_NAMES[*]:+: ${FAILED_NAMES[*]}}"
    [ "$FAILS" -eq 0 ]
    exit $?
}

# play SIDE IMG SCRIPT: run a scenario script (see model.py) on IMG, either
# with our tool (SIDE=ours) or with qemu-io/qemu-img (SIDE=qemu).
play() {
    local side=$1 img=$2 script=$3 line ios=() w
    flush_io() {
        [ ${#ios[@]} -gt 0 ] || return 0
        if [ $side = ours ]; then run "$PMS" io "${ios[@]}" "$img" || return 1
        else run qemu-io "${ios[@]}" "$img" || return 1; fi
        ios=()
    }
    while IFS= read -r line; do
        line=${line%%#*}
        read -r -a w <<< "$line"
        [ ${#w[@]} -gt 0 ] || continue
        case ${w[0]} in
            io) ios+=(-c "${w[*]:1}") ;;
            snap-c|snap-a|snap-d)
                flush_io || return 1
                local f=-${w[0]#snap-}
                if [ $side = ours ]; then run "$PMS" snapshot $f "${w[1]}" "$img" || return 1
                else run qemu-img snapshot $f "${w[1]}" "$img" || return 1; fi ;;
            *) fail "bad script line: $line"; return 1 ;;
        esac
    done < "$script"
    flush_io
}

# qverify IMG SIZE SCRIPT [model args]: qemu-io read -P of every known run.
qverify() {
    local img=$1 size=$2 script=$3; shift 3
    local args=() l out
    while IFS= read -r l; do [ -n "$l" ] && args+=(-c "$l"); done < <($PY "$SRCDIR_BLOCK/model.py" "$size" "$script" "$@")
    if ! out=$(qemu-io -r -U "${args[@]}" "$img" 2>&1); then
        fail "qemu-io read -P on $img: $(echo "$out" | grep -m3 -i 'fail\|error' | tr '\n' '|')"
        return 1
    fi
}
