#!/usr/bin/env bash
# Times the README's commands in a fresh clone: `make run` twice (the first includes creating
# the environment and installing) and `make test`. Prints one line per figure.
# Usage: bench/fresh_clone.sh [DIR]   (default: a new temporary folder)
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=${1:-$(mktemp -d)/d2d}
git clone -q "$repo" "$dir"
cd "$dir"
secs() { local t0=$SECONDS; "$@" >"$2.log" 2>&1 || { echo "$* failed, see $dir/$2.log" >&2; exit 1; }; echo $((SECONDS - t0)); }
run1=$(secs make run)
acc=$(grep 'test metrics' run.log | grep -o 'accuracy [0-9.]*' | head -1)
mv run.log run1.log
run2=$(secs make run)
test_s=$(secs make test)
echo "make run, first (with install): ${run1} s"
echo "make run, second:               ${run2} s"
echo "test ${acc} (second run: $(grep 'test metrics' run.log | grep -o 'accuracy [0-9.]*' | head -1))"
echo "make test:                      ${test_s} s ($(grep -Eo '[0-9]+ passed[^=]*' test.log | tail -1))"
