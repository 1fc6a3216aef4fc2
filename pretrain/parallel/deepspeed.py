"""DeepSpeed ZeRO (stage 1: optimizer states, 2: + gradients, 3: + weights sharded across ranks).

The engine owns backward, gradient clipping and the optimizer step; the optimizer (`train.optimizer` on our
parameter groups, handed over as DeepSpeed's client optimizer) and the LR schedule stay the project's. Checkpoints are DeepSpeed's own folder (`engine.
save_checkpoint`) inside the step folder; `load_deepspeed_weights` reads them back with DeepSpeed's
zero_to_fp32 utility, without a process group. DeepSpeed calls `torch.load(weights_only=False)` itself;
every load here runs inside `weights_only_loads`, so a downloaded checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from pretrain.config import DEEPSPEED_TIMM_OPTIMIZERS, ConfigError, DistConfig, TrainConfig
from pretrain.parallel.base import Strategy, apply_vector_scalars, vector_scalar_views
from pretrain.parallel.distributed import world
from pretrain.parallel.safe_load import weights_only_loads

DS_DIR = "deepspeed"
"""Sub-folder of a step folder holding DeepSpeed's checkpoint."""
TAG = "state"
"""DeepSpeed checkpoint tag (the step folder already names the step)."""


def skip_cpu_shm_build(device: torch.device) -> None:
    """On the CPU, keep DeepSpeed from building its shared-memory all-reduce.

    DeepSpeed's CPU communication backend compiles a C++ extension (`deepspeed_shm_comm`) when it starts: 1-2 min
    of g++ on 2 cores the first time on a machine, and again for every other path of the venv (it is cached by
    name, keyed by its build flags). Only DeepSpeed's inference all-reduce uses it; training goes through
    torch.distributed (gloo), which it falls back to without the extension. GPUs never build it.
    """
    if device.type != "cpu":
        return
    import importlib

    # by its module name: `deepspeed.comm.torch` as an attribute is the torch package that deepspeed.comm imports
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(ds_torch, "build_shm_op", None)):  # a DeepSpeed without it has nothing to skip
        ds_torch.build_shm_op = lambda: None


def build_deepspeed_config(cfg: DistConfig, train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config from `dist.*` / `train.*`, or the user's JSON file; batch keys always follow train.*."""
    if cfg.deepspeed_config:
        config = json.loads(Path(cfg.deepspeed_config).read_text())
    else:
        zero: dict = {"stage": cfg.zero_stage}
        if cfg.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if cfg.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        config = {
            "zero_optimization": zero,
            "bf16": {"enabled": train.precision == "bf16"},
            "gradient_clipping": train.grad_clip,
            "zero_allow_untested_optimizer": True,  # our torch AdamW with its parameter groups
            "steps_per_print": 10**9,
        }
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = train.batch_size * world_size
    return config


def _deepspeed_records() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors (loss scaler, ZeRO stage, the
    fragment map of the flat partitions): plain records, safe to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_weights(folder: Path, model: nn.Module) -> None:
    """Consolidate the fp32 weights of a DeepSpeed checkpoint (any stage) into a plain model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(_deepspeed_records()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder / DS_DIR), tag=TAG)
    with torch.no_grad():
        for name, target in vector_scalar_views(model).items():
            if name in state:
                target.copy_(state[name].reshape(target.shape))


def check_deepspeed_optimizer(train: TrainConfig) -> None:
    """ZeRO hands the client optimizer flat partitions of many tensors: fine for an elementwise update, wrong
    for one that reads whole tensors, so those are refused (one line naming the key)."""
    optimizer = train.optimizer
    if train.optimizer_kwargs.get("caution"):  # the cautious mask is scaled by its mean over each tensor
        raise ConfigError(
            "train.optimizer_kwargs: caution reads whole tensors; not with dist.strategy=deepspeed"
        )
    if optimizer == "adamw" or optimizer.removeprefix("timm/") in DEEPSPEED_TIMM_OPTIMIZERS:
        return
    fits = ", ".join(f"timm/{name}" for name in DEEPSPEED_TIMM_OPTIMIZERS)
    raise ConfigError(
        f"train.optimizer: {optimizer} reads whole tensors, and DeepSpeed ZeRO steps the optimizer on flat "
        f"partitions of them; with dist.strategy=deepspeed use adamw or an elementwise one ({fits})"
    )


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, cfg: DistConfig, precision: str, train: TrainConfig) -> None:
        super().__init__(cfg, precision)
        if train.accum_steps != 1:
            raise ConfigError("train.accum_steps: must be 1 with dist.strategy=deepspeed (not supported yet)")
        check_deepspeed_optimizer(train)
        self.train_cfg = train
        self.stage = cfg.zero_stage  # the config file's stage once the engine is built

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = self.prepare(model.to(device))
        apply_vector_scalars(model)
        return model

    def attach_optimizer(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Hand model and optimizer to the DeepSpeed engine (process group already initialised)."""
        import deepspeed

        config = build_deepspeed_config(self.cfg, self.train_cfg, world()[1])
        skip_cpu_shm_build(next(module.parameters()).device)
        self.stage = config.get("zero_optimization", {}).get("stage", 0)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.engine = engine
        return engine, ds_optimizer

    @property
    def collective_eval(self) -> bool:
        """Stage 3 shards the weights: only all ranks together can run the model, also for eval."""
        return self.stage == 3

    def unwrap(self, module: nn.Module) -> nn.Module:
        return getattr(module, "module", module)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
    ) -> torch.Tensor | float | None:
        """The engine clips (`gradient_clipping`), steps and zeroes the gradients; returns the engine's
        global gradient norm of this step (None when the engine did not compute one)."""
        self.engine.step()
        return self.engine.get_global_grad_norm()

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def eval_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """encode_image / encode_text skip the engine's forward: at stage 3 gather all weights for eval."""
        return self.gathered(list(model.parameters()))

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.gathered([tensor]):
            return tensor.detach().clone()

    def save(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, is_main: bool) -> None:
        """Every rank writes its ZeRO partitions; rank 0 the module states."""
        self.engine.save_checkpoint(str(folder / DS_DIR), tag=TAG, save_latest=False)

    def load(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:
            load_deepspeed_weights(folder, module)
            return
        saved = len(list((folder / DS_DIR / TAG).glob("*zero_pp_rank_*_optim_states.pt")))
        if saved and saved != world()[1]:
            raise ValueError(
                f"{folder} holds DeepSpeed ZeRO partitions of {saved} ranks and this run has {world()[1]}: "
                f"resume it on {saved} ranks, or convert it to weights any number of ranks starts from: "
                f"model.pretrained={folder} (read through DeepSpeed's zero_to_fp32; a new run, its optimizer and "
                "data state start afresh)"
            )
        with weights_only_loads(_deepspeed_records()):
            self.engine.load_checkpoint(
                str(folder / DS_DIR), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
