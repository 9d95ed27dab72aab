#!/usr/bin/env bash
# Builds the proxy and the benchmark driver in release mode, then runs
# sysbench directly against MariaDB and through ferrata-proxy, HAProxy (Debian's haproxy,
# installed by scripts/setup-debian.sh) and the floor forwarder, interleaved.
# All arguments go to the driver; see `bench/passthrough.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrata-proxy -p ferrata-bench
exec target/release/passthrough "$@"
