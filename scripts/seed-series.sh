#!/usr/bin/env bash
# Tokens per parameter, with seeds: `taproot experiment progressive-vs-fixed` at each run length T
# and seed, growth at the paper's τ = 0.8 T. Each point keeps its own tables, CSVs and plots under
# <out>/T<T>-seed<S>/, and the result cache makes an interrupted series resumable (a finished
# point is not trained again). The script ends with one table: per T, the mean and the spread
# (min–max) over seeds of the fixed run's final loss, and of each grown run's gap and saving
# against the frontier of fixed runs.
#
#   scripts/seed-series.sh [--steps "3000 10000"] [--seeds "1 2 3"] [--out runs/series]
#                          [--config config/experiments/planned.toml] [--set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="3000 10000"
seeds="1 2 3"
out=runs/series
config=config/experiments/planned.toml
sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    *) echo "usage: scripts/seed-series.sh [--steps \"T ...\"] [--seeds \"S ...\"] [--out DIR] [--config F] [--set KEY=VALUE ...]" >&2; exit 2 ;;
  esac
done
bin=target/release/taproot
[ -x "$bin" ] || cargo build --release
for t in $steps; do
  tau=$(( t * 4 / 5 ))
  for s in $seeds; do
    dir="$out/T$t-seed$s"
    echo "== T=$t seed=$s τ=$tau -> $dir"
    "$bin" experiment progressive-vs-fixed --config "$config" --out "$dir" \
      --set run.steps="$t" --set run.seed="$s" --set "growth[0].at_step=$tau" ${sets[@]+"${sets[@]}"}
  done
done
python3 - "$out" "$config" "$steps" "$seeds" ${sets[@]+"${sets[@]}"} <<'PY'
import csv, sys, tomllib, statistics as st
out, config, steps, seeds = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
cfg = tomllib.load(open(config, "rb"))
# the --set overrides of the sizes that set tokens per parameter
for kv in sys.argv[5:]:
    if "=" in kv:
        key, value = kv.split("=", 1)
        sec, _, name = key.partition(".")
        if sec in ("data", "model") and name in ("batch_size", "seq_len", "channels", "target_depth"):
            cfg[sec][name] = int(value)
b, t, c, l = cfg["data"]["batch_size"], cfg["data"]["seq_len"], cfg["model"]["channels"], cfg["model"]["target_depth"]
ne = l * (12 * c * c + 13 * c)  # non-embedding parameters of the fixed model
def num(x):
    x = x.strip().replace("×", "").replace("%", "").replace("+", "")
    flag = "<" if x.startswith("<") else ">" if x.startswith(">") else ""
    return float(x.lstrip("<> ").split(" ")[0]), flag
def fmt(v, unit=""):
    if not v: return "–"
    m = st.mean(v)
    return f"{m:.4g}{unit} ({min(v):.4g}–{max(v):.4g})" if len(v) > 1 else f"{m:.4g}{unit}"
print("\n| T | tokens / non-emb. param | seeds | fixed final val | run | gap vs fixed | saving vs frontier (llm.c) | saving vs frontier (non-emb) |")
print("|---|---|---|---|---|---|---|---|")
for T in steps:
    rows = {}
    fixed = []
    outside = set()
    for s in seeds:
        try:
            r = list(csv.DictReader(open(f"{out}/T{T}-seed{s}/summary.csv")))
        except FileNotFoundError:
            continue
        for row in r:
            name = row["run"].split(" τ=")[0]
            if name.startswith("fixed"):
                fixed.append(float(row["final val loss"]))
                continue
            g, _ = num(row["gap vs fixed"])
            s1, f1 = num(row["saving vs frontier llm.c"])
            s2, f2 = num(row["saving vs frontier non-emb"])
            if f1 or f2: outside.add(name)
            d = rows.setdefault(name, ([], [], []))
            d[0].append(g); d[1].append(s1); d[2].append(s2)
    tpp = int(T) * b * t / ne
    for name, (g, s1, s2) in rows.items():
        note = " (some outside the frontier)" if name in outside else ""
        print(f"| {T} | {tpp:.1f} | {len(g)} | {fmt(fixed)} | {name} | {fmt(g, '%')} | {fmt(s1, '×')}{note} | {fmt(s2, '×')} |")
print("\nmean (min–max) over seeds; `<`/`>` savings (a loss outside the frontier) enter at their bound.")
PY
