#!/usr/bin/env bash
# The embedding's share: `taproot experiment progressive-vs-fixed` on the same text tokenized
# with vocabularies of N tokens (bytes = 256, then byte-level BPEs learnt on the training split),
# the block stack held fixed, so that only the embedding/head's share of the parameters changes.
# Each vocabulary's data is prepared once under data/<name>-bpeN/ (skipped when it exists); each
# (N, seed) point runs through scripts/seed-series.sh (resumable through the result cache) into
# <out>/V<N>/T<T>-seed<S>/. The script ends with one table per vocabulary: the embedding's share
# of the fixed model's parameters, the gap at equal steps, t_mix and the saving at equal loss
# against the frontier of fixed runs, each as mean (min–max) over seeds.
#
#   scripts/vocab-series.sh [--vocabs "256 1024 4096 16384"] [--steps 3000] [--seeds "1"]
#                           [--out runs/vocab] [--raw data/raw/shakespeare] [--name shakespeare]
#                           [--config config/experiments/planned.toml] [--set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
vocabs="256 1024 4096 16384"
steps=3000
seeds="1"
out=runs/vocab
raw=data/raw/shakespeare
name=shakespeare
config=config/experiments/planned.toml
sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --vocabs) vocabs="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --raw) raw="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    *) echo "usage: scripts/vocab-series.sh [--vocabs \"N ...\"] [--steps T] [--seeds \"S ...\"] [--out DIR] [--raw DIR] [--name NAME] [--config F] [--set KEY=VALUE ...]" >&2; exit 2 ;;
  esac
done
bin=target/release/taproot
[ -x "$bin" ] || cargo build --release
for v in $vocabs; do
  if [ "$v" = 256 ]; then tok=bytes; data="data/$name-bytes"; else tok="bpe:$v"; data="data/$name-bpe$v"; fi
  if [ ! -f "$data/corpus.json" ] && ! ls "$data"/*_val_*.bin >/dev/null 2>&1; then
    echo "== preparing $data ($tok)"
    "$bin" data prepare "$raw" --out "$data" --tokenizer "$tok" --name "$name"
  fi
  scripts/seed-series.sh --steps "$steps" --seeds "$seeds" --out "$out/V$v" --config "$config" \
    --set data.dir="$data" --set data.tokenizer="$tok" ${sets[@]+"${sets[@]}"} | grep -v '^|' || true
done
python3 - "$out" "$config" "$steps" "$seeds" "$vocabs" ${sets[@]+"${sets[@]}"} <<'PY'
import csv, sys
sys.path.insert(0, "scripts")
from series_common import fmt, non_embedding_params, num, sizes
out, config, steps, seeds, vocabs = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5].split()
b, t, c, l = sizes(config, sys.argv[6:])
ne = non_embedding_params(c, l)
print("\n| vocab N | embedding share | T | seeds | fixed final val | run | gap vs fixed | t_mix | saving vs frontier (llm.c) | saving vs frontier (non-emb) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for v in vocabs:
    emb = int(v) * c + t * c + 2 * c  # token + position embedding, final LayerNorm (the head is tied)
    share = emb / (emb + ne)
    for T in steps:
        rows, fixed, outside = {}, [], set()
        for s in seeds:
            try:
                r = list(csv.DictReader(open(f"{out}/V{v}/T{T}-seed{s}/summary.csv")))
            except FileNotFoundError:
                continue
            for row in r:
                nm = row["run"].split(" τ=")[0]
                if nm.startswith("fixed"):
                    fixed.append(float(row["final val loss"]))
                    continue
                g, _ = num(row["gap vs fixed"])
                s1, f1 = num(row["saving vs frontier llm.c"])
                s2, f2 = num(row["saving vs frontier non-emb"])
                if f1 or f2: outside.add(nm)
                d = rows.setdefault(nm, ([], [], [], []))
                d[0].append(g); d[1].append(s1); d[2].append(s2); d[3].append(row["t_mix"])
        for nm, (g, s1, s2, tm) in rows.items():
            note = " (some outside the frontier)" if nm in outside else ""
            print(f"| {v} | {100 * share:.0f}% | {T} | {len(g)} | {fmt(fixed)} | {nm} | {fmt(g, '%')} | {', '.join(tm)} | {fmt(s1, '×')}{note} | {fmt(s2, '×')} |")
print("\nmean (min–max) over seeds; losses are nats per token of each vocabulary (compare gaps, not losses, across rows); `<`/`>` savings enter at their bound.")
PY
