#!/usr/bin/env bash
# CPU benchmark: training tokens/s and GFLOP/s for the GPT-2 124M shape and the demo config,
# beside the measured GEMM peak and the recorded PyTorch / llm.c baselines (see benches/cpu.rs).
# Pass --quick for fewer timed steps.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench cpu -- "$@"
cargo bench --bench runtime -- "$@"
