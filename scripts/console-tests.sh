#!/usr/bin/env bash
# The console's tests in a real headless browser: Debian's chromium driven by playwright-core
# (from npm, pinned in tests/console/package-lock.json) under Node's own test runner, against
# the fixture binary (real MariaDB, coordinator and proxy; tests/bin/console_fixture.rs).
# On failure, screenshots and page HTML are left in tests/console/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p ferrata-tests --bin ferrata-console-fixture --bin ferrata-tc-for-tests --bin ferrata-proxy-for-tests
target="${CARGO_TARGET_DIR:-$PWD/target}"
chromium="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$chromium" ]; then
    echo "console-tests: chromium is missing; scripts/setup-debian.sh installs it" >&2
    exit 1
fi
cd tests/console
npm ci --no-audit --no-fund --silent
FIXTURE_BIN="$target/debug/ferrata-console-fixture" CHROMIUM_BIN="$chromium" node --test
