"""The other sections: `run`, `loss`, `dist`, `checkpoint`, `log`, `eval`, `distill`."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from pretrain.config_sections.base import STRATEGIES, _check
from pretrain.objectives.specs import objective_names
from webshards.evalset import TASKS as EVAL_TASKS


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; outputs go to `{dir}/{name}/`."""
    dir: str = "runs"
    """Parent folder of run directories."""
    license: str | None = None
    """License of the trained weights for the exported model card, a Hub license id (e.g. `apache-2.0`,
    `other`); null: the card names none."""
    datasets: list[str] = field(default_factory=list)
    """Names of the training data sets for the model card's `datasets` (Hub dataset ids); empty: none."""


@dataclass
class LossConfig:
    name: str | None = None
    """clip (InfoNCE), siglip (pairwise sigmoid), coca (contrastive + captioning) or another module of
    pretrain/objectives/specs/; null: chosen from the model (open_clip CoCa models: coca, models with `init_logit_bias`: siglip, others: clip)."""
    clip_weight: float = 1.0
    """Weight of the contrastive part: loss = clip_weight x contrastive (+ caption_weight x caption)."""
    caption_weight: float = 2.0
    """Weight of the caption cross-entropy (coca only; open_clip's default)."""
    chunk_size: int | None = None
    """Block size of the contrastive loss (null: the plain, untiled loss); clip and coca then keep only
    log-sum-exps over chunk_size x chunk_size logit blocks and recompute the blocks in backward, so their
    memory grows linearly with the batch; siglip recomputes chunk_size-row tiles of each rank's block."""
    ring: bool = False
    """clip and coca: pass the other ranks' features peer-to-peer around the ring of ranks instead of
    all-gathering them (one other rank's block held at a time); needs chunk_size. siglip always does."""

    def __post_init__(self) -> None:
        names = objective_names()
        _check(
            self.name is None or self.name in names,
            "loss.name",
            f"must be one of {names} or null (chosen from the model), got {self.name!r}",
        )
        for name in ("clip_weight", "caption_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(
            self.chunk_size is None or self.chunk_size > 0,
            "loss.chunk_size",
            f"must be > 0 or null, got {self.chunk_size}",
        )
        _check(
            not self.ring or self.chunk_size is not None,
            "loss.ring",
            "needs loss.chunk_size (the ring is part of the tiled loss), got loss.chunk_size=null",
        )


@dataclass
class DistConfig:
    strategy: str = "ddp"
    """ddp, fsdp or deepspeed."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    timeout: float = 600.0
    """Seconds a collective waits for the other ranks before this rank fails (torch's own default is 600 for
    NCCL, 1800 for gloo): a hung rank then ends the job, and torchrun restarts it (launch/torchrun.sh
    MAX_RESTARTS). Longer than any wait between collectives: the slowest step, a checkpoint, an eval."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (less activation memory, ~30% more compute)."""
    compile: bool | None = None
    """Deprecated alias of `train.compile`."""
    param_dtype: str = "auto"
    """FSDP compute dtype of the gathered weights: auto (bf16 under train.precision=bf16, else fp32),
    fp32 or bf16."""
    reduce_dtype: str = "fp32"
    """FSDP gradient reduce-scatter dtype (fp32 or bf16)."""
    reshard_after_forward: bool = True
    """FSDP: free gathered weights after forward (ZeRO-3-like); false keeps them to backward (ZeRO-2-like)."""
    offload: bool = False
    """Keep sharded parameters and optimizer states in CPU memory (FSDP CPUOffloadPolicy; DeepSpeed
    offload_optimizer, and offload_param at stage 3)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config used whole instead of the one built from these keys (batch keys are set to
    match train.*)."""
    sync_bn: bool = False
    """ddp: BatchNorm statistics over the global batch (torch's SyncBatchNorm; open_clip's `--use-bn-sync`),
    for image towers with BatchNorm (e.g. ResNets); a model without BatchNorm is left as it is."""
    static_graph: bool = False
    """ddp: DistributedDataParallel(static_graph=True) (open_clip's `--ddp-static-graph`): DDP records the
    first iteration's graph and reuses it."""

    def __post_init__(self) -> None:
        _check(
            self.strategy in STRATEGIES,
            "dist.strategy",
            f"must be one of {STRATEGIES}, got {self.strategy!r}",
        )
        _check(self.zero_stage in (1, 2, 3), "dist.zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        _check(self.backend in ("auto", "nccl", "gloo"), "dist.backend", f"bad backend {self.backend!r}")
        _check(self.timeout > 0, "dist.timeout", f"must be > 0 seconds, got {self.timeout}")
        for name, allowed in (("param_dtype", ("auto", "fp32", "bf16")), ("reduce_dtype", ("fp32", "bf16"))):
            value = getattr(self, name)
            _check(value in allowed, f"dist.{name}", f"must be one of {allowed}, got {value!r}")
        why = {
            "sync_bn": "BatchNorm is synced only under DDP here",
            "static_graph": "an option of DDP's wrapper",
        }
        for name, reason in why.items():
            _check(
                not getattr(self, name) or self.strategy == "ddp",
                f"dist.{name}",
                f"needs dist.strategy=ddp ({reason}), got dist.strategy={self.strategy}",
            )


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Checkpoint cadence in steps (a checkpoint is always written at the end)."""
    keep: int = 3
    """How many checkpoints to keep (oldest deleted first), locally and at `remote`."""
    remote: str | None = None
    """fsspec URL that completed checkpoints are copied to (in the background, by rank 0), under
    `{remote}/{run.name}/`; `resume=latest` looks there too (null: no copies)."""

    def __post_init__(self) -> None:
        _check(self.every > 0, "checkpoint.every", f"must be > 0, got {self.every}")
        _check(self.keep > 0, "checkpoint.keep", f"must be > 0, got {self.keep}")


@dataclass
class LogConfig:
    every: int = 10
    """Metrics cadence in steps (the final step is always logged)."""
    wandb: bool = False
    """Log to wandb (offline when no WANDB_API_KEY is set)."""
    wandb_project: str = "clip-pretrain"
    """wandb project name."""
    tensorboard: bool = False
    """Write TensorBoard events to `{run_dir}/tensorboard`."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU (null: look the GPU up in pretrain/training/flops.py; CPU: no MFU)."""

    def __post_init__(self) -> None:
        _check(self.every > 0, "log.every", f"must be > 0, got {self.every}")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "log.peak_tflops", "must be > 0 or null")


