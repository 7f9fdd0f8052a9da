#!/usr/bin/env bash
# CPU benchmark: training tokens/s and GFLOP/s for the GPT-2 124M shape and the demo config,
# beside the GEMM peak measured in the same run, and the block kinds (see benches/cpu.rs).
# Pass --quick for fewer timed steps, --profile for the op profile of a step. Other systems are
# measured side by side by scripts/bench-torch.sh, never quoted from recorded figures.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench cpu -- "$@"
cargo bench --bench runtime -- "$@"
