"""What a checkpoint's manifest costs: the checksums' speeds, and `CheckpointManager.save` with and without it.

1. Throughput of reading a file of `--mb` MB, of CRC-32 (zlib, what manifests carry), sha256 and blake2b
   (hashlib) over it, each the best of `--repeat` (the file is in the page cache: a manifest is written right
   after the files it lists, and verifying reads what the disk gives).
2. `CheckpointManager.save()` of a model file of `--mb` MB (safetensors) and its AdamW moments (optimizer.pt,
   twice that), the real save path on one process, with the manifest (`seal`, rank 0, after every rank wrote)
   and with `seal` replaced by a no-op; and `verify_checkpoint` of the saved folder (what resume, eval and
   export add before loading). Medians of `--repeat`.

    .venv/bin/python bench/checkpoint_manifest.py               # 100 MB checksums, 150 MB model
    .venv/bin/python bench/checkpoint_manifest.py --small       # smoke run: 8 MB
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webshards.publish import BLOCK, checksum  # noqa: E402


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def read_all(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(BLOCK):
            pass


def blake2b(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def checksums(folder: Path, mb: int, repeat: int) -> None:
    path = folder / "random.bin"
    path.write_bytes(os.urandom(mb << 20))
    print(f"checksums of a {mb} MB file (best of {repeat}):")
    print(f"{'':10}|{'ms':>8} |{'MB/s':>7}")
    for name, fn in [
        ("read only", lambda: read_all(path)),
        ("crc32", lambda: checksum(path, "crc32")),
        ("sha256", lambda: checksum(path, "sha256")),
        ("blake2b", lambda: blake2b(path)),
    ]:
        seconds = best_seconds(fn, repeat)
        print(f"{name:10}|{seconds * 1000:8.0f} |{mb / seconds:7.0f}")


class ModelFiles:
    """A `files` part writing what a strategy writes for a model of `mb` MB: its weights, AdamW's moments."""

    def __init__(self, mb: int) -> None:
        import torch

        numel = (mb << 20) // 4 // 8
        self.weights = {f"w{i}": torch.randn(numel) for i in range(8)}
        self.moments = {k: (torch.randn(numel), torch.randn(numel)) for k in self.weights}

    def save(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file(self.weights, str(folder / "model.safetensors"))
        torch.save(self.moments, folder / "optimizer.pt")


def saves(folder: Path, mb: int, repeat: int) -> None:
    import pretrain.training.state as state
    from pretrain.config import load_config
    from pretrain.models.checkpoint import verify_checkpoint
    from pretrain.parallel.distributed import detect

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run.dir={folder}", "checkpoint.keep=1"])
    manager = state.CheckpointManager(cfg, detect(), "cpu", state.TrainState())
    manager.register("model", ModelFiles(mb), "files")
    real_seal, results = state.seal, {}
    manager.save()  # a first save warms the allocator and the page cache
    for label, seal in [("with manifest", real_seal), ("without", lambda *a, **k: None)] * repeat:
        state.seal = seal
        manager.state.step += 1
        started = time.perf_counter()
        saved = manager.save()
        results.setdefault(label, []).append(time.perf_counter() - started)
    state.seal = real_seal
    manager.save()
    size = sum(p.stat().st_size for p in saved.parent.glob("step_*/*")) / 2**20
    verify = best_seconds(lambda: verify_checkpoint(saved.parent / f"step_{manager.state.step:08d}"), repeat)
    with_, without = (statistics.median(results[k]) for k in ("with manifest", "without"))
    print(f"\nCheckpointManager.save() of a {mb} MB model + optimizer ({size:.0f} MB), median of {repeat}:")
    print(f"{'with manifest':24}|{with_ * 1000:8.0f} ms")
    print(f"{'without':24}|{without * 1000:8.0f} ms")
    print(f"{'manifest cost':24}|{(with_ - without) * 1000:8.0f} ms ({(with_ / without - 1) * 100:+.0f}%)")
    print(f"{'verify (resume/eval)':24}|{verify * 1000:8.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=None, help="model size (default 150; checksums: 100)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="smoke run: 8 MB, 2 repeats")
    args = parser.parse_args()
    repeat = 2 if args.small else args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        checksums(Path(tmp), args.mb or (8 if args.small else 100), repeat)
        saves(Path(tmp), args.mb or (8 if args.small else 150), repeat)


if __name__ == "__main__":
    main()
