"""The training loop: step-based, gradient accumulation with all accumulated samples as negatives,
atomic checkpoints with exact resume, metrics on a fixed cadence."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import pretrain
from pretrain.config import Config, redacted, save_config
from pretrain.data import build_source
from pretrain.data.prefetch import DevicePrefetcher
from pretrain.models.build import build_model, clamp_logit_scale, use_dict_outputs
from pretrain.objectives.distill import build_teacher, with_distillation
from pretrain.objectives.objective import Features, build_objective, features
from pretrain.parallel import build_strategy
from pretrain.parallel.distributed import (
    all_reduce_mean,
    detect,
    init_distributed,
    select_device,
    shutdown,
    world,
)
from pretrain.training import checkpoint as ckpt
from pretrain.training import remote
from pretrain.training.ensemble import build_weight_ensemble
from pretrain.training.fast import apply_compile_loss
from pretrain.training.flops import mfu, model_config, peak_flops, train_flops_per_sample
from pretrain.training.metrics import MetricsWriter, setup_logging
from pretrain.training.optim import build_optimizer, build_scheduler
from pretrain.training.plot import write_curves
from pretrain.training.preemption import INTERRUPTED, PREEMPTED, Preemption
from pretrain.training.telemetry import IntervalMeter, peak_memory_gib

log = logging.getLogger("pretrain")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint is saved."""


