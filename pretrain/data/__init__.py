"""Training data sources behind one small interface: `next_batch()`, `state_dict()`, `load_state_dict()`."""

from __future__ import annotations

from pretrain.config import Config
from pretrain.data.synthetic import SyntheticSource
from pretrain.distributed import DistInfo
from pretrain.model import ModelBundle, context_length, image_size


def build_source(cfg: Config, bundle: ModelBundle, info: DistInfo):
    """The micro-batch source for this rank: synthetic data or local shards."""
    if cfg.data.train == "synthetic":
        return SyntheticSource(
            seed=cfg.train.seed,
            batch_size=cfg.train.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            image_size=image_size(bundle.model),
            context_length=context_length(bundle.model),
            classes=cfg.data.synthetic_classes,
        )
    from pretrain.data.shard_source import ShardSource

    return ShardSource(
        cfg.data.train,
        cfg.train.batch_size,
        info.rank,
        info.world_size,
        bundle.preprocess_train,
        bundle.tokenizer,
    )
