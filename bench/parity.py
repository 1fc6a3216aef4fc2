"""Learning parity with open_clip_train: the same recipe trained by `pretrain train` and by
`open_clip_train.main`, both scored by clip_benchmark on the same held-out sets.

For each model (tiny-clip; tiny-siglip, open_clip_train's `--siglip`; tiny-coca, its CoCa loss with the same
caption weight) and seed, both trainers get the demo shards (`data-tools demo-data`), global batch, AdamW
betas / eps / weight decay (matrices only, in both), peak lr, linear warmup + cosine to 0, gradient clipping,
step count, fp32 on CPU, one loader worker, and the same OMP_NUM_THREADS. open_clip_train is epoch-based and
steps its scheduler once per batch: one epoch of `--train-num-samples steps x batch` is exactly `steps`
batches with one worker (fewer samples than the shards hold, so no pass ends early). Each trainer runs in its
own subprocess, one after the other (both at once with --side-by-side: then both see the same load from other
jobs); wall time is that process's, start-up included, and CPU time its and its loader worker's.

Scores: clip_benchmark's zeroshot_classification top-1 on the demo's classification set and
zeroshot_retrieval recall@5 (text->image, clip_benchmark's `image_retrieval`; and image->text) on its
retrieval set (bench/parity_score.py), ours loaded from its `pretrain export` folder (`local-dir:`),
open_clip_train's from its epoch_1.pt.

What is not the same, by construction: the sample order (ours: data.sampling=epoch, 1000-sample shuffle
blocks; open_clip_train: its shard shuffle and 5000-sample buffer), the model's initial weights (each
trainer draws them from the seed its own way), and the random crops. CoCa's caption head starts differently:
open_clip never initialises `text_decoder.text_projection` (torch.empty: zeros in practice), ours draws it
N(0, width^-0.5) (pretrain/models/build.py). tiny-siglip is trained and scored on open_clip's side under the
alias tiny-sigmoid (open_clip_models()). "loss" is each trainer's training loss (for CoCa contrastive +
caption_weight x caption; "caption" is the unweighted caption loss) averaged over the last `--loss-window`
steps, both read from per-step logs (ours: metrics.jsonl with log.every=1, the step's loss; open_clip_train:
its `Loss: val` of each batch with --log-every-n-steps 1). Both compute it on that step's batch alone, before the update.

    .venv/bin/python bench/parity.py --side-by-side        # 3 models x 3 seeds, 250 steps of batch 32
    .venv/bin/python bench/parity.py --smoke --data DIR     # tiny-clip, one seed, a few steps (the test's)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_loader import CACHE, old_webdataset  # noqa: E402

MODELS = ("tiny-clip", "tiny-siglip", "tiny-coca")
CLIP_BENCHMARK = ROOT / "tests" / "requirements-clip-benchmark.txt"
OPEN_CLIP_MAIN = """
import sys
import open_clip
open_clip.add_model_config(sys.argv[1])  # configs/models/ (tiny-clip, tiny-siglip, tiny-coca)
from open_clip_train.main import main
main(sys.argv[2:])
"""
OPEN_CLIP_NAMES = {"tiny-siglip": "tiny-sigmoid"}  # see open_clip_models()
LOSS = re.compile(r"(\w+): ([-+0-9.eE]+) \(")  # open_clip_train's `Contrastive_loss: 4.1 (4.2)` (val (avg))


def private_site(requirements: Path, name: str) -> Path:
    """The packages of `requirements`, installed once with --no-deps into bench/.cache (never into this
    environment), for a subprocess's PYTHONPATH."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    target = CACHE / f"{name}-{digest}"
    if not target.is_dir():
        tmp = CACHE / f".{target.name}.{os.getpid()}"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            "--no-deps",
            "--target",
            str(tmp),
        ]
        subprocess.run([*cmd, "-r", str(requirements)], check=True)
        os.replace(tmp, target)
    return target


