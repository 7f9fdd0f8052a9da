#!/usr/bin/env bash
# The test command: the dashboard's type check, then every test of the crate, in release mode
# (the training tests need the speed), after checking that the benchmarks build (they are run
# by scripts/bench-cpu.sh and scripts/gpu-check.sh, not here).
# The demo-training test uses the Shakespeare corpus when data/ has it (scripts/fetch-data.sh);
# with TAPROOT_REQUIRE_DATA=1 (CI) a missing corpus is a failure instead of a printed skip.
# tests/daemon.rs runs a real Prometheus and promtool when installed (Debian's `prometheus`);
# with TAPROOT_REQUIRE_PROMETHEUS=1 (CI) a missing one is a failure instead of a printed skip.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/check-dashboard.sh
cargo build --release --benches
cargo test --release --lib --bins --tests "$@"
