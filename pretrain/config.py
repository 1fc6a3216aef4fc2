"""The run config: one dataclass per component, merged defaults <- YAML <- command-line dotlist.

Every key can be overridden as `section.key=value`. Unknown keys and values of the wrong type raise
`ConfigError` with one line that names the key, so the CLI can exit 2 with a message a user can act on.
The sections live in `config_sections/`; this module assembles, loads, describes and saves them, and is
the one to import from.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import os
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config_sections import (
    DEEPSPEED_TIMM_OPTIMIZERS,
    NOT_SECRETS,
    PRECISIONS,
    SCHEDULES,
    SECRET_WORDS,
    STRATEGIES,
    AugConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistConfig,
    DistillConfig,
    EvalConfig,
    EvalTaskConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    close_matches,
)
from webshards.atomic import write_atomic
from webshards.urls import redact_url

__all__ = [
    "DEEPSPEED_TIMM_OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "STRATEGIES",
    "AugConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "DistillConfig",
    "EvalConfig",
    "EvalTaskConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "all_keys",
    "close_matches",
    "describe_config",
    "field_docs",
    "load_config",
    "redacted",
    "save_config",
    "to_dict",
]

log = logging.getLogger("pretrain")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    resume: str | None = None
    """null, `latest`, or a checkpoint path."""

    def __post_init__(self) -> None:
        if self.dist.compile is not None:  # the deprecated alias: moved to train.compile
            log.warning("dist.compile is deprecated: use train.compile (set to %s)", self.dist.compile)
            self.train.compile = self.train.compile or self.dist.compile
            self.dist.compile = None
        # torch's DDP fails (an internal assert) on a backward under no_sync with static_graph, and the
        # micro-steps of one step use different parameters (the logit scale learns in the last only)
        if self.dist.static_graph and self.train.accum_steps > 1:
            raise ConfigError(
                f"dist.static_graph: needs train.accum_steps=1 (torch's DDP cannot keep a static graph across "
                f"accumulation micro-steps), got train.accum_steps={self.train.accum_steps}"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, for error suggestions and docs."""
    keys = []
    for f in fields(cls):
        sub = f.default_factory if is_dataclass(f.default_factory) else None
        keys += all_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass, on one line, read from its source with `ast`."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        doc = (
            after.value.value
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            else None
        )
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, str):
            docs[node.target.id] = " ".join(doc.split())
    return docs


def _yaml_value(value: Any) -> str:
    """A value as one line of YAML (`null`, `true`, `[1.0, 2.0]`, quoted only where YAML needs it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("...\n").strip()


def describe_config(cfg: Config) -> list[str]:
    """`section.key: value  # docstring` for every key of the schema, in schema order (secrets redacted)."""

    def walk(cls: type, values: dict, prefix: str) -> list[str]:
        lines, docs = [], field_docs(cls)
        for f in fields(cls):
            if is_dataclass(f.default_factory):
                lines += walk(f.default_factory, values[f.name], f"{prefix}{f.name}.")
                continue
            line = f"{prefix}{f.name}: {_yaml_value(values[f.name])}"
            lines.append(f"{line}  # {docs[f.name]}" if f.name in docs else line)
        return lines

    return walk(Config, redacted(cfg), "")


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    first = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in" in first:
        # A wrong section name is matched against section names, a wrong key against full dotted keys.
        candidates = all_keys() if "." in key else [f.name for f in fields(Config)]
        return f"unknown config key '{key}'{close_matches(key, candidates)}"
    return f"{key}: {first}"


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def _parse_overrides(overrides: list[str]) -> Any:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like section.key=value")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Merge defaults <- YAML file <- `section.key=value` overrides into a validated `Config`."""
    layers = [OmegaConf.structured(Config)]
    if path is not None:
        layers.append(OmegaConf.create(_read_yaml(path)))
    layers.append(_parse_overrides(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    except ValueError as e:  # __post_init__ checks raise ConfigError (a ValueError) naming the key
        raise ConfigError(str(e)) from None


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def redacted(cfg: Config) -> dict:
    """The config as a dict with values of secret-looking keys replaced, and credentials inside URLs
    (`user:password@`, query tokens) shown as `***`."""

    def scrub(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        secret = any(w in key.lower() for w in SECRET_WORDS) and key not in NOT_SECRETS
        if secret and value is not None:
            return "***"
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return redact_url(value) if isinstance(value, str) else value

    return scrub(to_dict(cfg))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (temp name, then rename)."""
    write_atomic(path, yaml.safe_dump(redacted(cfg), sort_keys=False).encode())
