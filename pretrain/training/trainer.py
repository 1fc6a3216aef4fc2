"""The training loop: step-based, gradient accumulation with all accumulated samples as negatives,
atomic checkpoints with exact resume, metrics on a fixed cadence."""

from __future__ import annotations

import contextlib
import logging
import random
import time

import numpy as np
import torch

import pretrain
from pretrain.config import Config
from pretrain.data import build_source
from pretrain.data.prefetch import DevicePrefetcher
from pretrain.evaluation.tasks import run_all
from pretrain.models.build import build_model, clamp_logit_scale, use_dict_outputs
from pretrain.objectives.objective import Features, MicroStep, features
from pretrain.objectives.registry import build_objective
from pretrain.parallel import build_strategy
from pretrain.parallel.distributed import detect, init_distributed, select_device, shutdown
from pretrain.training.ensemble import build_weight_ensemble
from pretrain.training.fast import apply_compile_loss
from pretrain.training.metrics import setup_logging
from pretrain.training.optim import build_optimizer, build_scheduler
from pretrain.training.plot import write_curves
from pretrain.training.preemption import INTERRUPTED, PREEMPTED, Preemption
from pretrain.training.state import CheckpointManager, GlobalRng, StrategyFiles, TrainState
from pretrain.training.telemetry import MetricsProcessor

