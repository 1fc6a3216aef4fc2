#!/usr/bin/env bash
# The GPU benchmark run, in one call on a lent machine (PyTorch there, no package index): install the wheels
# that bench/gpu_wheels.sh fetched, then time the train step, the data loader and the loss memory against open_clip.
# Results go to stdout and to $OUT (when set) for docs/PERFORMANCE.md.
#   bash bench/gpu.sh                                    # on the GPU machine, carrying .whl
#   PATH=$PWD/.venv/bin:$PATH DEVICE=cpu MODEL=tiny-clip BATCH=32 IMAGES=256 WORKERS=1 bash bench/gpu.sh  # dry run
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD BENCH_WHEELS=$PWD/.whl/old PYTHONWARNINGS=ignore
device=${DEVICE:-cuda} model=${MODEL:-ViT-B-32} batch=${BATCH:-256} out=${OUT:-/tmp}
nvidia-smi -L
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
python3 bench/train_step.py --model "$model" --batch-size "$batch" --precision bf16 --device "$device" --steps 20 \
  2>&1 | grep -v WARNING | tee "$out/train_step.txt"
python3 bench/data_loader.py --images "${IMAGES:-4000}" --shards 16 --workers ${WORKERS:-4 8 14} --batch-size "$batch" \
  --batches 10 --device "$device" 2>&1 | grep -v WARNING | tee "$out/data_loader.txt"
# Loss memory, open_clip's ClipLoss until it runs out of memory, ours to 1M (a CPU dry run takes the small mode).
loss_mode=$([ "$device" = cpu ] && echo --small || echo --device cuda --precision bf16)
python3 bench/loss_memory.py $loss_mode --json "$out/loss_memory.json" 2>&1 | grep -v WARNING | tee "$out/loss_memory.txt"
