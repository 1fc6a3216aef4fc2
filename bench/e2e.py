"""End-to-end training benchmark: this project's trainer vs open_clip_train, from the same JPEG shards.

Both train the same open_clip model from the bench's photo shards (512-1024 px JPEGs, bench/data_loader.py
builds them once into bench/.cache) with the same batch size, precision, device and number of loader
workers, each in its own process, as a user would run them:

- ours: `python -m pretrain.train` with `data.train=<shards>` (decoding on the device when it is a GPU);
- open_clip's: `python -m open_clip_train.main --dataset-type webdataset --dataset-resampled`, on a private
  copy of webdataset 0.2.86 (its loader dies on webdataset 1.x; see bench/data_loader.py).

Prints samples/s and the share of step time spent waiting for data, over the steps after the first log
interval (start-up and warm-up excluded), and the ratio.

    .venv/bin/python bench/e2e.py --small                      # CPU smoke run: tiny-clip, a few steps
    python bench/e2e.py --model ViT-B-32 --batch-size 512 --precision bf16 --device cuda --workers 14
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_loader import CACHE, build_shards, old_webdataset  # noqa: E402

OPEN_CLIP_MAIN = """
import sys
import open_clip
open_clip.add_model_config(sys.argv[1])  # configs/models/ (tiny-clip) for the CPU smoke run
from open_clip_train.main import main
main(sys.argv[2:])
"""
LINE = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+),")


def ours(args: argparse.Namespace, spec: str, log_every: int) -> dict:
    """Our trainer on the shards; samples/s and data wait of the last logged interval."""
    decode = "device" if args.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"model.name={args.model}", f"data.train={spec}", "data.sampling=resampled",
            f"data.workers={args.workers}", f"data.decode={decode}", f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}", f"train.device={args.device}", f"train.steps={args.steps}",
            "train.warmup_steps=1", f"log.every={log_every}", f"checkpoint.every={args.steps * 10}",
            f"run.dir={run_dir}", "run.name=e2e", f"train.compile={str(args.compile).lower()}",
        ]  # fmt: skip
        run([sys.executable, "-m", "pretrain.train", *overrides], os.environ)
        rows = [json.loads(line) for line in (Path(run_dir) / "e2e/metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "samples_per_s" in r][-1]
    return {"samples_per_s": last["samples_per_s"], "data_wait": last["data_wait"]}


def open_clip_train(args: argparse.Namespace, spec: str, log_every: int) -> dict:
    """open_clip_train.main on the shards; the same two numbers from its last `Data (t) Batch (t)` line."""
    precision = "amp_bf16" if args.precision == "bf16" else "fp32"
    with tempfile.TemporaryDirectory() as logs:
        argv = [
            "--train-data", spec, "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(args.batch_size * args.steps), "--epochs", "1",
            "--model", args.model, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--precision", precision, "--device", args.device, "--lr", "5e-4", "--warmup", "1",
            "--log-every-n-steps", str(log_every), "--logs", logs, "--name", "e2e", "--save-frequency", "0",
            "--report-to", "", "--seed", "0", *(["--torchcompile"] if args.compile else []),
        ]  # fmt: skip
        env_path = ":".join(filter(None, [str(old_webdataset()), str(ROOT), os.environ.get("PYTHONPATH")]))
        models = str(ROOT / "configs" / "models")
        out = run(
            [sys.executable, "-c", OPEN_CLIP_MAIN, models, *argv], {**os.environ, "PYTHONPATH": env_path}
        )
    matches = LINE.findall(out)
    if not matches:
        raise RuntimeError(f"open_clip_train printed no progress line: {out[-2000:]}")
    data_t, batch_t = (float(v) for v in matches[-1])
    return {"samples_per_s": args.batch_size / batch_t, "data_wait": data_t / batch_t}


def run(cmd: list[str], env: dict) -> str:
    """Run a trainer; its stdout and stderr together (both log there), or an error with their tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed with code {proc.returncode}: {out[-3000:]}")
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="training steps; the last half is timed")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile in both trainers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--small", action="store_true", help="CPU smoke run: tiny-clip, batch 16, 4 steps")
    args = parser.parse_args()
    if args.small:
        args.model, args.batch_size, args.steps, args.images, args.shards = "tiny-clip", 16, 4, 256, 4
        args.device, args.precision, args.workers = "cpu", "fp32", 1
    return args


def main() -> None:
    args = parse_args()
    spec = build_shards(CACHE / f"photos-{args.images}-{args.shards}", args.images, args.shards)
    log_every = max(1, args.steps // 2)  # the second interval: steps after start-up and warm-up
    theirs, mine = open_clip_train(args, spec, log_every), ours(args, spec, log_every)
    ratio = mine["samples_per_s"] / theirs["samples_per_s"]
    print(f"model {args.model} | batch {args.batch_size} | {args.precision} | {args.device} | "
          f"workers {args.workers} | {args.steps} steps, last {args.steps - log_every} timed")  # fmt: skip
    print(f"{'':>15} | {'samples/s':>10} | data wait")
    for name, result in (("open_clip_train", theirs), ("ours", mine)):
        print(f"{name:>15} | {result['samples_per_s']:>10.1f} | {result['data_wait']:>8.0%}")
    print(f"ratio (ours / open_clip_train): {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"open_clip_train": theirs, "ours": mine, "ratio": ratio, **vars(args)},
                                        default=str, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
