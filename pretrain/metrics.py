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

from pretrain.config import Config, redacted
from webshards.atomic import write_atomic

log = logging.getLogger("pretrain")


def setup_logging(is_main: bool) -> None:
    """One logger for the project; only rank 0 prints below WARNING. Progress goes to stdout, so stderr
    holds only what went wrong (a bad input is one line there)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("pretrain").setLevel(logging.INFO if is_main else logging.WARNING)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only lines up to `step` (rewritten atomically)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def _console_line(row: dict) -> str:
    if "eval" in row:
        rest = " ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
        return f"step {row['step']} eval {row['eval']}: {rest}"
    parts = [f"step {row['step']}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}"]
    parts += [f"{row['samples_per_s']:.0f} samples/s"] if "samples_per_s" in row else []
    parts += [f"scale {row['logit_scale']:.1f}"] if "logit_scale" in row else []
    return " | ".join(parts)


class MetricsWriter:
    def __init__(self, cfg: Config, is_main: bool, resume_step: int | None = None) -> None:
        self.is_main = is_main
        self.path = cfg.run_dir / "metrics.jsonl"
        self._wandb = self._tb = None
        if not is_main:
            return
        if resume_step is not None:
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
        log.info(_console_line(row))
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
