#!/usr/bin/env bash
# taproot's CPU training step beside PyTorch's, side by side in one invocation (see
# scripts/bench_torch.py for the protocol): GPT-2 124M and the demo shapes with 6, 1 and 0 blocks
# against a nanoGPT-style GPT-2, the llama, qwen3 and MoE kinds against `transformers` models of
# the same config, each with PyTorch's default and fused AdamW.
#
#   scripts/bench-torch.sh [--install] [--rounds N] [--threads K] [--cases a,b] [--quick] [--json F]
#
# --install puts PyTorch (CPU use of the PyPI wheel, about 5 GB with its CUDA libraries, which
# stay unused) into target/pytorch and transformers into target/pyhf, both git-ignored. CI does
# not run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.15.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.25.0}
args=()
install=0
for a in "$@"; do
  if [ "$a" = --install ]; then install=1; else args+=("$a"); fi
done
if [ "$install" = 1 ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target target/pytorch "torch==$TORCH_VERSION" numpy
  PYTHONPATH="$PWD/target/pyhf" python3 -c 'import transformers' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --target target/pyhf "transformers==$TRANSFORMERS_VERSION"
fi
export PYTHONPATH="$PWD/target/pytorch:$PWD/target/pyhf${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, transformers" 2>/dev/null || {
  echo "PyTorch or transformers is missing: run scripts/bench-torch.sh --install" >&2
  exit 1
}
bin=$(cargo bench --bench cpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="cpu" and m.get("executable"): print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "could not build the cpu benchmark" >&2; exit 1; }
exec python3 scripts/bench_torch.py --taproot "$bin" ${args[@]+"${args[@]}"}
