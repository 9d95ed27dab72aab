#!/usr/bin/env bash
# Builds the proxy, the coordinator and the benchmark driver in release mode, then measures
# AT and XA modes against MariaDB directly, interleaved: transfers between two servers (one
# global transaction against two local ones), a hot row, and the cost of the no-dirty-writes
# check under sysbench. All arguments go to the driver; see `bench/at.sh --help`
# (e.g. `bench/at.sh --rounds 1 --time 3 --workloads transfer`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrata-proxy -p ferrata-tc -p ferrata-bench
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
exec target/release/at-bench "$@"
