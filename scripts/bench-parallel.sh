#!/usr/bin/env bash
# Data parallelism on the CPU, one core per rank: the same run (the global batch fixed) trained
# by one process and by D = 2 processes under mpirun, measured in the same invocation. Prints
# each one's time per step, the speed-up and scaling efficiency of D = 2 against D = 1, the
# all-reduce time per layer and step, and the fraction of it hidden behind backward. A third run,
# one process training only one replica's share of the micro-batches, is the bound D = 2 could
# reach with free communication: what each replica still does in full (the optimizer step, the
# per-step overheads) is in it.
#
# Pipeline stages across processes: the same run with its layers split over two stages, once in
# one process (two logical devices, `placement.devices = ["cpu:0", "cpu:1"]`) and once as P = 2
# processes under mpirun (one device each); the cost of the process boundary is the difference
# (frames: download, checksum, MPI send, upload), printed with the frame bytes per step.
#
#   scripts/bench-parallel.sh [--steps 40] [--channels 128] [--depth 6]
#
# Needs an MPI library (Debian: openmpi-bin libopenmpi-dev libclang-dev); builds
# `--features mpi`. Run it on an otherwise idle machine: on 2 cores the two ranks fill it.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=40
channels=128
depth=6
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --channels) channels="$2"; shift 2 ;;
    --depth) depth="$2"; shift 2 ;;
    *) echo "usage: scripts/bench-parallel.sh [--steps N] [--channels C] [--depth L]" >&2; exit 2 ;;
  esac
done
command -v mpirun >/dev/null || { echo "mpirun not found (Debian: openmpi-bin libopenmpi-dev libclang-dev)" >&2; exit 1; }
cargo build --release --features mpi --quiet
[ -d data/shakespeare-bytes ] || { scripts/fetch-data.sh && ./target/release/taproot data prepare data/raw/shakespeare --out data/shakespeare-bytes --tokenizer bytes --name shakespeare; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat > "$out/bench.toml" <<EOF
[run]
name = "bench-parallel"
seed = 1
steps = $steps
log_every = 0

[data]
dir = "data/shakespeare-bytes"
tokenizer = "bytes"
batch_size = 8
seq_len = 64
micro_batches = 4

[model]
channels = $channels
heads = 4
depth = $depth

[eval]
every = $steps
batches = 1
EOF
export RAYON_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run() { # label, command...
  local label=$1; shift
  "$@" > "$out/$label.log" 2>&1 || { cat "$out/$label.log"; exit 1; }
}
run d1 ./target/release/taproot train --config "$out/bench.toml" --set run.out_dir="$out/d1"
run share ./target/release/taproot train --config "$out/bench.toml" --set run.out_dir="$out/share" --set data.micro_batches=2
run d2 mpirun -np 2 --oversubscribe ${MPIRUN_ARGS:---bind-to core} ./target/release/taproot train --config "$out/bench.toml" --set run.out_dir="$out/d2" --set parallel.data=2
run p1 ./target/release/taproot train --config "$out/bench.toml" --set run.out_dir="$out/p1" --set 'placement.devices=["cpu:0","cpu:1"]'
run p2 mpirun -np 2 --oversubscribe ${MPIRUN_ARGS:---bind-to core} ./target/release/taproot train --config "$out/bench.toml" --set run.out_dir="$out/p2" --set parallel.pipeline=2
python3 - "$out" "$steps" "$depth" <<'PY'
import re, sys
out, steps, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def steps_s(label):
    # the training clock of steps.csv (elapsed_s after the last step, evaluation excluded
    # by the run log), over the steps after the first (warm-up)
    rows = [l.split(",") for l in open(f"{out}/{label}/steps.csv").read().split("\n")[1:] if l]
    t = [float(r[-1]) for r in rows]
    return (t[-1] - t[0]) / (len(t) - 1)
t1, t2, ts = steps_s("d1"), steps_s("d2"), steps_s("share")
ar = re.search(r"allreduce rank=0 reductions=(\d+) mib=([\d.]+) reduce_s=([\d.]+) waited_s=([\d.]+) hidden_pct=(\d+)", open(f"{out}/d2.log").read())
n, mib, red, wait, hidden = int(ar[1]), float(ar[2]), float(ar[3]), float(ar[4]), ar[5]
units = depth + 2  # layers, embedding, head (+ the loss: one tiny reduction per step)
print(f"| replicas | s / step | speed-up vs D=1 | scaling efficiency |")
print(f"|---|---|---|---|")
print(f"| 1 (one process, 1 core) | {t1:.4f} | 1 | 1 |")
print(f"| 2 (mpirun, 1 core per rank) | {t2:.4f} | {t1 / t2:.2f}× | {t1 / t2 / 2:.0%} |")
print(f"| bound: one replica's share alone (1 process, half the micro-batches) | {ts:.4f} | {t1 / ts:.2f}× | {t1 / ts / 2:.0%} |")
print(f"\nall-reduce on rank 0: {n} reductions, {mib:.1f} MiB, {red:.3f} s in MPI over {steps} steps = "
      f"{1e3 * red / steps / units:.2f} ms per unit and step; waited {wait:.3f} s: {hidden}% hidden behind backward")
tp1, tp2 = steps_s("p1"), steps_s("p2")
fr = re.search(r"frames rank=0 sent=(\d+) mib_sent=([\d.]+) mib_received=([\d.]+)", open(f"{out}/p2.log").read())
print(f"\n| pipeline ({depth} layers over 2 stages) | s / step | speed-up vs 1 device |")
print(f"|---|---|---|")
print(f"| 1 process, 1 device | {t1:.4f} | 1 |")
print(f"| 1 process, 2 devices (P = 1) | {tp1:.4f} | {t1 / tp1:.2f}× |")
print(f"| 2 processes, 1 device each (P = 2, mpirun) | {tp2:.4f} | {t1 / tp2:.2f}× |")
print(f"\nP = 2 against P = 1: {tp1 / tp2:.2f}× (the process boundary's cost or gain); stage 0 sent {int(fr[1]) / steps:.0f} frames, "
      f"{float(fr[2]) / steps:.2f} MiB per step and received {float(fr[3]) / steps:.2f} MiB per step")
PY