log = logging.getLogger("pretrain")


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
        self._owns_group = init_distributed(self.info, self.device, cfg.dist.backend, cfg.dist.timeout)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.bundle = build_model(cfg.model, self.device, aug=cfg.data.aug.to_open_clip())
        self.model = self.bundle.model
        use_dict_outputs(self.model)  # outputs read by name: CLIP, SigLIP and CoCa alike
        self.strategy = build_strategy(cfg, self.info)
        # Before anything is written: a loss the model does not fit is one line, exit 2. Before wrapping
        # (FSDP shards in place): ZSCL's initial model is a copy of the starting weights.
        self.objective = build_objective(cfg, self.bundle, self.strategy, self.info, self.device)
        if cfg.train.compile:
            apply_compile_loss(self.objective)
        self.module = self.strategy.wrap(self.model, self.device)
        self.ensemble = build_weight_ensemble(cfg, self.model)  # starts from the initial weights
        optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(optimizer, cfg.train)
        self.module, self.optimizer = self.strategy.attach_optimizer(self.module, optimizer)
        seed_everything(cfg.train.seed + self.info.rank)  # per-rank augmentation streams
        # the next batch is copied on a side stream while the step runs (CUDA; a pass-through on CPU)
        self.source = DevicePrefetcher(build_source(cfg, self.bundle, self.info, self.device), self.device)
        self.state = TrainState()
        self.global_batch = cfg.train.batch_size * self.info.world * cfg.train.accum_steps
        self.checkpoints = CheckpointManager(cfg, self.info, self.device, self.state)
        self._register_state()
        self.checkpoints.start()  # prepares the run directory; resumes the checkpoint `resume` selects
        self.metrics = MetricsProcessor(
            cfg, self.info, self.device, self.state, self.source, self.objective.parts, self.bundle.model_cfg
        )
        self.preemption = Preemption(cfg.dist.timeout)  # last: nothing after it can fail
        self.preempted = self.interrupted = False  # stopped early by SIGUSR1/SIGTERM (requeue), by Ctrl-C

    def _register_state(self) -> None:
        """What a checkpoint holds besides step and config, restored in this order (the RNGs last)."""
        register = self.checkpoints.register
        register("model", StrategyFiles(self.strategy, self.module, self.optimizer), "files")
        register("scheduler", self.scheduler, "shared")
        if self.ensemble is not None:  # its count in trainer.pt, its average in a file of its own
            register("ensemble_count", self.ensemble, "shared")
            register("ensemble", self.ensemble, "files")
        register("data", self.source, "gathered")  # any number of ranks resumes them
        register("objective", self.objective, "gathered", default={})
        register("rng", GlobalRng, "rank")

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> TrainState:
        """Train to `train.steps`; `until` stops early after that step with a checkpoint (an interruption)."""
        cfg = self.cfg
        log.info(
            "training %s for %d steps, global batch %d", self.bundle.name, cfg.train.steps, self.global_batch
        )
        self.metrics.restart()
        first, startup = self.state.step + 1, time.perf_counter() - pretrain.IMPORTED
        while self.state.step < cfg.train.steps:
            self.train_step()
            step, final = self.state.step, self.state.step == cfg.train.steps
            if step % cfg.log.every == 0 or final:
                self.metrics.log_train(self.strategy.full_tensor(self.model.logit_scale))
            elif step == first:  # a first sign of life and an ETA, not only after `log.every` steps
                self.metrics.log_first_step(startup)
            if cfg.eval.enabled and ((cfg.eval.every and step % cfg.eval.every == 0) or final):
                self.evaluate()
            stop = self.preemption.should_stop()  # a SIGUSR1/SIGTERM/Ctrl-C on any rank: checkpoint, leave
            if step % cfg.checkpoint.every == 0 or final or step == until or stop:
                self.metrics.check_finite()  # after a non-finite loss the last good checkpoint stays `latest`
                self.checkpoints.save()
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
        self.checkpoints.flush()

    def train_step(self) -> torch.Tensor:
        """One optimizer step over `accum_steps` micro-batches; returns the (device) loss, keeps its parts."""
        fetch_started = time.perf_counter()
        micro = [self._to_device(self.source.next_batch()) for _ in range(self.cfg.train.accum_steps)]
        data_wait = time.perf_counter() - fetch_started
        lr = self.optimizer.param_groups[0]["lr"]
        parts = self._forward_backward(micro)
        loss = self.objective.total(parts)
        grad_norm = self.strategy.step(self.module, self.optimizer, self.cfg.train.grad_clip)
        self.scheduler.step()
        with self.strategy.gathered([self.model.logit_scale]):
            clamp_logit_scale(self.model)
        self.metrics.record(loss, parts, grad_norm, lr, data_wait)
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
        self.objective.begin_step(micro)
        if len(micro) == 1:
            return self._micro_step(micro[0], [], [])
        with torch.no_grad():
            cached = [features(self._forward(*batch)) for batch in micro]
        totals: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro):
            last = j == len(micro) - 1
            with contextlib.nullcontext() if last else self.strategy.no_sync(self.module):
                parts = self._micro_step(batch, cached[:j], cached[j + 1 :], last)
            totals = self.objective.accumulate(totals, parts)
        return totals

    def _micro_step(
        self, batch, before: list[Features], after: list[Features], last: bool = True
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch, its features between the cached ones of the others."""
        output = self._forward(*batch)
        own = features(output) if last else features(output).detached_scalars()
        image_f, text_f = own.image, own.text
        if before or after:
            image_f = torch.cat([c.image for c in before] + [image_f] + [c.image for c in after])
            text_f = torch.cat([c.text for c in before] + [text_f] + [c.text for c in after])
        step = MicroStep(own._replace(image=image_f, text=text_f), output, batch[1], self._encode_images)
        parts = self.objective.compute(step, last)
        self.strategy.backward(self.objective.total(parts))
        return {name: value.detach() for name, value in parts.items()}

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The trained model's fp32 image features (with grad) through the wrapped module's forward, so every
        strategy sees the pass (for objective terms on their own images, e.g. ZSCL's reference set)."""
        return self._forward(images, None)["image_features"].float()

    # ---- eval, checkpoints ------------------------------------------------------------------------
    def evaluate(self) -> list[dict]:
        """Every eval of `eval.tasks` (and `eval.val_data`) on every rank. Replicated weights (DDP): each rank
        takes its share of the eval shards and the counts (retrieval: embeddings) are combined over ranks.
        Sharded weights (FSDP, ZeRO-3) run forward only on all ranks together, so every rank then evaluates
        all of it in lockstep. Rank 0 writes one `eval` line per eval and `eval_results.json`."""
        cfg = self.cfg.eval
        split = not self.strategy.collective_eval
        with self.strategy.eval_context(self.model):
            results = run_all(
                self.model, self.bundle, cfg.all_tasks(), cfg.val_data, self.device, cfg.batch_size, split,
                cfg.workers,
            )  # fmt: skip
        self.metrics.log_eval(results)
        return results

    def close(self) -> None:
        self.checkpoints.close()  # completed checkpoints still go to checkpoint.remote after a crash
        self.preemption.close()
        self.metrics.close()
        self.source.close()
        self.objective.close()
        if self._owns_group:  # a group that was there before this Trainer outlives it
            shutdown()
