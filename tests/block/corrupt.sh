#!/bin/bash
# Corrupted-image suite: every command that opens an image, run over a set of
# deliberately damaged qcow2 files (tests/block/corrupt-gen.py), with QEMU's
# qemu-img as the oracle.
#
# usage: corrupt.sh [TOOL] [CASE...]
#   TOOL   program with the CLI's command syntax (default: $PMEMSNAP when it
#          implements the commands, else the corrupt-open test program)
#   CASE   only these cases (names from corrupt-gen.py)
# env: CORRUPT_JOBS (parallel cases, default nproc, at most 4),
#      CORRUPT_KEEP=1 keeps the scratch directory.
#
# For every case and command:
#   - no crash: exit status < 128, no sanitizer report, done within 10 s;
#   - a failing command prints at most one line on stderr (check excepted:
#     its findings go to stderr as with qemu-img);
#   - read-only commands never change the file;
#   - where qemu-img refuses to open the image, every command fails;
#   - reads (io read, convert) that succeed return what qemu-img reads, and
#     fail where qemu-img's read fails;
#   - check: when both complete, same exit status, same counters as
#     `qemu-img check --output=json` and the same ERROR/Leaked lines;
#   - check -r leaks / -r all (on a copy) leave no leaks / a clean image as
#     qemu-img check sees it, when they report success, and never change
#     the guest data;
#   - io write / snapshot -c (on a copy) either fail or take effect.
# Differences that are allowed (we refuse where QEMU copes) print NOTE lines.
set -u
export LC_ALL=C
CORRUPT_OPEN=${1:-}
shift || true
ONLY=("$@")

if [ -n "${PMEMSNAP:-}" ] && [ -x "$PMEMSNAP" ] && "$PMEMSNAP" --help 2>&1 | grep -q convert; then
    T=$PMEMSNAP
elif [ -n "$CORRUPT_OPEN" ]; then
    T=$CORRUPT_OPEN
else
    echo "corrupt.sh: no tool (neither \$PMEMSNAP with commands nor corrupt-open)" >&2
    exit 1
fi
# Raw data on stdout from "io read" (corrupt-open) or qemu-io style text (CLI)?
RAWREAD=0
[ "$T" = "$CORRUPT_OPEN" ] && RAWREAD=1
command -v qemu-img >/dev/null || { echo "SKIP: qemu-img not installed"; exit 77; }
GEN=${SRCDIR:-$(dirname "$0")/..}/block/corrupt-gen.py
[ -f "$GEN" ] || GEN=$(dirname "$0")/corrupt-gen.py
JOBS=${CORRUPT_JOBS:-$(nproc 2>/dev/null || echo 2)}
[ "$JOBS" -gt 4 ] && JOBS=4

W=$(mktemp -d "${TMPDIR:-/tmp}/pms-corrupt.XXXXXX")
[ -n "${CORRUPT_KEEP:-}" ] || trap 'rm -rf "$W"' EXIT
python3 "$GEN" "$W/img" "${ONLY[@]}" || { echo "FAIL: generator"; exit 1; }
head -c 4096 /dev/zero | tr '\0' '\315' >"$W/pattern-4k"

