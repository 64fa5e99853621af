#!/bin/bash
# Drive an iSCSI target with libiscsi's tools: iscsi-ls, iscsi-inq, iscsi-perf and the
# iscsi-test-cu families in CU_FAMILIES. Every tool's output goes to stdout and to
# $RESULTS_DIR/<step>.out; $RESULTS_DIR/summary.tsv gets one "step<TAB>exit code<TAB>PASS|FAIL"
# line per step and $RESULTS_DIR/done the overall verdict, written last, so a reader can tell a
# finished run from one cut short. The exit status is 0 only if every step passed.
#
# Settings (environment): TARGET_HOST, TARGET_PORT, TARGET_IQN, TARGET_LUN (the disk the tests
# write to: its data is overwritten), CU_FAMILIES, CU_FILE_LUN and CU_FILE_FAMILIES (optional
# families for a second LUN), PERF_SECONDS, PORTAL_WAIT_SECONDS, RESULTS_DIR.
set -uo pipefail

TARGET_HOST=${TARGET_HOST:-target}
TARGET_PORT=${TARGET_PORT:-3260}
TARGET_IQN=${TARGET_IQN:-iqn.2026-11.io.emuhba:target0}
TARGET_LUN=${TARGET_LUN:-0}
CU_FAMILIES=${CU_FAMILIES:-Inquiry TestUnitReady ReadCapacity10 ReadCapacity16 Read10 Read16 Write10 Write16 iSCSIcmdsn iSCSIResiduals}
CU_FILE_LUN=${CU_FILE_LUN:-}
CU_FILE_FAMILIES=${CU_FILE_FAMILIES:-}
PERF_SECONDS=${PERF_SECONDS:-5}
PORTAL_WAIT_SECONDS=${PORTAL_WAIT_SECONDS:-60}
RESULTS_DIR=${RESULTS_DIR:-/results}
# iscsi-test-cu logs in with a second initiator name for its multi-session tests.
INITIATOR=iqn.2026-11.io.emuhba:initiator
INITIATOR_2=iqn.2026-11.io.emuhba:initiator-2

PORTAL="$TARGET_HOST:$TARGET_PORT"
failures=0

say() { printf 'run-initiator: %s\n' "$*"; }

mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_DIR/done"
: >"$RESULTS_DIR/summary.tsv"

wait_for_portal() {
    local deadline=$((SECONDS + PORTAL_WAIT_SECONDS))
    # The target's container starts before emuhba listens; a TCP connect is its readiness signal.
    until (exec 3<>"/dev/tcp/$TARGET_HOST/$TARGET_PORT") 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "no target listening on $PORTAL after $PORTAL_WAIT_SECONDS s"
            return 1
        fi
        sleep 0.2
    done
    say "target portal $PORTAL is up"
}

# verdict STEP FILE: extra checks on a finished step's output (exit status aside).
verdict() {
    local step=$1 file=$2
    case $step in
    iscsi-test-cu-*)
        # CUnit's "tests  Total Ran Passed Failed Inactive" row: everything ran, nothing failed.
        awk '$1 == "tests" && NF == 6 { found = 1; ok = ($2 == $3 && $3 > 0 && $5 == 0) }
             END { exit !(found && ok) }' "$file"
        ;;
    iscsi-perf)
        # iscsi-perf exits 0 even after failed commands; it says so in its output instead.
        ! grep -qiE 'failed|aborted' "$file" && grep -q '^finished\.' <(tr '\r' '\n' <"$file")
        ;;
    *) return 0 ;;
    esac
}

# step NAME TIMEOUT COMMAND...: run one tool, record and print its result.
step() {
    local name=$1 limit=$2
    shift 2
    local out="$RESULTS_DIR/$name.out" code result=PASS
    say "=== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
    code=$?
    # iscsi-perf redraws its progress line with \r; show it as lines.
    tr '\r' '\n' <"$out"
    if [ "$code" -ne 0 ] || ! verdict "$name" "$out"; then
        result=FAIL
        failures=$((failures + 1))
    fi
    printf '%s\t%s\t%s\n' "$name" "$code" "$result" >>"$RESULTS_DIR/summary.tsv"
    say "=== $name: exit $code, $result"
}

if ! wait_for_portal; then
    printf 'portal-wait\t1\tFAIL\n' >>"$RESULTS_DIR/summary.tsv"
    echo FAIL >"$RESULTS_DIR/done"
    exit 1
fi

lun_url="iscsi://$PORTAL/$TARGET_IQN/$TARGET_LUN"
step iscsi-ls 60 iscsi-ls -i "$INITIATOR" -s "iscsi://$PORTAL"
step iscsi-inq 60 iscsi-inq -i "$INITIATOR" "$lun_url"
step iscsi-perf $((PERF_SECONDS + 60)) \
    iscsi-perf -i "$INITIATOR" -t "$PERF_SECONDS" -m 32 -b 8 -r "$lun_url"
for family in $CU_FAMILIES; do
    step "iscsi-test-cu-$family" 600 \
        iscsi-test-cu --dataloss -i "$INITIATOR" -I "$INITIATOR_2" -t "ALL.$family" "$lun_url"
done
if [ -n "$CU_FILE_LUN" ]; then
    for family in $CU_FILE_FAMILIES; do
        step "iscsi-test-cu-$family-lun$CU_FILE_LUN" 600 \
            iscsi-test-cu --dataloss -i "$INITIATOR" -I "$INITIATOR_2" -t "ALL.$family" \
            "iscsi://$PORTAL/$TARGET_IQN/$CU_FILE_LUN"
    done
fi

if [ "$failures" -eq 0 ]; then
    say "all steps passed"
    echo PASS >"$RESULTS_DIR/done"
    exit 0
fi
say "$failures step(s) failed:"
awk -F '\t' '$3 == "FAIL" { print "  " $1 " (exit " $2 ")" }' "$RESULTS_DIR/summary.tsv"
echo FAIL >"$RESULTS_DIR/done"
exit 1
