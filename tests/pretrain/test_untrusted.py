"""Downloaded checkpoints cannot run code: every checkpoint file is read without unpickling objects.

A poisoned file holds an object whose unpickling creates a marker file (pickle's `__reduce__`); opening
the checkpoint must refuse it with one line and never create the marker.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, one_torch_thread, refused, train_in_process

from pretrain.config import ModelConfig
from pretrain.models.build import build_model
from pretrain.models.checkpoint import resolve_checkpoint
from pretrain.parallel import load_model_weights, safe_load
from pretrain.parallel.safe_load import UnsafeCheckpointError
from pretrain.training.state import GlobalRng
from webshards.publish import seal

OPEN = f"{open.__module__}.{open.__qualname__}"
"""How pickle names the payload's callable (io.open), which the error line must name."""


class Payload:
    """Unpickling this calls `open(marker, "w")`: the file appears only if the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def train_tiny(run_dir: Path, *extra: str) -> Path:
    """One step of configs/tiny.yaml with a checkpoint, in this process (nothing here is about a process)."""
    overrides = ["train.steps=1", "checkpoint.every=1", *extra]
    with one_torch_thread():
        return train_in_process(run_dir.parent, overrides, name=run_dir.name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"single": train_tiny(root / "single"), "fsdp": train_tiny(root / "fsdp", "dist.strategy=fsdp")}


def poisoned_copy(run: Path, tmp: Path, member: str) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint file `member` unpickles into a marker-writing call, its manifest
    rewritten to match: whoever can change a file can change the manifest, which guards against damage only."""
    copy, marker = tmp / "run", tmp / "marker"
    shutil.copytree(run, copy)
    target = resolve_checkpoint(copy) / member
    if target.suffix == ".pt":
        torch.save({"step": 1, "evil": Payload(marker)}, target)
    else:  # DCP's .metadata is a plain pickle
        target.write_bytes(pickle.dumps(Payload(marker)))
    seal(resolve_checkpoint(copy), step=1)
    return copy, marker


def assert_refused(argv: list[str], capsys, marker: Path, named: str, not_made: Path | None = None) -> None:
    """`pretrain ARGV` in this process: one line (so no traceback) naming `named`, exit 2, no marker."""
    line = refused(argv, capsys, not_made)
    assert "refusing to load" in line and named in line
    assert not marker.exists()


@pytest.mark.parametrize(
    "strategy, member", [("single", "trainer.pt"), ("fsdp", "trainer.pt"), ("fsdp", "dcp/.metadata")]
)
def test_export_and_eval_refuse_a_checkpoint_that_would_run_code(
    runs, tmp_path, demo_data, capsys, strategy, member
):
    run, marker = poisoned_copy(runs[strategy], tmp_path, member)
    out = tmp_path / "export"
    assert_refused(["export", "--checkpoint", str(run), "--output", str(out)], capsys, marker, OPEN, out)
    assert not out.with_name("export.tmp").exists()
    assert_refused(["eval", "--checkpoint", str(run), "--zeroshot", str(demo_data)], capsys, marker, OPEN)


@pytest.mark.parametrize("member", ["rank_00000.pt", "optimizer.pt", "trainer.pt"])
def test_resume_refuses_a_poisoned_checkpoint(runs, tmp_path, capsys, member):
    run, marker = poisoned_copy(runs["single"], tmp_path, member)
    args = ["train", "--config", str(TINY), f"run.dir={run.parent}", f"run.name={run.name}",
            "train.steps=2", "resume=latest"]  # fmt: skip
    assert_refused(args, capsys, marker, member)


def test_deepspeed_loads_are_weights_only(tmp_path):
    """DeepSpeed's own loaders pass weights_only=False: ours still refuse a poisoned ZeRO folder."""
    pytest.importorskip("deepspeed")
    marker = tmp_path / "marker"
    state = tmp_path / "step" / "deepspeed" / "state"
    state.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"evil": Payload(marker)}, state / name)
    model = build_model(ModelConfig(name="tiny-clip")).model
    with pytest.raises(UnsafeCheckpointError, match=OPEN.replace(".", r"\.")):
        load_model_weights(tmp_path / "step", model)
    assert not marker.exists()
    assert torch.load is safe_load._TORCH_LOAD  # the patch is undone


def test_saved_state_is_plain_data_and_restores_every_rng(runs):
    """Every file of a normal checkpoint loads with torch's own weights_only reader; the RNG states
    survive it: the draws after restoring equal the draws right after saving."""
    folder = resolve_checkpoint(runs["single"])
    for path in folder.glob("*.pt"):
        torch.load(path, weights_only=True)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = folder.parent / "rng.pt"
    torch.save(GlobalRng.state_dict(), path)
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    GlobalRng.load_state_dict(torch.load(path, weights_only=True))
    got = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