class RunDirError(RuntimeError):
    """The run directory holds work that this run would overwrite."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    samples_seen: int = 0
    """Global samples consumed (all ranks, all micro-steps)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.info = detect()
        setup_logging(self.info.is_main)
        self.device = select_device(cfg.train.device, self.info)
        init_distributed(self.info, self.device, cfg.dist.backend)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.bundle = build_model(cfg.model, self.device)
        self.model = self.bundle.model
        use_dict_outputs(self.model)  # outputs read by name: CLIP, SigLIP and CoCa alike
        # Before anything is written: a loss the model does not fit is one line, exit 2.
        self.objective = build_objective(cfg, self.model)
        if cfg.train.compile:
            apply_compile_loss(self.objective)
        # Before wrapping (FSDP shards in place): ZSCL's initial model is a copy of the starting weights.
        teacher = build_teacher(cfg, self.bundle, self.device)
        self.strategy = build_strategy(cfg, self.info)
        self.module = self.strategy.wrap(self.model, self.device)
        self.ensemble = build_weight_ensemble(cfg, self.model)  # starts from the initial weights
        optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(optimizer, cfg.train)
        self.module, self.optimizer = self.strategy.attach_optimizer(self.module, optimizer)
        seed_everything(cfg.train.seed + self.info.rank)  # per-rank augmentation streams
        # the next batch is copied on a side stream while the step runs (CUDA; a pass-through on CPU)
        self.source = DevicePrefetcher(build_source(cfg, self.bundle, self.info, self.device), self.device)
        self.objective = with_distillation(
            self.objective, cfg, teacher, self.strategy, self.info, self.device
        )
        self.state = TrainState()
        self.global_batch = cfg.train.batch_size * self.info.world * cfg.train.accum_steps
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._last_skipped = 0
        self._grad_norm: torch.Tensor | float | None = None
        self._parts: dict[str, torch.Tensor] = {}
        self.flops_per_sample = train_flops_per_sample(model_config(self.bundle.name))
        self.peak_flops = peak_flops(self.device, cfg.train.precision, cfg.log.peak_tflops)
        resume_from = self._prepare_run_dir()
        if resume_from is not None:
            self.load(resume_from)
        self.remote = remote.build_uploader(cfg, self.info.is_main)
        self.metrics = MetricsWriter(cfg, self.info.is_main, resume_step=self.state.step)
        self.meter = IntervalMeter(self.state.step)
        self.preemption = Preemption()  # last: nothing after it can fail
        self.preempted = self.interrupted = False  # stopped early by SIGUSR1/SIGTERM (requeue), by Ctrl-C

    # ---- set-up -------------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.cfg.run_dir / "checkpoints"

    def _prepare_run_dir(self) -> Path | None:
        """Create the run directory, write the resolved config, and pick the checkpoint to resume."""
        run_dir = self.cfg.run_dir
        # With checkpoint.remote: may download a newer checkpoint, or refuse remote ones a new run would overwrite
        problem = remote.prepare_run_dir(self.cfg, self.info.is_main, self.device)
        if problem is not None:
            raise RunDirError(problem)
        existing = ckpt.complete_checkpoints(self.ckpt_root)
        if self.cfg.resume is None and existing:
            raise RunDirError(
                f"{run_dir} already has checkpoints; pass resume=latest to continue it or choose another run.name"
            )
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
        if self.cfg.resume is None or (self.cfg.resume == "latest" and not existing):
            if self.cfg.resume == "latest":
                log.info("resume=latest: no checkpoint in %s yet, starting from step 0", run_dir)
            return None
        return ckpt.resolve_checkpoint(run_dir if self.cfg.resume == "latest" else self.cfg.resume)

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> TrainState:
        """Train to `train.steps`; `until` stops early after that step with a checkpoint (an interruption)."""
        cfg = self.cfg
        log.info(
            "training %s for %d steps, global batch %d", self.bundle.name, cfg.train.steps, self.global_batch
        )
        self.meter.restart(self.state.step)
        first, startup = self.state.step + 1, time.perf_counter() - pretrain.IMPORTED
        while self.state.step < cfg.train.steps:
            loss = self.train_step()
            step, final = self.state.step, self.state.step == cfg.train.steps
            if step % cfg.log.every == 0 or final:
                self.log_train(loss)
            elif step == first:  # a first sign of life and an ETA, not only after `log.every` steps
                self._log_first_step(loss, startup)
            if cfg.eval.enabled and ((cfg.eval.every and step % cfg.eval.every == 0) or final):
                self.evaluate()
            stop = self.preemption.should_stop()  # a SIGUSR1/SIGTERM/Ctrl-C on any rank: checkpoint, leave
            if step % cfg.checkpoint.every == 0 or final or step == until or stop:
                self.save()
            if step == until or stop:
                # a finished run needs no requeue, nor does one a person stopped
                self.preempted = self.preemption.stop == PREEMPTED and not final
                self.interrupted = self.preemption.stop == INTERRUPTED and not final
                break
        self._finish()
        return self.state

    def _finish(self) -> None:
        """The end of a run (or of its part): curves.png when training is done, and the last checkpoint safe
        at `checkpoint.remote` before the process ends (raises `RemoteError` if it could not be copied)."""
        if self.info.is_main and self.state.step == self.cfg.train.steps:
            write_curves(self.cfg.run_dir)
        if self.remote is not None:
            self.remote.flush()

    def train_step(self) -> torch.Tensor:
        """One optimizer step over `accum_steps` micro-batches; returns the (device) loss, keeps its parts."""
        fetch_started = time.perf_counter()
        micro = [self._to_device(self.source.next_batch()) for _ in range(self.cfg.train.accum_steps)]
        self.meter.add_data_wait(time.perf_counter() - fetch_started)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self._parts = self._forward_backward(micro)
        loss = self.objective.total(self._parts)
        self._grad_norm = self.strategy.step(self.module, self.optimizer, self.cfg.train.grad_clip)
        self.scheduler.step()
        with self.strategy.gathered([self.model.logit_scale]):
            clamp_logit_scale(self.model)
        self._nonfinite |= ~torch.isfinite(loss)
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        if self.ensemble is not None:
            self.ensemble.update(self.state.step)
        return loss

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def _forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        """The model's dict output (`output_dict=True`; CoCa's forward always returns one)."""
        bf16 = self.cfg.train.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.module(images, texts)

    def _forward_backward(self, micro: list) -> dict[str, torch.Tensor]:
        """Every accumulated sample is a negative for every other (open_clip's accum-freq).

        With several micro-batches, features of all of them are first computed without grad; then each is
        recomputed with grad and its contrastive loss taken against the cached rest. The summed gradients
        equal the gradient of the loss over the whole accumulated batch. The logit scale (and bias) get
        their gradient once (last micro-step). Returns the step's parts (detached): the contrastive part
        over the accumulated batch, per-micro-batch parts summed.
        """
        texts = [t for _, t in micro]
        self.objective.begin_step(micro)
        token_count = self.objective.token_count(texts) if self.objective.needs_token_count else None
        if len(micro) == 1:
            return self._micro_step(micro[0], [], [], token_count)
        with torch.no_grad():
            cached = [features(self._forward(*batch)) for batch in micro]
        totals: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro):
            last = j == len(micro) - 1
            with contextlib.nullcontext() if last else self.strategy.no_sync(self.module):
                parts = self._micro_step(batch, cached[:j], cached[j + 1 :], token_count, last)
            for name, value in parts.items():
                summed = name not in self.objective.pairwise_parts and name in totals
                totals[name] = totals[name] + value if summed else value
        return totals

    def _micro_step(
        self, batch, before: list[Features], after: list[Features], token_count, last: bool = True
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch, its features between the cached ones of the others."""
        output = self._forward(*batch)
        own = features(output) if last else features(output).detached_scalars()
        image_f, text_f = own.image, own.text
        if before or after:
            image_f = torch.cat([c.image for c in before] + [image_f] + [c.image for c in after])
            text_f = torch.cat([c.text for c in before] + [text_f] + [c.text for c in after])
        parts = {
            **self.objective.pairwise(image_f, text_f, own.logit_scale, own.logit_bias),
            **self.objective.per_micro(output, batch[1], token_count),
            **(self.objective.per_step(self._encode_images) if last else {}),
        }
        self.strategy.backward(self.objective.total(parts))
        return {name: value.detach() for name, value in parts.items()}

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The trained model's fp32 image features (with grad) through the wrapped module's forward, so every
        strategy sees the pass (for objective terms on their own images, e.g. ZSCL's reference set)."""
        return self._forward(images, None)["image_features"].float()

    # ---- logging, eval, checkpoints -------------------------------------------------------------------
    def _check_finite(self) -> None:
        bad = self._nonfinite.float()
        if world()[1] > 1:
            bad = all_reduce_mean(bad)
        if bad.item() > 0:
            latest = self.ckpt_root / "latest"
            kept = latest.read_text().strip() if latest.is_file() else "none"
            raise NonFiniteLossError(
                f"non-finite loss at or before step {self.state.step}; last good checkpoint: {kept} (not overwritten)"
            )

    def log_train(self, loss: torch.Tensor) -> None:
        """Write the metrics line of this step: the only place the step's device values are read."""
        self._check_finite()
        names = self.objective.parts
        values = all_reduce_mean(torch.stack([loss, *(self._parts[n] for n in names)])).tolist()
        row = {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "loss": values[0],
            **{f"loss_{name}": value for name, value in zip(names, values[1:])},
            "lr": float(self.last_lr),
            **self._telemetry(),
            "logit_scale": float(self.strategy.full_tensor(self.model.logit_scale).exp().item()),
        }
        if hasattr(self.source, "skipped"):
            row["data_skipped"] = int(self.source.skipped)
            if row["data_skipped"] != self._last_skipped:
                log.warning("data skipped so far: %s", self.source.skipped_by_reason())
                self._last_skipped = row["data_skipped"]
        self.metrics.write(row)
        self.meter.restart(self.state.step)

    def _log_first_step(self, loss: torch.Tensor, startup: float) -> None:
        """The console line after this process's first step: how long start-up and the step took."""
        if self.info.is_main:
            value = float(loss)  # this rank's loss; reading it waits for the step's device work
            seconds = self.meter.summary(self.state.step)["elapsed"]
            self.metrics.first_step(self.state.step, value, seconds, startup)

    def _telemetry(self) -> dict:
        """Throughput, data wait, step time, grad norm, peak memory, MFU and ETA of the interval now ending."""
        interval = self.meter.summary(self.state.step)
        samples_per_s = interval["steps"] * self.global_batch / interval["elapsed"]
        memory, memory_kind = peak_memory_gib(self.device)
        return {
            "samples_per_s": samples_per_s,
            "data_wait": interval["data_wait"],
            "step_time": interval["step_time"],
            "grad_norm": None if self._grad_norm is None else float(self._grad_norm),
            "peak_memory_gib": self._max_over_ranks(memory),
            "memory_kind": memory_kind,
            "mfu": mfu(self.flops_per_sample, samples_per_s, self.peak_flops, self.info.world),
            "eta_s": (self.cfg.train.steps - self.state.step) * interval["step_time"],
        }

    def _max_over_ranks(self, value: float) -> float:
        """The largest `value` of any rank (the rank closest to running out of memory)."""
        if world()[1] == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def evaluate(self) -> list[dict]:
        """Every eval of `eval.tasks` (and `eval.val_data`) on every rank. Replicated weights (DDP): each rank
        takes its share of the eval shards and the counts (retrieval: embeddings) are combined over ranks.
        Sharded weights (FSDP, ZeRO-3) run forward only on all ranks together, so every rank then evaluates
        all of it in lockstep. Rank 0 writes one `eval` line per eval and `eval_results.json`."""
        from pretrain.evaluation.tasks import run_all, write_results

        cfg = self.cfg.eval
        split = not self.strategy.collective_eval
        with self.strategy.eval_context(self.model):
            results = run_all(
                self.model, self.bundle, cfg.all_tasks(), cfg.val_data, self.device, cfg.batch_size, split,
                cfg.workers,
            )  # fmt: skip
        if self.info.is_main:
            for result in results:
                self.metrics.write({"step": self.state.step, **result})
            write_results(self.cfg.run_dir, self.state.step, results)
        self.meter.restart(self.state.step)  # eval time is not training throughput
        return results

    def save(self) -> Path:
        self._check_finite()

        def write_shared(folder: Path) -> None:
            self.strategy.save(folder, self.module, self.optimizer, self.info.is_main)
            if self.ensemble is not None:
                self.ensemble.save(folder, self.info.is_main)
            if self.info.is_main:
                trainer_state = {
                    **vars(self.state),
                    "scheduler": self.scheduler.state_dict(),
                    "config": redacted(self.cfg),
                    **({"ensemble_count": self.ensemble.count} if self.ensemble is not None else {}),
                }
                torch.save(trainer_state, folder / "trainer.pt")

        rank_state = {
            "rng": ckpt.rng_state(),
            "data": self.source.state_dict(),
            "objective": self.objective.state_dict(),
        }
        path = ckpt.save_checkpoint(
            self.ckpt_root,
            self.state.step,
            write_shared,
            rank_state,
            self.info.rank,
            self.cfg.checkpoint.keep,
        )
        log.info("saved checkpoint %s", path)
        if self.remote is not None:
            self.remote.submit(path)  # copied in the background
        return path

    def load(self, folder: Path) -> None:
        trainer_state = ckpt.load_trainer_state(folder)
        self._check_same_model(folder, trainer_state)
        try:
            self.strategy.load(folder, self.module, self.optimizer)
        except RuntimeError as e:  # same name, other shapes (an edited model config): one line, not 80
            reason = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
            if reason is None:
                raise
            raise RunDirError(
                f"{folder} does not fit this run's model {self.cfg.model.name!r}: {reason}"
            ) from None
        self.state = TrainState(step=trainer_state["step"], samples_seen=trainer_state["samples_seen"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.ensemble is not None:
            if "ensemble_count" not in trainer_state:
                raise ValueError(f"train.weight_ensemble_every: {folder} was saved without a weight ensemble")
            self.ensemble.load(folder, trainer_state["ensemble_count"])
        rank_state = ckpt.load_rank_state(folder, self.info.rank)
        self.source.load_state_dict(rank_state["data"])
        self.objective.load_state_dict(rank_state.get("objective", {}))
        ckpt.set_rng_state(rank_state["rng"])
        log.info("resumed from %s at step %d", folder, self.state.step)

    def _check_same_model(self, folder: Path, trainer_state: dict) -> None:
        """Refuse to resume a checkpoint another model wrote (a smoke test's tiny model in the run directory
        the real run resumes), naming both, before any weights are read."""
        saved = trainer_state.get("config", {}).get("model", {}).get("name")
        if saved is not None and Path(saved).stem != Path(self.cfg.model.name).stem:
            raise RunDirError(
                f"{folder} was written by model {saved!r}, not this run's model.name {self.cfg.model.name!r}: "
                "resume it with that model, or start this run under another run.name"
            )

    def close(self) -> None:
        if self.remote is not None:  # completed checkpoints still go after a crash
            self.remote.close()
        self.preemption.close()
        self.metrics.close()
        self.source.close()
        self.objective.close()
        shutdown()
