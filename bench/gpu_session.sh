#!/usr/bin/env bash
# Every GPU check and timing this repo has, in one go (under 5 minutes on an H100 before the language-model
# steps, which add up to 14 more at most; the steps' time limits add up to 26 minutes):
#   bash bench/gpu_session.sh DATA_ROOT [OUT_DIR]
# DATA_ROOT holds MNIST/raw. Writes OUT_DIR/session.log and the benchmarks' JSON files; each
# step has a time limit, and a failed step does not stop the ones after it.
set -u
root=${1:?usage: bash bench/gpu_session.sh DATA_ROOT [OUT_DIR]}
out=${2:-bench_results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/session.log"
export PYTHONUNBUFFERED=1 RNNDDP_TEST_DATA="$root" RNNDDP_REQUIRE_GPU=1  # GPU tests fail, not skip

step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

{ nvidia-smi -L; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"; } 2>&1 | tee -a "$log"
step gpu_check 75 "$py" -m bench.gpu_check --out "$out/gpu_check.json"
step throughput 140 "$py" -m bench.throughput --root "$root" --out "$out/throughput.json"
# The GPU model (LSTM-128, batch 256, bf16) for every part, with train.cuda_graph on.
step throughput_cuda_graph 90 "$py" -m bench.throughput --root "$root" --hidden 128 --batch 256 --precision bf16 \
  --steps 300 --skip ddp2,time_to_98.5 --set train.cuda_graph=true --out "$out/throughput_cuda_graph.json"
# The same step in fp32 (TF32): no casts, no loss scaling.
step throughput_cuda_graph_fp32 60 "$py" -m bench.throughput --root "$root" --hidden 128 --batch 256 --precision fp32 \
  --steps 300 --skip tutorial,ddp2,time_to_98.5,gpu_epoch,pixel_epoch --set train.cuda_graph=true \
  --out "$out/throughput_cuda_graph_fp32.json"
# Variable-length batches on cuDNN: bucketed vs random vs fixed length, padded vs packed.
step sequences 60 "$py" -m bench.sequences --device cuda --steps 50
step pytest_gpu 170 "$py" -m pytest -q -rs -n 0 -p no:cacheprovider tests/e2e/test_gpu.py
step smnist 110 "$py" -m torch.distributed.run --nproc_per_node=1 train_ddp.py --config configs/smnist.yaml \
  "data.root=$root" wandb.mode=disabled run_dir=/tmp/rnnddp_smnist_gpu
# Language models (docs/results.md's GPU rows): the training-speed comparison, tiny-shakespeare for about
# 4 minutes, and the full Penn Treebank recipe (configs/ptb_word.yaml: 2 x 650, 40 epochs; test <= 80 is the goal).
step language_model 120 "$py" -m bench.language_model --device cuda --precision bf16
step shakespeare 330 "$py" -m bench.language_results shakespeare --nproc 1 --minutes 4 --root "$root/text"
step ptb 420 "$py" -m bench.language_results ptb --nproc 1 --root "$root/text"
