#!/usr/bin/env bash
# AT mode end to end on each coordinator store: builds in release mode, then runs at-bench
# once per store and round (`--store redb`, `etcd1`, `etcd3`, one round each), rotating which
# store goes first in each round, so that all three share the machine's noise. Every run
# measures its own direct reference in the same window, so compare the stores by their
# ratios to direct (medians over the rounds). The summary and CPU lines of every run are
# printed, prefixed with the store; each run's whole output (machine, settings, every table)
# is kept in a directory named at the start.
#
# usage: bench/at-stores.sh ROUNDS [at-bench arguments...]
#   e.g. bench/at-stores.sh 3 --workloads transfer,hot --sides at,direct --clients 16
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:?usage: bench/at-stores.sh ROUNDS [at-bench arguments...]}
shift
cargo build --release -p ferrata-proxy -p ferrata-tc -p ferrata-bench
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
stores=(redb etcd1 etcd3)
logs=$(mktemp -d -t ferrata-at-stores-XXXXXX)
echo "every run's output: $logs"
for ((r = 0; r < rounds; r++)); do
    for ((k = 0; k < ${#stores[@]}; k++)); do
        store=${stores[$(((r + k) % ${#stores[@]}))]}
        echo "== round $((r + 1)) of $rounds, store $store"
        log="$logs/round$((r + 1))-$store.log"
        target/release/at-bench --store "$store" --rounds 1 "$@" >"$log"
        sed -n -e '/^cpu us per transaction/p' -e '/^summary/,$p' "$log" | sed "s/^/[$store] /"
    done
done
