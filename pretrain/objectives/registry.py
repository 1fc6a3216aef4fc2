"""The objective registry: each module of `pretrain.objectives.specs` is one objective (its `SPEC`), found by
listing the package, so no table of names exists to edit. `build_objective` is the trainer's one call: the
objective of `loss.name` (or the model's default) with the extra terms of the config."""

from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import nn

from pretrain.config import Config, ConfigError, LossConfig
from pretrain.models.build import ModelBundle
from pretrain.objectives import specs as registered
from pretrain.objectives.distill import build_terms
from pretrain.objectives.objective import Objective, ObjectiveSpec
from pretrain.parallel.base import Strategy
from pretrain.parallel.distributed import DistInfo


def objective_specs() -> dict[str, ObjectiveSpec]:
    """Every registered objective by name (the modules of `pretrain.objectives.specs`, imported)."""
    return {
        name: importlib.import_module(f"{registered.__name__}.{name}").SPEC
        for name in registered.objective_names()
    }


def choose_objective(cfg: Config, model: nn.Module) -> ObjectiveSpec:
    """The objective of `loss.name`, or the model's default when it is null; one that does not fit the model,
    or a `loss.*` switch it does not read, is a one-line ConfigError."""
    specs = objective_specs()
    default = next(spec for spec in specs.values() if spec.default and spec.fits(model))
    spec = specs[cfg.loss.name] if cfg.loss.name else default
    if not spec.fits(model):
        raise ConfigError(
            f"loss.name: {spec.name} does not fit model {cfg.model.name!r}, {default.models} whose loss is "
            f"{default.name}; set loss.name={default.name} or leave it null"
        )
    _check_switches(cfg.loss, spec, specs)
    return spec


def _check_switches(cfg: LossConfig, spec: ObjectiveSpec, specs: dict[str, ObjectiveSpec]) -> None:
    """A `loss.*` switch turned on that the objective does not read is refused, naming those that read it."""
    for key in (f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is True):
        if key not in spec.fields:
            readers = " and ".join(s.name for s in specs.values() if key in s.fields)
            why = spec.unread.get(key, "does not read it")
            raise ConfigError(f"loss.{key}: is for {readers}; {spec.name} {why}")


def build_loss(cfg: Config, model: nn.Module) -> Objective:
    """The chosen objective without extra terms; a lone contrastive part needs a positive weight."""
    spec = choose_objective(cfg, model)
    objective = spec.build(cfg.loss)
    if objective.parts == ("contrastive",) and cfg.loss.clip_weight <= 0:
        raise ConfigError(f"loss.clip_weight: must be > 0 for loss.name={spec.name} (its only part)")
    return objective


def build_objective(
    cfg: Config, student: ModelBundle, strategy: Strategy, info: DistInfo, device: torch.device
) -> Objective:
    """The objective for `cfg` and the (unwrapped) student, extra terms included; call it before the student
    is wrapped (ZSCL copies its starting weights). Config mismatches are one-line ConfigErrors, raised before
    any teacher is loaded."""
    objective = build_loss(cfg, student.model)
    objective.terms += build_terms(cfg, student, strategy, info, device)
    return objective
