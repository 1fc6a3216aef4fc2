"""Shard specs: a local folder stands for its .tar shards, in name order, like the brace pattern naming them."""

from __future__ import annotations

import pytest

from webshards.spec import expand_sources, parse_spec


def test_a_folder_is_its_tar_shards_in_name_order(tmp_path):
    for name in ("00001.tar", "00000.tar", "00002.tar", "00000.parquet", "sizes.json"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sizes.json").write_text('{"00000.tar": 2, "00001.tar": 3, "00002.tar": 4}')
    pattern = f"{tmp_path}/{{00000..00002}}.tar"
    assert (
        expand_sources(str(tmp_path))
        == expand_sources(pattern)
        == [[f"{tmp_path}/0000{i}.tar" for i in range(3)]]
    )
    assert expand_sources(f"{tmp_path}::{pattern}")[0] == expand_sources(pattern)[0]
    assert parse_spec(str(tmp_path))[0].samples == 9


def test_a_folder_without_shards_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder without \.tar shards"):
        expand_sources(str(tmp_path))
