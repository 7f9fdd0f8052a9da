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
# With an MPI library (mpicc; Debian's openmpi-bin libopenmpi-dev libclang-dev) everything is
# built and tested with the `mpi` feature, so tests/parallel.rs runs real mpirun launches;
# without one, without it (those tests print why they skip; TAPROOT_REQUIRE_MPI=1 makes that a
# failure). The `nccl` feature needs nothing at build time (NCCL is loaded when a run asks for
# it), so it is always on; tests/nccl.rs loads NCCL where LD_LIBRARY_PATH has it (`.ci/run`
# installs it) and prints why it skips where not (TAPROOT_REQUIRE_NCCL=1 makes that a failure).
# The build without features is checked either way.
set -euo pipefail
cd "$(dirname "$0")/.."
mpi=0
features=(--features nccl)
if command -v mpicc >/dev/null; then mpi=1; features=(--features mpi,nccl); fi
cargo fmt --check
cargo clippy --release --all-targets ${features[@]+"${features[@]}"} -- -D warnings
cargo check --release --all-targets
scripts/check-dashboard.sh
cargo build --release --benches ${features[@]+"${features[@]}"}
# The GPU benchmark's configs parse (no GPU needed), so a config change cannot break a GPU run.
cargo bench --bench gpu ${features[@]+"${features[@]}"} -- --check-configs
cargo build --release --examples ${features[@]+"${features[@]}"}
cargo test --release --lib --bins --tests ${features[@]+"${features[@]}"} "$@"
cargo test --release --doc ${features[@]+"${features[@]}"}
# The programs of examples/ (a few seconds each, on data they make): a failing one fails the script.
examples=(grow_live custom_growth metrics_client)
if [ "$mpi" = 1 ]; then
    examples+=(data_parallel)
    # OpenMPI refuses to start as root unless told (CI runs as root).
    if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
fi
for example in "${examples[@]}"; do
    echo "example $example"
    if ! out=$(cargo run --release --quiet ${features[@]+"${features[@]}"} --example "$example" 2>&1); then
        printf '%s\n' "$out"
        echo "example $example failed" >&2
        exit 1
    fi
    printf '%s\n' "$out" | tail -n 4
done