@dataclass
class EvalTaskConfig:
    name: str = MISSING
    """Name of the eval (the `eval` key of its result lines), e.g. imagenet."""
    root: str = MISSING
    """Eval set in clip_benchmark's webdataset layout: a folder or an s3:// or http(s):// URL."""
    task: str | None = None
    """zeroshot_classification or zeroshot_retrieval (null: from ROOT's dataset_type.txt)."""

    def __post_init__(self) -> None:
        _check(bool(self.name) and "=" not in self.name, "eval.tasks.name", f"bad eval name {self.name!r}")
        _check(
            self.task in (None, *EVAL_TASKS),
            "eval.tasks.task",
            f"must be one of {EVAL_TASKS} or null, got {self.task!r}",
        )


@dataclass
class EvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    """Eval sets, each `{name, root}` (+ optional `task`), in clip_benchmark's webdataset layout."""
    val_data: str | None = None
    """Held-out shards in the training format (shard spec): contrastive validation loss over all of them."""
    zeroshot: str | None = None
    """Deprecated alias: the same as one task `{name: zeroshot, root: DIR}`."""
    every: int = 0
    """Evaluate every N steps (0: only at the end of training)."""
    batch_size: int = 256
    """Images per forward pass of the evaluation."""
    workers: int = 0
    """Data-loading worker processes per rank while evaluating (0: in the training process)."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0")
        _check(self.workers >= 0, "eval.workers", "must be >= 0")
        names = [t.name for t in self.all_tasks()] + (["val"] if self.val_data else [])
        repeated = sorted({n for n in names if names.count(n) > 1})
        _check(not repeated, "eval.tasks", f"eval names must be unique, {repeated[:1]} repeats")

    def all_tasks(self) -> list[EvalTaskConfig]:
        """`tasks`, and the deprecated `zeroshot` folder as a task named `zeroshot`."""
        alias = [EvalTaskConfig(name="zeroshot", root=self.zeroshot)] if self.zeroshot else []
        return [*alias, *self.tasks]

    @property
    def enabled(self) -> bool:
        return bool(self.all_tasks() or self.val_data)


@dataclass
class DistillConfig:
    model: str | None = None
    """Teacher for open_clip's distillation term (`loss_distill`): an open_clip model name (with
    `pretrained`), an export folder, a checkpoint folder or a run directory; null: no teacher term."""
    pretrained: str | None = None
    """The teacher's open_clip pretrained tag or weights file (only with an open_clip name in `model`)."""
    weight: float = 1.0
    """Weight of the distillation terms (`loss_distill`, `loss_zscl`) in the total loss."""
    temperature: float = 2.0
    """ZSCL: softmax temperature of the image-to-reference-text distributions (ZSCL's T)."""
    reference_data: str | None = None
    """ZSCL: shard spec of reference images (their captions are ignored), or `synthetic`; null: no ZSCL."""
    reference_texts: str | None = None
    """ZSCL: text file of reference phrases, one per line (needed with `reference_data`)."""
    reference_batch_size: int = 16
    """ZSCL: reference images per rank per optimizer step."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "distill.weight", f"must be >= 0, got {self.weight}")
        _check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
        _check(
            self.reference_batch_size > 0,
            "distill.reference_batch_size",
            f"must be > 0, got {self.reference_batch_size}",
        )
        _check(
            self.pretrained is None or self.model is not None,
            "distill.pretrained",
            f"needs distill.model (the teacher's open_clip name), got distill.pretrained={self.pretrained}",
        )
        _check(
            (self.reference_data is None) == (self.reference_texts is None),
            "distill.reference_texts" if self.reference_data else "distill.reference_data",
            "ZSCL needs both distill.reference_data and distill.reference_texts",
        )

    @property
    def zscl(self) -> bool:
        """True when the ZSCL reference-set term is on."""
        return self.reference_data is not None

    @property
    def enabled(self) -> bool:
        """True when any distillation term is on (a teacher, or ZSCL's reference set)."""
        return self.model is not None or self.zscl