# ---- one case (runs in a subshell; output to $W/res/CASE.log) -------------
one_case() {
    case=$1
    # copies live next to the original so that relative backing names resolve
    local img=$W/img/$case.qcow2 D=$W/c/$case copy=$W/img/$case.copy.qcow2
    mkdir -p "$D"
    cp "$img" "$D/pristine"
    fail() { echo "FAIL [$case] $*"; }
    note() { echo "NOTE [$case] $*"; }

    # run NAME LABEL CMD... : $D/NAME.out, $D/NAME.err, rc
    run() {
        local n=$1 label=$2 line nl=0
        shift 2
        timeout 30 "$@" >"$D/$n.out" 2>"$D/$n.err"
        rc=$?
        [ $rc -eq 124 ] && fail "$label: timed out"
        [ $rc -ge 128 ] && [ $rc -ne 124 ] && fail "$label: crashed (exit $rc)"
        while IFS= read -r line; do
            nl=$((nl + 1))
            if [[ $line =~ Sanitizer|runtime\ error: ]]; then
                fail "$label: sanitizer report: $line"
                break
            fi
        done <"$D/$n.err"
        if [ $rc -ne 0 ] && [ "$label" != check ] && [ $nl -gt 1 ]; then
            fail "$label: $nl lines on stderr: $(head -c 200 "$D/$n.err" | tr '\n' '|')"
        fi
        return 0
    }
    unchanged() {
        cmp -s "$img" "$D/pristine" || { fail "$1 modified the image"; cp "$D/pristine" "$img"; }
    }
    first_line() { local l; IFS= read -r l <"$1"; echo "$l"; }

    (qemu-img info -f qcow2 "$img") >/dev/null 2>&1   # (QEMU 7.2 crashes on one case)
    qopen=$?
    if [ $qopen -ge 128 ]; then
        note "qemu-img info crashes (exit $qopen); treated as a refusal"
    fi

    # ---- info, map, snapshot -l -----------------------------------------
    run info info "$T" info -f qcow2 "$img"
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "info succeeded, qemu-img refuses the image"
    run map map "$T" map -f qcow2 "$img"
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "map succeeded, qemu-img refuses the image"
    run snapl "snapshot -l" "$T" snapshot -f qcow2 -l "$img"
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "snapshot -l succeeded, qemu-img refuses the image"
    unchanged "info/map/snapshot -l"

    # ---- convert --------------------------------------------------------
    # (qemu-img is only asked where it opens the image at all)
    run convert convert "$T" convert -f qcow2 -O raw "$img" "$D/ours.out"
    unchanged convert
    qcrc=1
    [ $qopen -eq 0 ] && { qemu-img convert -f qcow2 -O raw "$img" "$D/q.out" >/dev/null 2>&1; qcrc=$?; }
    if [ $rc -eq 0 ]; then
        if [ $qcrc -ne 0 ]; then
            fail "convert succeeded, qemu-img convert fails"
        elif ! cmp -s "$D/ours.out" "$D/q.out"; then
            fail "convert output differs from qemu-img's ($(stat -c %s "$D/ours.out") vs $(stat -c %s "$D/q.out") bytes)"
        fi
    elif [ $qcrc -eq 0 ]; then
        note "convert refused, qemu-img converts it: $(first_line "$D/convert.err")"
    fi

    convert_ok=$qcrc

    # ---- io read --------------------------------------------------------
    run read read "$T" io -f qcow2 -r -c "read 0 64k" "$img"
    unchanged "io read"
    if [ $qcrc -eq 0 ]; then
        head -c 65536 "$D/q.out" >"$D/q.raw"
        qrc=0
    else
        qrc=1
        [ $qopen -eq 0 ] && { qemu-img dd -f qcow2 -O raw bs=65536 count=1 if="$img" of="$D/q.raw" >/dev/null 2>&1; qrc=$?; }
    fi
    if [ $rc -eq 0 ]; then
        if [ $qrc -ne 0 ]; then
            fail "read succeeded, qemu-img cannot read the range"
        elif [ $RAWREAD = 1 ] && ! cmp -s "$D/read.out" "$D/q.raw"; then
            fail "read returned other data than qemu-img"
        fi
    elif [ $qrc -eq 0 ]; then
        note "read refused, qemu-img reads it: $(first_line "$D/read.err")"
    fi
    rm -f "$D/ours.out" "$D/q.out" "$D/q.raw"

    # ---- check ----------------------------------------------------------
    run check check "$T" check -f qcow2 --output=json "$img"
    unchanged check
    crc=$rc
    qcrc=1
    : >"$D/q.json"
    : >"$D/q.err"
    [ $qopen -eq 0 ] && { qemu-img check -f qcow2 --output=json "$img" >"$D/q.json" 2>"$D/q.err"; qcrc=$?; }
    [ $qopen -ne 0 ] && [ $crc -eq 0 ] && fail "check succeeded, qemu-img refuses the image"
    if [ $crc -ne 1 ] && [ $qcrc -ne 1 ] && [ $crc -lt 128 ] && [ $qcrc -lt 128 ]; then
        [ $crc -ne $qcrc ] && fail "check exit $crc, qemu-img check exit $qcrc"
        local ours theirs
        ours=$(json "$D/check.out")
        theirs=$(json "$D/q.json")
        [ "$ours" != "$theirs" ] &&
            fail "check counters differ: ours $(echo $ours) / qemu $(echo $theirs)"
        if [ "$(findings "$D/check.err")" != "$(findings "$D/q.err")" ]; then
            fail "check findings differ (< qemu-img, > ours):"
            diff <(findings "$D/q.err") <(findings "$D/check.err") | head -8 | sed 's/^/    /'
        fi
    elif [ $crc -ne 1 ] && [ $qcrc -eq 1 ] && [ $qopen -eq 0 ]; then
        note "check completed (exit $crc), qemu-img check fails"
    elif [ $crc -eq 1 ] && [ $qcrc -ne 1 ]; then
        # check opens like QEMU's (pms_open_opts.check): it must diagnose
        # whatever qemu-img check diagnoses
        fail "check failed, qemu-img check exits $qcrc: $(tail -n 1 "$D/check.err")"
    fi

    # ---- repairs (on copies; only where one of the checks found something
    # to repair, or ours could not run: then a writable open is tried) ------
    local mode q2 leaks modes="leaks all"
    [ $crc -eq 0 ] && { [ $qcrc -eq 0 ] || [ $qcrc -eq 1 ]; } && modes=
    [ $crc -eq 1 ] && [ $qopen -ne 0 ] && modes=
    for mode in $modes; do
        cp "$D/pristine" "$copy"
        run repair check "$T" check -f qcow2 -r $mode "$copy"
        # (a check opens what a plain open refuses, e.g. no refcount table:
        # judged by QEMU's own repair of the same image)
        if [ $qopen -ne 0 ] && [ $rc -eq 0 ]; then
            cp "$D/pristine" "$copy.q"
            qemu-img check -q -f qcow2 -r $mode "$copy.q" >/dev/null 2>&1
            [ $? -eq 1 ] && fail "check -r $mode succeeded, qemu-img cannot open the image to repair it"
            rm -f "$copy.q"
        fi
        if [ $rc -eq 0 ] || { [ $mode = leaks ] && [ $rc -eq 2 ]; }; then
            qemu-img check -f qcow2 --output=json "$copy" >"$D/q2.json" 2>/dev/null
            q2=$?
            leaks=$(json "$D/q2.json" | sed -n 's/^leaks=//p')
            [ "$leaks" != 0 ] && fail "check -r $mode exit $rc but qemu-img check still finds $leaks leaks"
            [ $rc -eq 0 ] && [ $q2 -ne 0 ] && fail "check -r $mode reported a clean image, qemu-img check exits $q2"
        fi
        # a repair never changes what the guest reads (unless metadata is
        # guest data, e.g. an L2 entry pointing at its own table: then
        # qemu-img's repair changes it too)
        if [ $rc -ne 1 ] && [ $convert_ok -eq 0 ] &&
           ! qemu-img compare -q -f qcow2 -F qcow2 "$img" "$copy" >/dev/null 2>&1; then
            cp "$D/pristine" "$copy.q"
            qemu-img check -q -f qcow2 -r $mode "$copy.q" >/dev/null 2>&1
            if qemu-img compare -q -f qcow2 -F qcow2 "$img" "$copy.q" >/dev/null 2>&1; then
                fail "check -r $mode changed the guest data (qemu-img compare)"
            else
                note "check -r $mode changed the guest data, as qemu-img check -r $mode does"
            fi
        fi
    done

    # ---- writes (on a copy) -------------------------------------------------
    cp "$D/pristine" "$copy"
    run write write "$T" io -f qcow2 -c "write 0 4k" "$copy"
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "write succeeded, qemu-img refuses the image"
    if [ $rc -eq 0 ] && [ $RAWREAD = 1 ]; then
        run readback read-back "$T" io -f qcow2 -r -c "read 0 4k" "$copy"
        [ $rc -eq 0 ] && ! cmp -s "$D/readback.out" "$W/pattern-4k" &&
            fail "write succeeded but does not read back"
    fi
    run snapc "snapshot -c" "$T" snapshot -f qcow2 -c x "$copy"
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "snapshot -c succeeded, qemu-img refuses the image"
    if [ $rc -eq 0 ]; then
        run snapl2 "snapshot -l" "$T" snapshot -f qcow2 -l "$copy"
        grep -qw x "$D/snapl2.out" || fail "snapshot -c succeeded but x is not listed"
    fi
    # compressed write, shrink and grow, each on a fresh copy: a clean
    # refusal or success, never a crash, a hang or a sanitizer report
    cp "$D/pristine" "$copy"
    run writec "write -c" "$T" io -f qcow2 -c "write -c 0 64k" "$copy"
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "write -c succeeded, qemu-img refuses the image"
    cp "$D/pristine" "$copy"
    run shrink "resize --shrink" "$T" resize -f qcow2 --shrink "$copy" 512
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "resize --shrink succeeded, qemu-img refuses the image"
    cp "$D/pristine" "$copy"
    run grow "resize +1G" "$T" resize -f qcow2 "$copy" +1G
    [ $qopen -ne 0 ] && [ $rc -eq 0 ] && fail "resize succeeded, qemu-img refuses the image"
    rm -rf "$D" "$copy" "$copy.q"
}

