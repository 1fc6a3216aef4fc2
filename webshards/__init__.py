"""The bottom layer: what both ``pretrain`` and ``data_tools`` need to know about shards on disk.

- ``atomic``: temp-then-rename writers (a reader never sees a half-written file).
- ``layout``: the img2dataset shard layout (tar members, ``_stats.json``, ``sizes.json``): writer and reader.
- ``urls``: opening shard URLs (local, ``s3://``, ``http(s)://``, ``pipe:``) with retries.
- ``spec``: shard specs (brace expansion, ``::`` sources, weights, sample counts).
- ``samples``: what a raw sample holds (image member extensions) and ``BadSample``.

It imports neither package above it, nor torch or open_clip, so a light worker (hashing, stats) stays light.
"""
