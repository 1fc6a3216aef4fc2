"""launch/: the SLURM script under a simulated allocation (fake `srun` / `scontrol` on PATH run one task
per "node" on this machine), the generated torchrun commands for the 32 x 8 recipe, and a real 2-node x
1-process run through slurm.sbatch -> srun -> torchrun.sh -> torchrun -> pretrain.train."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import ROOT, TINY, free_port, read_jsonl, run_cmd

from pretrain.config import load_config

SBATCH = ROOT / "launch/slurm.sbatch"
RECIPE = "configs/laion400m_vitb32.yaml"

FAKE_SRUN = """#!/bin/bash
# one task per node of the simulated allocation, all on this machine
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_NTASKS=$SLURM_JOB_NUM_NODES "$@" > "$FAKE_OUT/node$i.out" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf '%s\\n' $FAKE_HOSTS ;;
  "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=$4 NodeHostName=$4 State=ALLOCATED" ;;
  *) echo "$@" >> "$FAKE_OUT/scontrol" ;;
esac
"""


def fake_slurm(tmp: Path, nodes: int, hosts: list[str], extra_env: dict) -> dict:
    """PATH with fake srun/scontrol, and the SLURM variables of a `nodes`-node allocation."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": f"fake[001-{nodes:03d}]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "FAKE_HOSTS": " ".join(hosts),
        "FAKE_OUT": str(tmp),
        **extra_env,
    }


def test_sbatch_header_has_preemption_and_requeue():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=USR1@120" in header
    assert "#SBATCH --requeue" in header
    assert "#SBATCH --ntasks-per-node=1" in header


def test_recipe_commands_for_32_nodes_x_8_gpus(tmp_path):
    hosts = [f"gpu{i:03d}" for i in range(1, 33)]
    env = fake_slurm(tmp_path, 32, hosts, {"SLURM_GPUS_ON_NODE": "8", "DRY_RUN": "1"})
    proc = run_cmd(["bash", str(SBATCH), "--config", RECIPE], env=env)
    assert proc.returncode == 0, proc.stderr
    commands = [(tmp_path / f"node{i}.out").read_text().strip() for i in range(32)]
    for i, cmd in enumerate(commands):
        # the c10d rendezvous on the first node numbers the nodes, and lets torchrun restart a failed group
        assert (
            "-m pretrain.torchrun --nnodes 32 --rdzv-backend c10d --rdzv-endpoint gpu001:29500 --rdzv-id 777 "
            in cmd
        )
        assert f"--rdzv-conf is_host={int(i == 0)} --nproc-per-node 8 --max-restarts 3 " in cmd
        assert "SIGUSR1" in cmd
        assert cmd.endswith(f"-m pretrain.train --config {RECIPE} resume=latest")
    cfg = load_config(ROOT / RECIPE)
    assert cfg.train.batch_size * 32 * 8 == 32768 and cfg.resume == "latest"
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps) == (5e-4, 0.2, 2000)
    assert (cfg.train.precision, cfg.data.sampling, cfg.data.workers) == ("bf16", "resampled", 8)
    assert 31 <= cfg.train.steps * 32768 / 400e6 <= 33  # ~32 epochs of LAION-400M


@pytest.mark.slow
def test_sbatch_trains_on_a_simulated_two_node_allocation(tmp_path):
    env = fake_slurm(
        tmp_path, 2, ["127.0.0.1", "127.0.0.1"], {"NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    )
    run = tmp_path / "runs"
    args = ["--config", str(TINY), f"run.dir={run}", "run.name=slurm", "train.steps=3", "train.batch_size=8"]
    proc = run_cmd(["bash", str(SBATCH), *args, "log.every=1"], env=env)
    logs = "".join((tmp_path / f"node{i}.out").read_text() for i in range(2))
    assert proc.returncode == 0, logs[-3000:]
    rows = [r for r in read_jsonl(run / "slurm/metrics.jsonl") if "loss" in r]
    assert [r["samples_seen"] for r in rows] == [16, 32, 48]  # 2 ranks x batch 8: one rank per "node"
    assert (run / "slurm/checkpoints/latest").read_text() == "step_00000003"
    assert re.search(r"2 nodes x 1, master 127.0.0.1 \(127.0.0.1:", proc.stdout)
