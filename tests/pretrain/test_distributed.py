"""Rank, world size and master address come from torchrun's or SLURM's environment."""

from __future__ import annotations

from pretrain.parallel.distributed import DistInfo, detect


def test_single_process_by_default():
    assert detect({}) == DistInfo()


def test_torchrun_environment():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    assert detect(env) == DistInfo(3, 1, 8, "torchrun", master_addr="node7", master_port=1234)


def test_slurm_environment_without_scontrol():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[12-15]"}
    info = detect(env)
    assert (info.rank, info.local_rank, info.world) == (5, 1, 8)
    assert info.master_addr == "gpu12" and info.is_main is False and info.distributed


def test_torchrun_wins_over_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}
    assert detect(env).world == 2
