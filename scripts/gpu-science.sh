#!/usr/bin/env bash
# The progressive-vs-fixed comparison at GPU scale (config/experiments/gpu.toml): fixed 6 blocks
# for T, T/2 and T/4 steps (the frontier), 0 -> 6 random and 1 -> 6 copying at τ = 0.8 T, on one
# GPU in bf16 with flash attention; prints the experiment's tables (gap at equal steps, saving
# against the frontier, passes over the data). A few minutes on one H100/H200.
#
#   scripts/gpu-science.sh --prepare   on a machine with cargo: build taproot into .gpu-science/,
#                                      and the shards data/all-bytes from data/raw (fetch-data.sh --brown)
#   scripts/gpu-science.sh [--set KEY=VALUE ...]   on the GPU machine (carry .gpu-science and
#                                      data/all-bytes); the results land in $GPU_SCIENCE_OUT
#                                      (default runs/gpu-science)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  cargo build --release
  mkdir -p .gpu-science .git/info
  grep -qx '/.gpu-science/' .git/info/exclude 2>/dev/null || echo '/.gpu-science/' >> .git/info/exclude
  cp target/release/taproot .gpu-science/taproot
  strip .gpu-science/taproot
  if [ ! -f data/all-bytes/all_val_000000.bin ]; then
    [ -d data/raw/brown ] || scripts/fetch-data.sh --brown
    .gpu-science/taproot data prepare data/raw/shakespeare data/raw/milton data/raw/brown --out data/all-bytes --tokenizer bytes --name all
  fi
  ls -la .gpu-science data/all-bytes
  exit 0
fi
NV=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null || true)
[ -n "$NV" ] && export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
bin=target/release/taproot
[ -x .gpu-science/taproot ] && bin=.gpu-science/taproot
[ -x "$bin" ] || { echo "no taproot binary: run scripts/gpu-science.sh --prepare (or cargo build --release)"; exit 2; }
out="${GPU_SCIENCE_OUT:-runs/gpu-science}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
# The experiment prints its tables (also written to $out/table.md, with CSVs and plots).
"$bin" experiment progressive-vs-fixed --config config/experiments/gpu.toml --out "$out" --no-cache "$@"
