#!/usr/bin/env bash
# ./dev.sh serve [emuhba serve options...]   run the target from this checkout
# ./dev.sh test [pytest options...]          lint, type-check and run every test
#
# Both create .venv on first use (and reinstall into it only when pyproject.toml changes).
# `test` needs libiscsi-bin (the initiator tools the integration tests drive), tgt, qemu-utils and
# qemu-block-extra (qemu-img bench over iscsi:// for the write benchmark), and for the guest and
# container tests qemu-system-x86, debootstrap, docker.io and docker-compose; as root
# it installs them, otherwise it says what to install and the tests that need them skip, except
# with CI=true, where anything missing is a failure.
set -euo pipefail

# Absolute paths: `serve` keeps the caller's working directory, so relative --file-lun paths mean
# what the caller meant.
ROOT=$(cd "$(dirname "$0")" && pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.emuhba-installed"
TEST_PACKAGES=(libiscsi-bin tgt qemu-system-x86 qemu-utils qemu-block-extra debootstrap
    debian-archive-keyring docker.io docker-compose)

say() { printf 'dev.sh: %s\n' "$*" >&2; }
is_root() { [ "$(id -u)" -eq 0 ]; }
in_ci() { [ "${CI:-}" = "true" ]; }

apt_updated=0
apt_install() {
    # Only refresh the package lists when there are none, or when an install misses with them.
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -qq
        apt_updated=1
    fi
    if ! apt-get install -y -qq --no-install-recommends "$@"; then
        [ "$apt_updated" -eq 1 ] && return 1
        apt-get update -qq
        apt_updated=1
        apt-get install -y -qq --no-install-recommends "$@"
    fi
}

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    say "need Python >= 3.11 (set PYTHON=/path/to/python3.11 if it is not on PATH)"
    return 1
}

ensure_venv() {
    local python
    if [ ! -x "$VENV/bin/python" ]; then
        python=$(pick_python)
        if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
            if is_root && command -v apt-get >/dev/null; then
                say "installing python3-venv"
                apt_install python3-venv
            else
                say "python venv support is missing: sudo apt-get install python3-venv"
                exit 1
            fi
        fi
        say "creating $VENV with $python"
        rm -rf "$VENV"
        "$python" -m venv "$VENV"
    fi
    local want
    want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ] || [ ! -x "$VENV/bin/emuhba" ]; then
        say "installing emuhba and its test tools into $VENV"
        (cd "$ROOT" && "$VENV/bin/python" -m pip install --quiet -e '.[test]')
        echo "$want" >"$STAMP"
    fi
}

missing_tools() {
    local tool
    for tool in iscsi-ls iscsi-inq iscsi-readcapacity16 iscsi-perf iscsi-test-cu tgtd tgtadm \
        qemu-system-x86_64 qemu-img debootstrap dockerd docker-compose; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s ' "$tool"
    done
}

ensure_test_tools() {
    local missing
    missing=$(missing_tools)
    [ -z "$missing" ] && return 0
    if is_root && command -v apt-get >/dev/null; then
        say "installing ${TEST_PACKAGES[*]} (missing: $missing)"
        apt_install "${TEST_PACKAGES[@]}"
        missing=$(missing_tools)
        [ -z "$missing" ] && return 0
    fi
    say "missing: $missing"
    say "install them with: sudo apt-get install -y ${TEST_PACKAGES[*]}"
    if in_ci; then
        say "CI=true: the integration tests cannot be skipped"
        exit 1
    fi
    say "the integration tests that need them will be skipped"
}

run_tests() {
    # Extra arguments go to pytest, e.g. ./dev.sh test -k data_integrity
    cd "$ROOT"
    ensure_test_tools
    local status=0
    say "ruff check"
    "$VENV/bin/ruff" check . || status=1
    say "mypy"
    "$VENV/bin/mypy" || status=1
    "$VENV/bin/mypy" --strict bench/soak.py tests/conftest.py tests/integration \
        tests/unit/test_bench_smoke.py tests/guest tests/containers || status=1
    say "pytest"
    # Unit and libiscsi tests first (minutes), then open-iscsi + fio in a QEMU guest and the
    # containers (the first run builds the guest image and the container images: ~5 min each).
    "$VENV/bin/python" -m pytest -p no:cacheprovider -ra --durations=12 tests/unit \
        tests/integration tests/guest tests/containers "$@" || status=1
    if [ "$status" -ne 0 ]; then
        say "FAILED"
    fi
    return "$status"
}

case "${1:-}" in
serve)
    shift
    ensure_venv
    exec "$VENV/bin/emuhba" serve "$@"
    ;;
test)
    shift
    ensure_venv
    run_tests "$@"
    ;;
*)
    echo "usage: $0 serve [emuhba serve options...] | $0 test" >&2
    exit 2
    ;;
esac