def run(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """Run a command; its stdout + stderr, wall seconds and CPU seconds (user + system of it and the
    processes it waited for, its loader workers: on shared cores the steadier measure), or an error with
    their tail. Each child's own rusage (wait4), so two runs at once are measured apart."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds, cpu = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed with code {proc.returncode}: {out[-3000:]}")
    return out, seconds, cpu


def environment(args: argparse.Namespace, *paths: Path) -> dict:
    """This environment with the same threads for every trainer and `paths` first on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [*map(str, paths), str(ROOT), os.environ.get("PYTHONPATH")]))
    threads = {
        "OMP_NUM_THREADS": str(args.threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "MKL_NUM_THREADS": str(args.threads),
    }
    return {**os.environ, **threads, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


def window_mean(values: list[float], window: int) -> float:
    return statistics.fmean(values[-window:])


def train_ours(args: argparse.Namespace, model: str, seed: int, spec: str, work: Path) -> dict:
    """`python -m pretrain.train` with the recipe; then `pretrain export` for clip_benchmark."""
    overrides = [
        f"model.name={model}", f"data.train={spec}", "data.workers=1", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.seed={seed}", "train.precision=fp32", "train.device=cpu",
        f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}", f"train.weight_decay={args.weight_decay}",
        f"train.beta1={args.betas[0]}", f"train.beta2={args.betas[1]}", f"train.eps={args.eps}",
        f"train.grad_clip={args.grad_clip}", "log.every=1", f"checkpoint.every={args.steps}",
        f"run.dir={work}", "run.name=ours",
    ]  # fmt: skip
    if model == "tiny-coca":
        overrides.append(f"loss.caption_weight={args.caption_weight}")
    env = environment(args)
    _, seconds, cpu = run(
        [sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs/tiny.yaml"), *overrides], env
    )
    rows = [json.loads(line) for line in (work / "ours/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "eval" not in r]
    run(
        [
            sys.executable,
            "-m",
            "pretrain.cli",
            "export",
            "--checkpoint",
            str(work / "ours"),
            "--output",
            str(work / "export"),
        ],
        env,
    )
    return {
        "seconds": seconds, "cpu_seconds": cpu, "steps": rows[-1]["step"],
        "loss": window_mean([r["loss"] for r in rows], args.loss_window),
        "caption_loss": window_mean([r["loss_caption"] for r in rows], args.loss_window) if "loss_caption" in rows[-1] else None,
        "model": f"local-dir:{work / 'export'}", "pretrained": "",
    }  # fmt: skip


def train_open_clip(args: argparse.Namespace, name: str, seed: int, spec: str, work: Path) -> dict:
    """open_clip_train.main with the recipe, on webdataset 0.2.86 (its loader dies on 1.x)."""
    model = OPEN_CLIP_NAMES.get(name, name)
    argv = [
        "--train-data", spec, "--dataset-type", "webdataset", "--train-num-samples", str(args.steps * args.batch_size),
        "--epochs", "1", "--model", model, "--batch-size", str(args.batch_size), "--workers", "1",
        "--precision", "fp32", "--device", "cpu", "--lr", str(args.lr), "--warmup", str(args.warmup),
        "--wd", str(args.weight_decay), "--beta1", str(args.betas[0]), "--beta2", str(args.betas[1]),
        "--eps", str(args.eps), "--grad-clip-norm", str(args.grad_clip), "--log-every-n-steps", "1",
        "--logs", str(work), "--name", "open_clip", "--save-frequency", "1", "--zeroshot-frequency", "0",
        "--report-to", "", "--seed", str(seed),
    ]  # fmt: skip
    if name == "tiny-siglip":
        argv.append("--siglip")
    if name == "tiny-coca":
        argv += [
            "--coca-caption-loss-weight",
            str(args.caption_weight),
            "--coca-contrastive-loss-weight",
            "1",
        ]
    env = environment(args, old_webdataset())
    out, seconds, cpu = run([sys.executable, "-c", OPEN_CLIP_MAIN, str(args.open_clip_models), *argv], env)
    steps = [dict(LOSS.findall(line)) for line in out.splitlines() if "Train Epoch:" in line]
    checkpoint = work / "open_clip/checkpoints/epoch_1.pt"
    return {
        "seconds": seconds, "cpu_seconds": cpu, "steps": len(steps),
        "loss": window_mean([float(s["Loss"]) for s in steps], args.loss_window),
        "caption_loss": window_mean([float(s["Caption_loss"]) / args.caption_weight for s in steps], args.loss_window) if "Caption_loss" in steps[-1] else None,
        "model": model, "pretrained": str(checkpoint),
    }  # fmt: skip


TRAINERS = {"ours": train_ours, "open_clip_train": train_open_clip}


def score(args: argparse.Namespace, data: Path, results: list[dict]) -> None:
    """clip_benchmark's scores of every trained model, in one subprocess; added to each result."""
    models = [x for r in results for x in (r["model"], r["pretrained"])]
    cmd = [
        sys.executable,
        str(ROOT / "bench/parity_score.py"),
        str(args.open_clip_models),
        str(data),
        str(data / "retrieval"),
        *models,
    ]
    out, _, _ = run(cmd, environment(args, private_site(CLIP_BENCHMARK, "clip-benchmark")))
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for result, scores in zip(results, lines, strict=True):
        result.update(
            top1=scores["acc1"],
            t2i_r5=scores["image_retrieval_recall@5"],
            i2t_r5=scores["text_retrieval_recall@5"],
        )


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    print(f"{args.steps} steps | batch {args.batch_size} | lr {args.lr} | warmup {args.warmup} | wd {args.weight_decay} | "
          f"OMP_NUM_THREADS={args.threads} | loss: mean of the last {args.loss_window} steps")  # fmt: skip
    head = f"{'model':<12}| {'seed':>4} | {'trainer':<15}| {'top-1':>6} | {'R@5 t2i':>7} | {'R@5 i2t':>7} | {'loss':>7} | {'caption':>7} | {'wall s':>7} | {'cpu s':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        caption = f"{r['caption_loss']:>7.4f}" if r["caption_loss"] is not None else f"{'-':>7}"
        print(f"{r['name']:<12}| {r['seed']:>4} | {r['trainer']:<15}| {r['top1']:>6.3f} | {r['t2i_r5']:>7.3f} | "
              f"{r['i2t_r5']:>7.3f} | {r['loss']:>7.4f} | {caption} | {r['seconds']:>7.1f} | {r['cpu_seconds']:>7.1f}")  # fmt: skip
    for name in args.models:
        for trainer in ("ours", "open_clip_train"):
            rows = [r for r in results if r["name"] == name and r["trainer"] == trainer]
            mean = {
                k: statistics.fmean(r[k] for r in rows)
                for k in ("top1", "t2i_r5", "i2t_r5", "loss", "seconds", "cpu_seconds")
            }
            print(f"{name:<12}| {'mean':>4} | {trainer:<15}| {mean['top1']:>6.3f} | {mean['t2i_r5']:>7.3f} | "
                  f"{mean['i2t_r5']:>7.3f} | {mean['loss']:>7.4f} | {'':>7} | {mean['seconds']:>7.1f} | {mean['cpu_seconds']:>7.1f}")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--models", nargs="+", choices=MODELS, default=list(MODELS))
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--steps", type=int, default=250)
    add("--batch-size", type=int, default=32)
    add("--lr", type=float, default=1e-3)
    add("--warmup", type=int, default=25)
    add("--weight-decay", type=float, default=0.1)
    add("--betas", type=float, nargs=2, default=[0.9, 0.98])
    add("--eps", type=float, default=1e-6)
    add("--grad-clip", type=float, default=1.0, help="max gradient norm (our default; open_clip_train: off)")
    add(
        "--caption-weight", type=float, default=2.0, help="tiny-coca's caption loss weight (both defaults: 2)"
    )
    add("--threads", type=int, default=1, help="OMP_NUM_THREADS of every trainer")
    add("--loss-window", type=int, default=20, help="final loss: mean over this many last steps")
    add("--data", type=Path, default=CACHE / "parity-demo-data", help="demo-data folder (written if absent)")
    add(
        "--side-by-side",
        action="store_true",
        help="run both trainers of a model and seed at once (each on its own core when two are free): both then "
        "see the same load from anything else on the machine",
    )
    add(
        "--work", type=Path, help="keep the runs here (default: a temporary folder); a rerun skips those done"
    )
    add("--json", type=Path, help="also write every result here")
    add("--smoke", action="store_true", help="tiny-clip, seed 0, 4 steps at batch 16 (the smoke test's)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.seeds, args.steps, args.batch_size, args.warmup, args.loss_window = (
            ["tiny-clip"],
            [0],
            4,
            16,
            1,
            2,
        )
    return args


def open_clip_models(folder: Path) -> Path:
    """configs/models' JSONs in `folder`, with tiny-siglip also as `tiny-sigmoid`: open_clip's get_tokenizer
    gives any name containing "siglip" a T5 SigLIP tokenizer (a download), so open_clip_train trains, and
    clip_benchmark loads, the same config under that name, with open_clip's BPE tokenizer as ours."""
    folder.mkdir(parents=True, exist_ok=True)
    for config in (ROOT / "configs/models").glob("*.json"):
        shutil.copy(config, folder / config.name)
    shutil.copy(folder / "tiny-siglip.json", folder / f"{OPEN_CLIP_NAMES['tiny-siglip']}.json")
    return folder


def fresh(folder: Path) -> Path:
    """`folder`, emptied of what a stopped run left (open_clip_train refuses to start over its own logs)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def train_all(args: argparse.Namespace, spec: str, work: Path) -> list[dict]:
    """Every model, seed and trainer, skipping those `work/results.jsonl` already holds (a rerun resumes)."""
    log = work / "results.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    results = []
    with ThreadPoolExecutor(2 if args.side_by_side else 1) as pool:
        for name, seed in ((n, s) for n in args.models for s in args.seeds):
            old = {
                r["trainer"]: r
                for r in done
                if (r["name"], r["seed"], r["steps"]) == (name, seed, args.steps)
            }
            runs = {
                t: pool.submit(f, args, name, seed, spec, fresh(work / f"{name}-{seed}-{t}"))
                for t, f in TRAINERS.items()
                if t not in old
            }
            for trainer in TRAINERS:
                result = old.get(trainer) or {
                    "name": name,
                    "seed": seed,
                    "trainer": trainer,
                    **runs[trainer].result(),
                }
                if result["steps"] != args.steps:
                    raise RuntimeError(f"{trainer} ran {result['steps']} steps, not {args.steps}")
                if trainer not in old:
                    with log.open("a") as f:
                        f.write(json.dumps(result) + "\n")
                results.append(result)
                print(
                    f"{name} seed {seed} {trainer}: loss {result['loss']:.4f}, {result['seconds']:.0f} s",
                    flush=True,
                )
    return results


def main() -> None:
    args = parse_args()
    if not (args.data / "demo.json").is_file():
        from webshards.demo_data import write_demo_data

        write_demo_data(args.data)
    spec = str(args.data / json.loads((args.data / "demo.json").read_text())["train"])
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        work = args.work or Path(tmp)
        args.open_clip_models = open_clip_models(work / "open_clip_models")
        results = train_all(args, spec, work)
        score(args, args.data, results)
    print_table(args, results)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, default=str, indent=1))


if __name__ == "__main__":
    main()
