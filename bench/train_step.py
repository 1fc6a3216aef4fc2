"""Train-step benchmark: this project's Trainer step vs open_clip_train's, side by side, model step only.

Both train the same open_clip model on the same fixed batch already on the device (no data loading):
forward under autocast, the CLIP InfoNCE loss, backward, AdamW step and the logit-scale clamp. Ours is
`pretrain.training.trainer.Trainer.train_step` (single process); open_clip's is the body of
`open_clip_train.train.train_one_epoch` without accumulation (open_clip.ClipLoss, model output as a dict).
Prints samples/s of each, achieved model TFLOP/s and MFU (pretrain/training/flops.py's count: ~3x the forward
matmuls; MFU needs a known GPU or --peak-tflops), and the ratio. `--compile` times both compiled, the way
each is compiled in training: ours per transformer block and the loss (`train.compile=true`), open_clip's
whole model (`open_clip_train --torchcompile`). The data loader is measured separately by bench/data_loader.py.
On CUDA the timed steps run under `torch.cuda.set_sync_debug_mode("warn")`: the host syncs of each step
(none expected for ours) are counted and printed, with the first one's message.

    .venv/bin/python bench/train_step.py                                  # CPU default: tiny-clip, batch 64
    .venv/bin/python bench/train_step.py --model ViT-B-32 --batch-size 512 --precision bf16 --device cuda
    .venv/bin/python bench/train_step.py --model ViT-B-32 --batch-size 512 --precision bf16 --device cuda --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(
    step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int
) -> tuple[float, list]:
    """Seconds per step over `steps` steps after `warmup` (the device synchronised around the timing), and
    the host syncs seen in the timed steps (CUDA only)."""
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    syncs: list[str] = []
    start = time.perf_counter()
    with host_syncs(device, syncs):
        for _ in range(steps):
            loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    assert math.isfinite(loss.item())
    return seconds, syncs


@contextlib.contextmanager
def host_syncs(device: torch.device, found: list[str]) -> Iterator[None]:
    """On CUDA, torch's sync debug mode: each synchronising call (`.item()`, a device-to-host copy, ...)
    inside the block adds its warning's first line to `found`. CPU has no such mode (nothing is added)."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]


def fixed_batch(model_name: str, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of the model's input shapes, on the device."""
    import open_clip

    config = open_clip.get_model_config(model_name)  # the shapes, without building a model for them
    size, context = config["vision_cfg"]["image_size"], config["text_cfg"].get("context_length", 77)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    texts = torch.randint(
        1, open_clip.get_tokenizer(model_name).vocab_size - 1, (batch_size, context), generator=generator
    )
    return images.to(device), texts.to(device)


class FixedSource:
    """Stands in for the data source: the same device batch every step."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.batch = batch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch

    def close(self) -> None:
        pass


def ours(args: argparse.Namespace, batch) -> tuple[float, list]:
    from pretrain.config import load_config
    from pretrain.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"model.name={args.model}", "data.train=synthetic", f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}", f"train.device={args.device}", f"run.dir={run_dir}",
            f"train.steps={args.warmup + args.steps}", "train.warmup_steps=1", "log.every=1000000",
            "checkpoint.every=1000000", f"train.compile={str(args.compile).lower()}",
        ]  # fmt: skip
        trainer = Trainer(load_config(None, overrides))
        trainer.source = FixedSource(batch)
        try:
            return timed(trainer.train_step, trainer.device, args.warmup, args.steps)
        finally:
            trainer.close()


def open_clip_step(args: argparse.Namespace, batch) -> tuple[float, list]:
    """open_clip_train's training step: model(images, texts) -> dict -> ClipLoss, AdamW, clamp."""
    import open_clip

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, device=device, output_dict=True)
    model.train()
    forward = torch.compile(model) if args.compile else model  # open_clip_train --torchcompile
    # open_clip_train.main's parameter groups: no weight decay on gains, biases, embeddings and logit_scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.2},
    ]
    optimizer = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    bf16 = args.precision == "bf16"
    images, texts = batch

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    return timed(step, device, args.warmup, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both (see above)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU on an unlisted device")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from pretrain.models.build import register_model_configs

    register_model_configs()  # configs/models/ (tiny-clip) for open_clip's side too
    batch = fixed_batch(args.model, args.batch_size, torch.device(args.device))
    theirs, their_syncs = open_clip_step(args, batch)
    mine, my_syncs = ours(args, batch)
    syncs = {"open_clip": their_syncs, "ours": my_syncs} if args.device.startswith("cuda") else None
    report(args, {"open_clip": args.batch_size / theirs, "ours": args.batch_size / mine}, syncs)


def report(args: argparse.Namespace, rates: dict[str, float], syncs: dict[str, list] | None) -> None:
    """The table: samples/s, model TFLOP/s and MFU of each, and the ratio; the host syncs of the timed
    steps on CUDA (also as JSON with --json)."""
    from pretrain.models.build import model_config
    from pretrain.training.flops import peak_flops, train_flops_per_sample

    per_sample = train_flops_per_sample(model_config(args.model))
    peak = peak_flops(torch.device(args.device), args.precision, args.peak_tflops)
    compiled = " | torch.compile" if args.compile else ""
    print(f"model {args.model} | batch {args.batch_size} | {args.precision} | {args.device}{compiled} | "
          f"{args.steps} timed steps | {per_sample / 1e9 if per_sample else float('nan'):.1f} GFLOP/sample")  # fmt: skip
    print(f"{'':>10} | {'samples/s':>10} | {'TFLOP/s':>8} | MFU")
    rows = {}
    for name, rate in rates.items():
        tflops = per_sample * rate / 1e12 if per_sample else None
        share = per_sample * rate / peak if per_sample and peak else None
        rows[name] = {"samples_per_s": rate, "tflops": tflops, "mfu": share}
        if syncs is not None:
            rows[name]["host_syncs"] = len(syncs[name])
        cells = [
            f"{rate:>10.1f}",
            f"{tflops:>8.2f}" if tflops else f"{'-':>8}",
            f"{share:.1%}" if share else "-",
        ]
        print(f"{name:>10} | " + " | ".join(cells))
    ratio = rates["ours"] / rates["open_clip"]
    print(f"ratio (ours / open_clip): {ratio:.2f}")
    for name, found in (syncs or {}).items():
        first = f" (first: {found[0]})" if found else ""
        print(f"host syncs in {args.steps} timed steps, {name}: {len(found)}{first}")
    if args.json:
        args.json.write_text(json.dumps({**rows, "ratio": ratio, **vars(args)}, default=str, indent=1))


if __name__ == "__main__":
    main()
