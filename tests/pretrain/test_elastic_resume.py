"""Resume anywhere, exactly: a run checkpointed at 2 ranks x 2 loader workers resumes at 1 x 1, 1 x 2, 2 x 1 and
4 x 1 (with the micro-batch and accumulation steps that keep the global batch) under DDP and FSDP, and every
step after the resume gives the loss of the uninterrupted run, to fp32 reduction-order tolerance, ending in the
same weights and weight ensemble. That the steps see the same samples and augmentation seeds is the property
tests/pretrain/test_stream_properties.py checks on random shard sets; here the whole trainer follows it.
DeepSpeed's per-rank ZeRO partitions are refused on another world with one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import TINY, read_jsonl, refused, train_in_process, train_runs
from safetensors.torch import load_file

from pretrain.models.build import load_trained
from pretrain.training.ensemble import ENSEMBLE_FILE

SPEC = "train/{00000..00003}.tar"
STEPS, CUT = 4, 2
# (ranks, loader workers, micro-batch, accumulation steps): each a global batch of 16
BEFORE = (2, 2, 8, 1)
AFTER = {"1x1": (1, 0, 8, 2), "1x2": (1, 2, 16, 1), "2x1": (2, 1, 4, 2), "4x1": (4, 0, 4, 1)}


def overrides(root: Path, name: str, demo_data: Path, topology: tuple, strategy: str) -> list[str]:
    _, workers, batch, accum = topology
    return [
        f"run.dir={root}", f"run.name={name}", "log.every=1", f"train.steps={STEPS}", f"checkpoint.every={CUT}",
        "checkpoint.keep=5", f"data.train={demo_data}/{SPEC}", "data.shuffle_buffer=40", f"data.workers={workers}",
        f"train.batch_size={batch}", f"train.accum_steps={accum}", f"dist.strategy={strategy}",
        "train.weight_ensemble_every=1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory, demo_data) -> dict[tuple[str, str], Path]:
    """Per strategy: the uninterrupted 2 x 2 run, and its copy cut back to step CUT resumed on each topology.
    One 2-rank job (references, cuts, 2-rank resumes), one 4-rank job, the 1-rank resumes in this process."""
    root = tmp_path_factory.mktemp("elastic")
    runs: dict[tuple[str, str], Path] = {}
    jobs: dict[int, list[dict]] = {2: [], 4: []}
    in_process: list[tuple[str, list[str]]] = []
    for strategy in ("ddp", "fsdp"):
        ref = f"ref-{strategy}"
        jobs[2].append({"train": overrides(root, ref, demo_data, BEFORE, strategy)})
        runs[strategy, "ref"] = root / ref
        for label, topology in AFTER.items():
            name = f"{strategy}-{label}"
            jobs[2].append({"cut_back": [str(root / ref), str(root / name), CUT]})
            resume = [*overrides(root, name, demo_data, topology, strategy), "resume=latest"]
            if topology[0] == 1:
                in_process.append((name, resume))
            else:
                jobs[topology[0]].append({"train": resume})
            runs[strategy, label] = root / name
    train_runs(jobs[2], nproc=2)
    train_runs(jobs[4], nproc=4)
    for name, resume in in_process:
        train_in_process(root, resume, name=name)
    return runs


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("label", list(AFTER))
def test_a_two_by_two_checkpoint_resumes_exactly_on_another_topology(elastic_runs, strategy, label):
    ref, resumed = elastic_runs[strategy, "ref"], elastic_runs[strategy, label]
    assert losses(resumed)[:CUT] == losses(ref)[:CUT]  # the cut-back copy's own history
    assert losses(resumed)[CUT:] == pytest.approx(losses(ref)[CUT:], rel=1e-5, abs=1e-6)
    rows = [r for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and rows[-1]["samples_seen"] == STEPS * 16
    want, got = (load_trained(run).model.state_dict() for run in (ref, resumed))  # any strategy's format
    assert want.keys() == got.keys()
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst < 1e-5, f"weights differ by up to {worst}"
    want, got = (load_file(run / f"checkpoints/step_{STEPS:08d}/{ENSEMBLE_FILE}") for run in (ref, resumed))
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert want.keys() == got.keys() and worst < 1e-5, f"the weight ensembles differ by up to {worst}"


def test_a_topology_that_cannot_own_whole_partitions_is_one_line(tmp_path, demo_data, capsys, caplog):
    """A run started on 1 rank x 2 workers reads 2 partitions: 3 workers asked to own them whole cannot, a global
    batch of 12 is not the run's 16, and data.partitions cannot change; the checkpoint stays as it was. Left to
    the default, 3 workers become the 2 that can."""
    start = overrides(tmp_path, "run", demo_data, (1, 2, 16, 1), "ddp")
    run = train_in_process(
        tmp_path, [*start, "train.steps=1", "data.workers=0", "data.partitions=2"], name="run"
    )
    args = ["train", "--config", str(TINY), *start, "resume=latest"]
    assert refused([*args, "data.workers=3", "data.partitions=2"], capsys) == (
        "pretrain: error: data.partitions=2 cannot be read by 1 rank(s) x 3 loader worker(s) = 3 slots that each "
        "own whole partitions: use ranks x max(1, data.workers) dividing 2 (the run's sample order is fixed by "
        "data.partitions, set when it started)"
    )
    assert refused([*args, "train.batch_size=12"], capsys) == (
        "pretrain: error: exact resume needs the checkpoint's global batch 16 (train.batch_size x ranks x "
        "train.accum_steps); this run's is 12"
    )
    assert refused([*args, "data.partitions=4"], capsys) == (
        "pretrain: error: data.partitions=4, but the checkpoint's run reads 2 partitions: a run's sample order is "
        "fixed when it starts; leave data.partitions unset or set it to 2"
    )
    assert (run / "checkpoints/latest").read_text() == "step_00000001"
    # the default (unset) takes the checkpoint's partitions, and with data.workers=3 reads them with the 2
    # workers that own them whole, saying so
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        train_in_process(tmp_path, [*start, "train.steps=2", "resume=latest", "data.workers=3"], name="run")
    assert "data: 2 of data.workers=3 loader workers read this run" in caplog.text
    assert (run / "checkpoints/latest").read_text() == "step_00000002"


def test_deepspeed_refuses_another_world_in_one_line(tmp_path):
    """ZeRO partitions are per rank: the refusal names both worlds and what to do instead."""
    from pretrain.parallel.deepspeed import DS_DIR, TAG, DeepSpeedStrategy

    folder = tmp_path / "step_00000002"
    (folder / DS_DIR / TAG).mkdir(parents=True)
    for rank in range(2):
        (folder / DS_DIR / TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(
        ValueError, match=r"holds DeepSpeed ZeRO partitions of 2 ranks and this run has 1: resume"
    ):
        strategy.load(folder, torch.nn.Linear(1, 1), torch.optim.SGD([torch.zeros(1)]))
