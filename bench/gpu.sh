#!/usr/bin/env bash
# The GPU benchmark run, in one call on a lent machine (PyTorch there, no package index): install the wheels
# that bench/gpu_wheels.sh fetched (when .whl/ is there), then, each under a time cap so that the whole run
# ends within BUDGET_S (default 450 s, inside 8 minutes): the train step eager and compiled (ViT-B/32, batch
# 512, bf16), the loss memory against open_clip, end to end from photo shards against open_clip_train, and the
# data loader. Output goes to stdout and to $OUT (default /tmp): one .txt (and .json) per bench and
# summary.json (date, device, versions, each bench's exit code, seconds and results) for docs/PERFORMANCE.md.
#   bash bench/gpu.sh                                    # on the GPU machine, carrying .whl
#   PATH=$PWD/.venv/bin:$PATH DEVICE=cpu MODEL=tiny-clip BATCH=32 IMAGES=256 WORKERS=1 bash bench/gpu.sh  # dry run
# The CPU dry run skips the compiled train step (minutes of CPU compilation, no GPU information; COMPILE=1 runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONWARNINGS=ignore
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD BENCH_WHEELS=$PWD/.whl/old
fi
device=${DEVICE:-cuda} model=${MODEL:-ViT-B-32} batch=${BATCH:-512} out=${OUT:-/tmp}
cpu=$([ "$device" = cpu ] && echo 1 || echo 0)
images=${IMAGES:-1024} shards=${SHARDS:-$([ $cpu = 1 ] && echo 4 || echo 16)} workers=${WORKERS:-14}
precision=$([ $cpu = 1 ] && echo fp32 || echo bf16)
steps=$([ $cpu = 1 ] && echo 3 || echo 20)
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET_S:-450}))
nvidia-smi -L 2>/dev/null
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'

bench() {  # bench NAME CAP_S CMD...: run under min(CAP_S, time left); NAME.txt, NAME.rc and NAME.s in $out
  local name=$1 cap=$2 left=$((deadline - SECONDS)) start=$SECONDS
  shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then
    echo "== $name: skipped, the time budget is spent" | tee "$out/$name.txt"
    echo skipped >"$out/$name.rc"
    return
  fi
  echo "== $name (at most ${cap} s)"
  timeout "$cap" "$@" 2>&1 | grep -v WARNING | tee "$out/$name.txt"
  echo "${PIPESTATUS[0]}" >"$out/$name.rc"
  echo $((SECONDS - start)) >"$out/$name.s"
}

step_args=(--model "$model" --batch-size "$batch" --precision "$precision" --device "$device" --steps "$steps")
bench train_step 120 python3 bench/train_step.py "${step_args[@]}" --json "$out/train_step.json"
if [ $cpu = 0 ] || [ "${COMPILE:-0}" = 1 ]; then
  bench train_step_compile 180 python3 bench/train_step.py "${step_args[@]}" --compile --json "$out/train_step_compile.json"
fi
# Loss memory, open_clip's ClipLoss until it runs out of memory, ours to 1M (a CPU dry run takes the small mode).
loss_mode=$([ $cpu = 1 ] && echo --small || echo --device cuda --precision bf16 --max-seconds 20)
bench loss_memory 120 python3 bench/loss_memory.py $loss_mode --json "$out/loss_memory.json"
e2e_steps=$([ $cpu = 1 ] && echo 4 || echo 40)
bench e2e 180 python3 bench/e2e.py --model "$model" --batch-size "$batch" --precision "$precision" --device "$device" \
  --workers "$workers" --images "$images" --shards "$shards" --steps "$e2e_steps" --json "$out/e2e.json"
bench data_loader 90 python3 bench/data_loader.py --images "$images" --shards "$shards" --workers "$workers" \
  --batch-size "$batch" --batches 10 --model "$model" --device "$device"
python3 bench/summary.py "$out" "$device"
