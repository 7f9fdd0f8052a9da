#!/usr/bin/env bash
# Before and after, interleaved in one run: the CPU step time of every block kind
# (`cargo bench --bench cpu -- --case kinds`) of revision REV against the working tree.
#
#   scripts/bench-ab.sh REV [ROUNDS]
#
# Builds REV's benchmark in a worktree under target/ab/ (or takes BEFORE_BIN, a built
# `benches/cpu` binary of REV), builds the working tree's, then runs them alternately ROUNDS
# times (default 5) so drift and interference hit both alike, and prints per kind the median
# ms/step of each and their ratio (after ÷ before; below 1 is faster). Each run times 5 steps
# per kind (`--quick`); FULL=1 times 15.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/bench-ab.sh REV [ROUNDS]}
rounds=${2:-5}
mkdir -p target/ab
bench_bin() { # the path of the built cpu bench in the cargo project of the current directory
  cargo bench --bench cpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="cpu" and m.get("executable"): print(m["executable"])' | tail -1
}
before=${BEFORE_BIN:-}
if [ -z "$before" ]; then
  wt="target/ab/src-$(git rev-parse --short "$rev")"
  [ -d "$wt" ] || git worktree add --detach "$wt" "$rev" >/dev/null
  before=$(cd "$wt" && CARGO_TARGET_DIR="$PWD/../target" bench_bin)
fi
after=$(bench_bin)
[ -x "$before" ] && [ -x "$after" ] || { echo "could not build the benchmarks ($before, $after)" >&2; exit 1; }
echo "before: $rev ($before)"
echo "after:  working tree at $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + changes')"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores; $rounds rounds, alternating"
quick=--quick
[ "${FULL:-0}" = 1 ] && quick=
out=target/ab/runs.txt
: > "$out"
for i in $(seq 1 "$rounds"); do
  for side in before after; do
    bin=$before; [ "$side" = after ] && bin=$after
    "$bin" --case kinds ${quick:+"$quick"} | sed -n 's/^  \(.*[^ ]\) \+\([0-9.]\+\) ms\/step.*/\1\t\2/p' | sed "s/^/$side\t/" >> "$out"
  done
done
python3 - "$out" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    side, kind, ms = line.rstrip("\n").split("\t")
    runs.setdefault(kind, {}).setdefault(side, []).append(float(ms))
print(f"{'kind':<44} {'before ms':>10} {'after ms':>10} {'after/before':>13}")
for kind, s in runs.items():
    b, a = statistics.median(s["before"]), statistics.median(s["after"])
    print(f"{kind:<44} {b:>10.1f} {a:>10.1f} {a / b:>13.3f}")
PY
