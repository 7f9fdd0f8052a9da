#!/usr/bin/env bash
# The test command: formatting (`cargo fmt --check`, rustfmt.toml) and lints (`cargo clippy
# --all-targets -D warnings`) first, then the dashboard's type check, then every test of the crate, in release mode
# (the training tests need the speed), after checking that the benchmarks build (they are run
# by scripts/bench-cpu.sh and scripts/gpu-check.sh, not here), then the doctests of the library's
# documentation (`--tests` does not run them).
# The demo-training test uses the Shakespeare corpus when data/ has it (scripts/fetch-data.sh);
# with TAPROOT_REQUIRE_DATA=1 (CI) a missing corpus is a failure instead of a printed skip.
# tests/daemon.rs runs a real Prometheus and promtool when installed (Debian's `prometheus`);
# with TAPROOT_REQUIRE_PROMETHEUS=1 (CI) a missing one is a failure instead of a printed skip.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
scripts/check-dashboard.sh
cargo build --release --benches
# The GPU benchmark's configs parse (no GPU needed), so a config change cannot break a GPU run.
cargo bench --bench gpu -- --check-configs
cargo build --release --examples
cargo test --release --lib --bins --tests "$@"
cargo test --release --doc
# The programs of examples/ (a few seconds each, on data they make): a failing one fails the script.
for example in grow_live custom_growth metrics_client; do
    echo "example $example"
    if ! out=$(cargo run --release --quiet --example "$example" 2>&1); then
        printf '%s\n' "$out"
        echo "example $example failed" >&2
        exit 1
    fi
    printf '%s\n' "$out" | tail -n 4
done
