#!/usr/bin/env bash
# The demo, end to end on a fresh machine: fetch the public-domain Shakespeare corpus, tokenize it
# to byte-level shards, build, and train the progressive 0 -> 6 block model (config/demo.toml).
# Extra arguments go to `taproot train` (e.g. --set run.steps=500, or --config config/demo-fixed.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh
cargo build --release
if [ ! -f data/shakespeare-bytes/shakespeare_val_000000.bin ]; then
  ./target/release/taproot data prepare data/raw/shakespeare --out data/shakespeare-bytes --tokenizer bytes --name shakespeare
fi
config=config/demo.toml
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
exec ./target/release/taproot train --config "$config" "${args[@]}"
