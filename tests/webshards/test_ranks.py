"""One reading of the launcher's environment for the trainer and the data_tools runner."""

from __future__ import annotations

import pytest

from webshards.ranks import Ranks, ranks_from_env


def test_single_process_without_a_launcher():
    assert ranks_from_env({}) == Ranks(0, 0, 1, "")


def test_torchrun_wins_over_slurm():
    env = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "8"}
    assert ranks_from_env(env) == Ranks(2, 0, 4, "torchrun")


def test_slurm_with_one_task_is_a_single_process():
    assert ranks_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == Ranks()


def test_slurm_tasks():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert ranks_from_env(env) == Ranks(5, 1, 8, "slurm")


def test_a_variable_that_is_not_an_integer_is_named():
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        ranks_from_env({"RANK": "0", "WORLD_SIZE": "two"})
