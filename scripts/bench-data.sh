#!/usr/bin/env bash
# `taproot data prepare` throughput and peak memory beside the Python `tokenizers` library on the
# same JSONL and tokenizers, in one run, and a training run's peak RSS over a multi-GB corpus
# against a small one (scripts/bench_data.py says how). Python's tokenizers is installed into the
# git-ignored target/pytok on first use. Options pass through: --mb 200 --threads N --rounds 3
# --train-gb 2 --steps 40.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d data/raw/shakespeare ] || scripts/fetch-data.sh
if ! PYTHONPATH=target/pytok python3 -c 'import tokenizers' 2>/dev/null; then
    python3 -m pip install --quiet --target target/pytok tokenizers==0.22.1
fi
cargo build --release --quiet
python3 scripts/bench_data.py "$@"
