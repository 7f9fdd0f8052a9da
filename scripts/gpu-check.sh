#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests (every op against the CPU reference, a training run with
# growth against the CPU trainer, the actor runtime on the GPU, the two-stream hand-off), the
# NCCL tests at world size 1 and the NCCL watchdog (tests/nccl.rs), two processes sharing the
# GPU over the host path where the machine has MPI (tests/parallel.rs), then the GPU benchmark
# (GPT-2 124M, T=1024: tokens/s and MFU; a live 0 -> 12 growth; the PyTorch reference of
# benches/gpu_reference.py beside it), ending with a short table. Sized to finish well under 8 minutes on an H100.
#
# On a machine with cargo it builds first. On one without (the lent GPU machines), or with
# GPU_CHECK_PREBUILT=1, it runs the binaries that `scripts/gpu-check.sh --prepare` built and
# copied (compressed) into .gpu/ on a build machine (carry .gpu/ and data/shakespeare-bytes along).
set -uo pipefail  # pipefail: a failing test binary fails its `| tee`
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  # Build the test and benchmark binaries here, for a GPU machine without a Rust toolchain.
  set -e
  mkdir -p .gpu .git/info
  rm -f .gpu/*
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  # `take KIND DEST`: copy the executable of kind KIND (test, bench) that cargo's JSON on stdin
  # names to DEST.
  take() {
    python3 -c 'import sys,json;[print(m["executable"]) for m in map(json.loads,sys.stdin) if m.get("executable") and m["target"]["kind"]==[sys.argv[1]]]' "$1" \
      | while read -r exe; do cp "$exe" "$2"; done
  }
  for t in cuda nccl; do
    cargo test --release --features nccl --test $t --no-run --message-format=json 2>/dev/null | take test .gpu/$t-tests
  done
  cargo bench --features nccl --bench gpu --no-run --message-format=json 2>/dev/null | take bench .gpu/gpu-bench
  # The binary the NCCL watchdog's test starts (TAPROOT_BIN), and, where this machine has MPI,
  # an MPI build of it with the test of two processes sharing one GPU.
  cargo build --release --features nccl --bin taproot
  cp target/release/taproot .gpu/taproot
  if command -v mpicc >/dev/null; then
    cargo test --release --features mpi,nccl --test parallel --no-run --message-format=json 2>/dev/null | take test .gpu/parallel-tests
    cargo build --release --features mpi,nccl --bin taproot
    cp target/release/taproot .gpu/taproot-mpi
  fi
  strip .gpu/*
  # Compressed, so that the binaries and the corpus travel within what a run may carry (64 MiB):
  # about 30 MB instead of 75. The check below unpacks them.
  gzip -9 -f .gpu/*
  ls -la .gpu
  exit 0
fi

# CUDA 13 libraries (cuBLAS, NVRTC) from pip's nvidia/cu13/lib, when python has them.
NV=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null || true)
[ -n "$NV" ] && export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
# NCCL from pip's nvidia/nccl/lib (torch's dependency), loaded by its soname libnccl.so.2.
NCCL_DIR=$(python3 -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))' 2>/dev/null || true)
[ -n "$NCCL_DIR" ] && export LD_LIBRARY_PATH="$NCCL_DIR:${LD_LIBRARY_PATH:-}"
export TAPROOT_REQUIRE_NCCL=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
# What else this machine has, for the runs not yet made on a GPU (NCCL's version comes
# from tests/nccl.rs): an MPI launcher (the 2-process host-path run), and how many GPUs.
command -v mpirun >/dev/null && mpirun --version 2>/dev/null | head -1 || echo "mpirun: not available"
echo "GPUs: $(nvidia-smi -L 2>/dev/null | wc -l)"

# Logs go to $GPU_CHECK_LOGS (default target/gpu-check/): tests.log, nccl.log, parallel.log and
# bench.log.
logs="${GPU_CHECK_LOGS:-target/gpu-check}"
mkdir -p "$logs"
status=0
if command -v cargo >/dev/null && [ "${GPU_CHECK_PREBUILT:-0}" != 1 ]; then
  timeout 400 cargo test --release --features nccl --test cuda -- --test-threads=1 --nocapture 2>&1 | tee "$logs/tests.log" || status=1
  timeout 200 cargo test --release --features nccl --test nccl -- --test-threads=1 --nocapture 2>&1 | tee "$logs/nccl.log" || status=1
  if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
    timeout 300 cargo test --release --features mpi,nccl --test parallel two_processes_share_one_gpu -- --nocapture 2>&1 | tee "$logs/parallel.log" || status=1
  else
    echo "SKIP: two processes on one GPU: no MPI here (mpicc and mpirun)" | tee "$logs/parallel.log"
  fi
  timeout 400 cargo bench --features nccl --bench gpu 2>&1 | tee "$logs/bench.log" || status=1
else
  for f in .gpu/*.gz; do
    [ -e "$f" ] && gunzip -f "$f" && chmod +x "${f%.gz}"
  done
  [ -x .gpu/cuda-tests ] || { echo "no cargo and no prebuilt .gpu/ binaries: run scripts/gpu-check.sh --prepare on a build machine"; exit 2; }
  timeout "${GPU_CHECK_TEST_S:-150}" .gpu/cuda-tests --test-threads=1 --nocapture 2>&1 | tee "$logs/tests.log" || status=1
  TAPROOT_BIN=.gpu/taproot timeout "${GPU_CHECK_NCCL_S:-60}" .gpu/nccl-tests --test-threads=1 --nocapture 2>&1 | tee "$logs/nccl.log" || status=1
  if [ -x .gpu/parallel-tests ] && command -v mpirun >/dev/null; then
    TAPROOT_BIN=.gpu/taproot-mpi timeout "${GPU_CHECK_PARALLEL_S:-60}" .gpu/parallel-tests two_processes_share_one_gpu --nocapture 2>&1 | tee "$logs/parallel.log" || status=1
  else
    echo "SKIP: two processes on one GPU: no MPI here (mpirun, and an MPI build from --prepare)" | tee "$logs/parallel.log"
  fi
  timeout "${GPU_CHECK_BENCH_S:-320}" .gpu/gpu-bench 2>&1 | tee "$logs/bench.log" || status=1
fi
echo "gpu-check exit status: $status"
exit $status
