#!/usr/bin/env bash
# Builds the coordinator and the benchmark driver in release mode, prints the machine, then
# measures ferrata-tc over gRPC: throughput of two-branch global transactions at 1, 16 and 64
# clients, and lock latency on one hot row. All arguments go to the driver; see
# `bench/tc.sh --help` (e.g. `bench/tc.sh --seconds 5 --clients 1,16`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrata-tc -p ferrata-bench
echo "machine"
echo "  cpus:      $(nproc)"
echo "  cpu model: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "  memory:    $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
echo "  kernel:    $(uname -r)"
echo "  load avg:  $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  commit:    $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
exec target/release/tc-bench "$@"
