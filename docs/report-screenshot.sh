#!/usr/bin/env bash
# Regenerates docs/report.png (the README's picture of report.html) from real runs: three "nights" of a small
# matrix over Debian's 6.12 and the default kernel, each night selecting more tests (so the later ones have new
# tests and the strip has cells for nights that did not run them), the third with the first two as --baseline,
# photographed by headless Chromium (`matrix --screenshot`, which installs Debian's chromium through
# harness/images/sysdeps.py when it is missing).
#
#   docs/report-screenshot.sh [WORKDIR]
#
# WORKDIR keeps the three matrix directories (a night already there, with its report.txt, is not run again);
# without it they go to a temporary directory that is removed at the end.  ~10 min on a 2-core TCG host, cold.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ge 1 ]; then
    work=$1
    mkdir -p "$work"
else
    work=$(mktemp -d /tmp/report-shot.XXXXXX)
    trap 'rm -rf "$work"' EXIT
fi
kernels=(6.12 default)
base="psci_version_exits or hypercall_flags or hcd_undef"
select=("$base" "$base or cpu_on_32bit" "$base or cpu_on_32bit or (test_nested_el2 and in_kernel_cpu_on_never)")

matrix() {      # exit 0 (all good) and 1 (a test failed / regressed) are both a report worth showing
    local rc=0
    ./smccc-harness matrix --kernels "${kernels[@]}" "$@" || rc=$?
    [ "$rc" -le 1 ] || { echo "report-screenshot: matrix $* exited $rc" >&2; exit "$rc"; }
}

for i in 1 2; do
    [ -f "$work/n$i/report.txt" ] || matrix -k "${select[$((i - 1))]}" --out "$work/n$i"
done
if [ -f "$work/n3/report.txt" ]; then     # the newest night exists: only redraw its report and photograph it
    matrix --report-only "$work/n3" --baseline "$work/n1" "$work/n2" --screenshot docs/report.png \
        --screenshot-size 1200x1500
else
    matrix -k "${select[2]}" --out "$work/n3" --baseline "$work/n1" "$work/n2" --screenshot docs/report.png \
        --screenshot-size 1200x1500
fi
ls -l docs/report.png