# ---- hostile images only the check is run on (too big for reads; QEMU's
# check would not finish): check must give up in bounded time (a few
# seconds of CPU; the limit is generous for loaded or sanitizer builds),
# without crash, and not change the file.
check_only_case() {
    case=$1
    local img=$W/img/$case.qcow2 D=$W/c/$case
    mkdir -p "$D"
    cp "$img" "$D/pristine"
    local rc
    for args in ""; do
        # shellcheck disable=SC2086
        timeout 90 "$T" check -f qcow2 $args "$img" >"$D/out" 2>"$D/err"
        rc=$?
        [ $rc -eq 124 ] && echo "FAIL [$case] check $args: timed out"
        [ $rc -ge 128 ] && [ $rc -ne 124 ] && echo "FAIL [$case] check $args: crashed (exit $rc)"
        grep -qE 'Sanitizer|runtime error:' "$D/err" && echo "FAIL [$case] check $args: sanitizer report"
        [ $rc -eq 0 ] && echo "FAIL [$case] check $args: reported a clean image"
        if [ -z "$args" ] && ! cmp -s "$img" "$D/pristine"; then
            echo "FAIL [$case] check modified the image"
        fi
    done
    rm -rf "$D"
}

# json FILE: normalised check counters (missing fields are 0)
json() {
    awk 'BEGIN { n = split("corruptions leaks check-errors image-end-offset total-clusters " \
                           "allocated-clusters fragmented-clusters compressed-clusters", k, " ") }
         match($0, /"[a-z-]+": *[0-9]+/) {
             s = substr($0, RSTART, RLENGTH); split(s, kv, /": */); v[substr(kv[1], 2)] = kv[2] }
         END { for (i = 1; i <= n; i++) printf "%s=%d\n", k[i], v[k[i]] + 0 }' "$1"
}

# findings FILE: the per-problem lines of a check, in order
findings() { grep -E '^(ERROR|Leaked|Repairing|Can.t get refcount)' "$1" || true; }

mkdir -p "$W/res" "$W/c"
ncases=0
while IFS=$'\t' read -r c only _; do
    ncases=$((ncases + 1))
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    if [ "$only" = all ]; then
        ( one_case "$c" >"$W/res/$c.log" 2>&1 ) &
    else
        ( check_only_case "$c" >"$W/res/$c.log" 2>&1 ) &
    fi
done <"$W/img/cases.txt"
wait

cat "$W"/res/*.log
fails=$(cat "$W"/res/*.log | grep -c '^FAIL')
notes=$(cat "$W"/res/*.log | grep -c '^NOTE')
echo "corrupt.sh: $ncases cases, $fails failures, $notes notes (tool: $T)"
[ "$ncases" -ge 1 ] && [ "$fails" -eq 0 ]
