#!/usr/bin/env bash
# Tokens per parameter, with seeds: `taproot experiment progressive-vs-fixed` (or another
# experiment, `--experiment NAME`) at each run length T and seed, growth at the paper's
# τ = 0.8 T. Each point keeps its own tables, CSVs and plots under <out>/T<T>-seed<S>/, and the
# result cache makes an interrupted series resumable (a finished run is not trained again). The
# script ends with one table: per T and run, the mean and the spread (min–max) over seeds of the
# final loss, the gap against its fixed run and the saving against the frontier of fixed runs.
#
#   scripts/seed-series.sh [--steps "3000 10000"] [--seeds "1 2 3"] [--out runs/series]
#                          [--experiment progressive-vs-fixed]
#                          [--config config/experiments/planned.toml] [--set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="3000 10000"
seeds="1 2 3"
out=runs/series
config=config/experiments/planned.toml
experiment=progressive-vs-fixed
sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --experiment) experiment="$2"; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    *) echo "usage: scripts/seed-series.sh [--steps \"T ...\"] [--seeds \"S ...\"] [--out DIR] [--experiment NAME] [--config F] [--set KEY=VALUE ...]" >&2; exit 2 ;;
  esac
done
bin=target/release/taproot
[ -x "$bin" ] || cargo build --release
for t in $steps; do
  tau=$(( t * 4 / 5 ))
  for s in $seeds; do
    dir="$out/T$t-seed$s"
    echo "== T=$t seed=$s τ=$tau -> $dir"
    "$bin" experiment "$experiment" --config "$config" --out "$dir" \
      --set run.steps="$t" --set run.seed="$s" --set "growth[0].at_step=$tau" ${sets[@]+"${sets[@]}"}
  done
done
python3 - "$out" "$config" "$steps" "$seeds" ${sets[@]+"${sets[@]}"} <<'PY'
import csv, sys
sys.path.insert(0, "scripts")
from series_common import fmt, non_embedding_params, num, sizes
out, config, steps, seeds = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
b, t, c, l = sizes(config, sys.argv[5:])
ne = non_embedding_params(c, l)
print("\n| T | tokens / non-emb. param | seeds | run | final val | gap vs its fixed | saving vs frontier (llm.c) | saving vs frontier (non-emb) |")
print("|---|---|---|---|---|---|---|---|")
import glob, os
for T in steps:
    rows, order, outside = {}, [], set()
    for s in seeds:
        for path in sorted(glob.glob(f"{out}/T{T}-seed{s}/summary*.csv")):
            for row in csv.DictReader(open(path)):
                name = row["run"].split(" τ=")[0] if " τ=" in row["run"] and not row["run"].split(" τ=")[1].endswith("T") else row["run"]
                if name not in rows:
                    rows[name] = ([], [], [], [])
                    order.append(name)
                d = rows[name]
                d[0].append(float(row["final val loss"]))
                if row["gap vs fixed"].strip() not in ("–", ""):
                    d[1].append(num(row["gap vs fixed"])[0])
                for k, col in ((2, "saving vs frontier llm.c"), (3, "saving vs frontier non-emb")):
                    v, f = num(row[col]) if row[col].strip() not in ("–", "") else (None, "")
                    if v is not None and not row["run"].startswith("fixed"):
                        d[k].append(v)
                        if f: outside.add(name)
    tpp = int(T) * b * t / ne
    for name in order:
        fl, g, s1, s2 = rows[name]
        note = " (some outside the frontier)" if name in outside else ""
        print(f"| {T} | {tpp:.1f} | {len(fl)} | {name} | {fmt(fl)} | {fmt(g, '%')} | {fmt(s1, '×')}{note} | {fmt(s2, '×')} |")
print("\nmean (min–max) over seeds; `<`/`>` savings (a loss outside the frontier) enter at their bound; a run's gap is against the fixed run of its own table (its own recipe).")
PY
