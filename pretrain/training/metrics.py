"""The one metrics writer: metrics.jsonl always, a console line, and optionally wandb and tensorboard.

Only the main rank writes. On resume, lines past the resumed step are dropped so that the file reads as
if the run had never been interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TextIO

from pretrain.config import Config, redacted
from webshards.atomic import write_atomic
from webshards.progress import duration

log = logging.getLogger("pretrain")

EVAL_NOT_METRICS = frozenset(
    {"step", "eval", "task", "samples", "samples_seen", "epoch", "time", "seconds", "captions"}
    | {"val_loss_chance"}
)
"""Keys of an eval line that are not metrics: bookkeeping, counts, wall time and the chance level of the
whole-set validation loss (log of the set's size). The model card's `model-index` and curves.png leave them
out."""


def setup_logging(is_main: bool, stream: TextIO = sys.stdout) -> None:
    """One logger for the project; only rank 0 prints below WARNING. Progress goes to stdout, so stderr
    holds only what went wrong (a bad input is one line there); a command whose stdout is its output (e.g.
    `pretrain caption`) logs to stderr instead. The first call of a process sets the stream."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=stream)
    logging.getLogger("pretrain").setLevel(logging.INFO if is_main else logging.WARNING)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only lines up to `step` (rewritten atomically)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def _step_text(step: int, total_steps: int | None) -> str:
    return f"step {step}" + (f"/{total_steps} ({step / total_steps:.0%})" if total_steps else "")


def _train_console_line(row: dict, total_steps: int | None) -> str:
    """`step 40/100 (40%) | loss … | lr … | grad … | N samples/s | step …s | data …% | mem … | mfu …% | eta …`"""
    parts = [_step_text(row["step"], total_steps), f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}"]
    formats = {
        "grad_norm": "grad {:.3f}",
        "samples_per_s": "{:.0f} samples/s",
        "step_time": "step {:.3f}s",
        "data_wait": "data {:.0%}",
        "peak_memory_gib": "mem {:.2f} GiB",
        "mfu": "mfu {:.1%}",
        "logit_scale": "scale {:.1f}",
    }
    parts += [fmt.format(row[k]) for k, fmt in formats.items() if row.get(k) is not None]
    parts += [f"eta {duration(row['eta_s'])}"] if row.get("eta_s") is not None else []
    return " | ".join(parts)


def first_step_line(step: int, total_steps: int, loss: float, seconds: float, startup: float) -> str:
    """The line after a process's first step, long before its first `log.every` line (metrics.jsonl keeps
    that cadence): e.g. `step 1/800 (0%) | loss 4.1589 | first step 2.31s | start-up 8.1s | eta 30m48s`.
    The ETA at the first step's pace (warm-up included) is an upper bound; later lines refine it."""
    eta = duration((total_steps - step) * seconds)
    parts = [_step_text(step, total_steps), f"loss {loss:.4f}", f"first step {seconds:.2f}s"]
    return " | ".join([*parts, f"start-up {startup:.1f}s", f"eta {eta}"])


def _console_line(row: dict, total_steps: int | None = None) -> str:
    if "eval" in row:
        rest = " ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
        return f"step {row['step']} eval {row['eval']}: {rest}"
    return _train_console_line(row, total_steps)


class MetricsWriter:
    def __init__(self, cfg: Config, is_main: bool, resume_step: int) -> None:
        self.is_main = is_main
        self.path = cfg.run_dir / "metrics.jsonl"
        self.total_steps = cfg.train.steps
        self._wandb = self._tb = None
        if not is_main:
            return
        truncate_metrics(self.path, resume_step)
        self._file = self.path.open("a")
        if cfg.log.wandb:
            self._wandb = _start_wandb(cfg)
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(cfg.run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        """Append one record (must carry `step`), print it, and forward it to the trackers."""
        if not self.is_main:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        log.info(_console_line(row, self.total_steps))
        numeric = {
            k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)
        }
        prefix = f"eval/{row['eval']}/" if "eval" in row else "train/"
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in numeric.items()}, step=row["step"])
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(prefix + k, v, row["step"])

    def close(self) -> None:
        if not self.is_main:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _start_wandb(cfg: Config):
    """A wandb run; without an API key it runs offline instead of failing."""
    import wandb

    mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
    return wandb.init(
        project=cfg.log.wandb_project,
        name=cfg.run.name,
        dir=str(cfg.run_dir),
        config=redacted(cfg),
        mode=mode,
        resume="allow",
        id=cfg.run.name,
    )
