"""The rows of a training run's metrics, built outside the loop: the loss and its parts averaged over ranks,
and what a log line measures beyond them: time per step, the share of it spent waiting for data, grad norm,
peak memory (the largest of any rank), MFU (model FLOPs utilisation) and ETA; then the eval rows.
The step's values stay device tensors; they are read only on log steps. `metrics.MetricsWriter` writes."""

from __future__ import annotations

import logging
import resource
import sys
import time

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.evaluation.tasks import write_results
from pretrain.parallel.distributed import DistInfo, all_reduce_mean, world
from pretrain.training.flops import mfu, peak_flops, train_flops_per_sample
from pretrain.training.metrics import MetricsWriter, first_step_line
from pretrain.training.state import TrainState
from webshards.retries import retries_so_far

log = logging.getLogger("pretrain")


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """The process's peak memory so far and what it measures: CUDA's max allocated bytes of `device`
    (tensors only, not the allocator's cache) on GPU, the process's max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "cpu_max_rss"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint is saved."""


class MetricsProcessor:
    """The rows of a training run: `record` each step (device values kept, only `time.perf_counter` read),
    `log_train` on log steps (whose sync makes the interval's wall time cover the device work it queued),
    `log_first_step` once, `log_eval` after an eval. `parts` names the objective's logged loss parts;
    `source` may count skipped samples (`skipped`, `skipped_by_reason()`); `model_cfg`: open_clip's config of
    the model as built, for MFU."""

    def __init__(
        self, cfg: Config, info: DistInfo, device: torch.device, state: TrainState, source, parts: tuple,
        model_cfg: dict | None,
    ) -> None:  # fmt: skip
        self.cfg, self.info, self.device, self.state = cfg, info, device, state
        self.source, self.parts = source, parts
        self.writer = MetricsWriter(cfg, info.is_main, resume_step=state.step)
        self.global_batch = cfg.train.batch_size * info.world * cfg.train.accum_steps
        self.flops_per_sample = train_flops_per_sample(model_cfg)  # the model as built (force_* applied)
        self.peak_flops = peak_flops(device, cfg.train.precision, cfg.log.peak_tflops)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._loss, self._parts, self._grad_norm, self._lr, self._last_skipped = None, {}, None, 0.0, 0
        self.restart()

    def restart(self) -> None:
        """Start a new interval after this step (at the start of training, after a log line or an eval)."""
        self.started, self.start_step, self.data_wait = time.perf_counter(), self.state.step, 0.0

    def record(
        self, loss: torch.Tensor, parts: dict, grad_norm: torch.Tensor | float | None, lr: float, data_wait: float,
    ) -> None:  # fmt: skip
        """Keep the step's values (device tensors, not read), whether its loss is finite, and how long it
        waited for its batches (host seconds)."""
        self._loss, self._parts, self._grad_norm, self._lr = loss, parts, grad_norm, lr
        self.data_wait += data_wait
        self._nonfinite |= ~torch.isfinite(loss)

    def check_finite(self) -> None:
        """Raise `NonFiniteLossError` (on every rank) when any step's loss on any rank was not finite."""
        if self._max_over_ranks(self._nonfinite) > 0:
            latest = self.cfg.run_dir / "checkpoints" / "latest"
            kept = latest.read_text().strip() if latest.is_file() else "none"
            raise NonFiniteLossError(
                f"non-finite loss at or before step {self.state.step}; last good checkpoint: {kept} (not overwritten)"
            )

    def log_train(self, logit_scale: torch.Tensor) -> None:
        """Write the metrics row of this step: the only place the step's device values are read."""
        self.check_finite()
        values = all_reduce_mean(torch.stack([self._loss, *(self._parts[n] for n in self.parts)])).tolist()
        row = {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "loss": values[0],
            **{f"loss_{name}": value for name, value in zip(self.parts, values[1:])},
            "lr": float(self._lr),
            **self._telemetry(),
            "logit_scale": float(logit_scale.exp().item()),
            "storage_retries": self._storage_retries(),
        }
        if hasattr(self.source, "skipped"):
            row["data_skipped"] = int(self.source.skipped)
            if row["data_skipped"] != self._last_skipped:
                log.warning("data skipped so far: %s", self.source.skipped_by_reason())
                self._last_skipped = row["data_skipped"]
        self.writer.write(row)
        self.restart()

    def log_first_step(self, startup: float) -> None:
        """The console line after this process's first step: how long start-up and the step took."""
        if self.info.is_main:
            loss = float(self._loss)  # this rank's loss; reading it waits for the step's device work
            seconds = time.perf_counter() - self.started
            log.info(first_step_line(self.state.step, self.cfg.train.steps, loss, seconds, startup))

    def log_eval(self, results: list[dict]) -> None:
        """One `eval` row per result, and `eval_results.json`; eval time is not training throughput."""
        if self.info.is_main:
            for result in results:
                self.writer.write({"step": self.state.step, **result})
            write_results(self.cfg.run_dir, self.state.step, results)
        self.restart()

    def _telemetry(self) -> dict:
        """Throughput, data wait, step time, grad norm, peak memory, MFU and ETA of the interval now ending."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        step_time = elapsed / max(self.state.step - self.start_step, 1)
        samples_per_s = self.global_batch / step_time
        memory, memory_kind = peak_memory_gib(self.device)
        return {
            "samples_per_s": samples_per_s,
            "data_wait": self.data_wait / elapsed,
            "step_time": step_time,
            "grad_norm": None if self._grad_norm is None else float(self._grad_norm),
            "peak_memory_gib": self._max_over_ranks(memory),
            "memory_kind": memory_kind,
            "mfu": mfu(self.flops_per_sample, samples_per_s, self.peak_flops, self.info.world),
            "eta_s": (self.cfg.train.steps - self.state.step) * step_time,
        }

    def _storage_retries(self) -> int:
        """Storage requests retried by every rank's processes since they started (the training process's
        shard reads and checkpoint copies, its data workers'; `webshards.retries`)."""
        count = retries_so_far() + getattr(self.source, "storage_retries", 0)
        tensor = torch.tensor(count, dtype=torch.int64, device=self.device)
        if world()[1] > 1:
            dist.all_reduce(tensor)
        return int(tensor.item())

    def _max_over_ranks(self, value: float | torch.Tensor) -> float:
        """The largest `value` of any rank (e.g. of the rank closest to running out of memory)."""
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        if world()[1] > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def close(self) -> None:
        self.writer.close()
