"""Loss-memory benchmark: peak extra memory and time of the contrastive loss's forward + backward against
the global batch, open_clip's `ClipLoss` (the full N x N logits) beside ours (`ClipLoss(chunk_size)`:
log-sum-exps over chunk x chunk blocks, recomputed in backward).

One process scores the whole global batch (what one rank of W does for W x its local rows is the same
per-rank memory as here with N = the global batch, up to the gathered features). open_clip runs until it
runs out of memory (CUDA) or past `--open-clip-max` (CPU, where running out would swap the machine); ours
runs beyond, until `--max-seconds` is passed. Extra memory includes the feature gradients:
- CUDA: `max_memory_allocated` during forward + backward minus what was allocated before.
- CPU: the resident-set high-water mark (VmHWM, reset just before the loss) minus the RSS at the reset,
  each size in a fresh process (`--small`: all in one), glibc mapping every block of 64 KiB or more on its
  own so that freed blocks leave the RSS; tracemalloc would not see torch's allocations, which bypass
  Python's allocator.

    .venv/bin/python bench/loss_memory.py --small                 # CPU, seconds: 256 ... 1k, dim 64, one process
    .venv/bin/python bench/loss_memory.py --device cpu            # CPU: 4k ... 32k, open_clip to 8k
    .venv/bin/python bench/loss_memory.py --device cuda --precision bf16   # 4k ... 1M
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 2**20


def _loss(impl: str, chunk: int):
    if impl == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        return OpenClipLoss()
    from pretrain.loss import ClipLoss

    return ClipLoss(chunk_size=chunk)


def _features(batch: int, dim: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    img, txt = (F.normalize(torch.randn(batch, dim, generator=g, device=device), dim=-1) for _ in range(2))
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_(), scale


def _rss_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure_here(impl: str, batch: int, dim: int, chunk: int, device: torch.device, dtype) -> dict:
    """(extra bytes, seconds) of one forward + backward in this process, after a small warm-up."""
    loss_fn = _loss(impl, chunk)
    loss_fn(*_features(min(batch, 2 * chunk), dim, device, dtype)).backward()  # kernels, threads, pools
    inputs = _features(batch, dim, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        before = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    loss_fn(*inputs).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    return {"extra_bytes": peak - before, "seconds": time.perf_counter() - start}


def return_freed_memory() -> None:
    """Make glibc map every block of 64 KiB or more on its own and unmap it when freed, so that the RSS
    follows the live allocations instead of heap pages kept (or fragmented) from earlier blocks. Costs a
    page fault per 4 KiB of every new block: CPU times here include that."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # -3: M_MMAP_THRESHOLD


def measure(impl: str, batch: int, args: argparse.Namespace) -> dict | None:
    """One measurement: in a fresh process on CPU, in this one on CUDA and in the small mode; None when out
    of memory."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.device == "cuda" or args.small:
        try:
            return measure_here(impl, batch, args.dim, args.chunk, torch.device(args.device), dtype)
        except torch.OutOfMemoryError:
            return None
        finally:
            if args.device == "cuda":
                torch.cuda.empty_cache()
    cmd = [sys.executable, __file__, "--one", impl, str(batch), "--dim", str(args.dim)]
    cmd += ["--chunk", str(args.chunk), "--precision", args.precision]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loss_memory: {impl} at batch {batch} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def _cell(result: dict | None, skipped: str) -> str:
    if result is None:
        return f"{skipped:>22}"
    return f"{result['extra_bytes'] / MIB:>10.1f} MiB {result['seconds']:>7.2f} s"


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every size, print the table as it goes; returns the rows."""
    print(
        f"loss forward+backward | dim {args.dim} | {args.precision} | {args.device} | ours chunk {args.chunk}"
    )
    print(f"{'global batch':>12} | {'open_clip ClipLoss':>22} | {'ours':>22}")
    rows, open_clip_alive, ours_alive = [], True, True
    theirs_note, ours_note = "skipped (cap)", "skipped (time)"
    for batch in args.sizes:
        theirs = mine = None
        if open_clip_alive and batch <= args.open_clip_max:
            theirs = measure("open_clip", batch, args)
            open_clip_alive = theirs is not None
            theirs_note = theirs_note if open_clip_alive else "out of memory"
        if ours_alive:
            mine = measure("ours", batch, args)
            ours_alive = mine is not None and mine["seconds"] <= args.max_seconds
            ours_note = ours_note if mine is not None else "out of memory"
        print(f"{batch:>12} | {_cell(theirs, theirs_note)} | {_cell(mine, ours_note)}", flush=True)
        rows.append({"batch": batch, "open_clip": theirs, "ours": mine})
        if not (open_clip_alive or ours_alive):
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--chunk", type=int, default=None, help="ours: block size (default 4096 CUDA, 2048 CPU)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="global batch sizes")
    parser.add_argument("--open-clip-max", type=int, default=None, help="largest batch for open_clip")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="ours stops after a slower size")
    parser.add_argument("--small", action="store_true", help="CPU, seconds: 256 ... 1k, dim 64, chunk 256")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.device, args.dim, args.chunk = "cpu", 64, args.chunk or 256
        args.sizes = args.sizes or [256, 512, 1024]
    cuda = args.device == "cuda"
    args.chunk = args.chunk or (4096 if cuda else 2048)
    args.sizes = args.sizes or [2**k for k in range(12, 21 if cuda else 16)]  # 4k ... 1M (CPU: ... 32k)
    args.open_clip_max = args.open_clip_max or (2**20 if cuda else 8192)
    if args.device == "cpu":
        return_freed_memory()
    if args.one:
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        impl, batch = args.one[0], int(args.one[1])
        print(json.dumps(measure_here(impl, batch, args.dim, args.chunk, torch.device("cpu"), dtype)))
        return
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "dim": args.dim, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
