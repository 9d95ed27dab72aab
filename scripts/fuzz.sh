#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS seconds each (default 30), starting from
# the committed seeds in fuzz/seeds/<target>/ plus whatever earlier runs left in
# fuzz/corpus/<target>/. A finding stops the run and leaves its input in fuzz/artifacts/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# CI runs a short pass with a fixed seed (FUZZ_SEED, default 1), so that a run is repeatable
# and a change fails CI for what it changed, not for where a random walk happened to go;
# exploring is for long runs with fresh seeds, e.g. `FUZZ_SEED=0 scripts/fuzz.sh 3600 tc_grpc`
# (0: libFuzzer picks one and prints it).
# Stable Rust is enough: without sanitizers (-s none) nightly is not needed, and
# debug assertions stay on so overflow and slice bugs panic.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
seed="${FUZZ_SEED:-1}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# Thin LTO and one codegen unit per crate would double the build for no finding.
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_DEBUG=1
flags=(-s none --debug-assertions --codegen-units 16)

cargo fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/seeds/$target"
    echo "== fuzzing $target for ${seconds}s (seed $seed)"
    cargo fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -seed="$seed" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
