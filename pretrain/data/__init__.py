"""Training data sources behind one small interface: `next_batch()`, `state_dict()`, `load_state_dict()`,
`close()` (and `skipped`, bad samples so far, for sources that read shards).

Imports stay lazy so that importing one module of the package (e.g. `pretrain.data.decode`) does not pull
in the whole pipeline. Shard specs, URL opening and the shard layout live in `webshards`.
"""

from __future__ import annotations

import dataclasses


def build_source(cfg, bundle, info, device, exact_batch: bool = True):
    """The micro-batch source for this rank: synthetic data or the sharded WebDataset pipeline (of a table:
    the shards built from it).
    `exact_batch=False`: a checkpoint of another global batch resumes (see `StreamLoader`)."""
    from pretrain.models.build import context_length, image_size

    if cfg.data.train == "synthetic":
        from pretrain.data.synthetic import SyntheticSource

        return SyntheticSource(
            seed=cfg.train.seed,
            batch_size=cfg.train.batch_size,
            rank=info.rank,
            world=info.world,
            image_size=image_size(bundle.model),
            context_length=context_length(bundle.model),
            classes=cfg.data.synthetic_classes,
        )
    from pretrain.data.loader import WebDatasetSource
    from pretrain.data.tables import is_table, table_data

    if is_table(cfg.data.train):  # built into shards on the run's first start (pretrain.data.tables)
        cfg = dataclasses.replace(cfg, data=table_data(cfg, info.is_main))
    return WebDatasetSource(
        cfg.data.train, cfg.data, cfg.data.sampling, cfg.train.seed, cfg.train.batch_size,
        info.rank, info.world, bundle, device, accum_steps=cfg.train.accum_steps, exact_batch=exact_batch,
    )  # fmt: skip
