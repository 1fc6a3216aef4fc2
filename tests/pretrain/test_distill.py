"""Continued pretraining: open_clip's teacher distillation term, ZSCL's reference-set term and weight
ensembling, each against an independent computation; 2 ranks equal 1 rank; resume is exact; errors are one
line naming the key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY, cli_output, read_jsonl, refused, train_in_process, train_runs
from open_clip.loss import DistillClipLoss
from safetensors.torch import load_file

from pretrain.config import ModelConfig, load_config
from pretrain.models.build import build_model
from pretrain.objectives.distill import teacher_distill_term, zscl_term
from pretrain.training.trainer import seed_everything

PHRASES = ["a red circle", "a blue square", "a green triangle", "a yellow star", "noise"]
STEPS = 3


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_teacher_term_equals_open_clips_distill_clip_loss():
    image, text, t_image, t_text = (unit(6, 8, seed=s) for s in range(4))
    scale, t_scale = torch.tensor(12.0), torch.tensor(30.0)
    _, expected = DistillClipLoss()(image, text, scale, t_image, t_text, t_scale)
    assert teacher_distill_term(image, text, scale, t_image, t_text, t_scale).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_zscl_term_equals_the_kl_written_out():
    """ZSCL on a 2-image, 3-phrase case, computed element by element: T^2 x mean_i KL(p_i || q_i)."""
    student = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    initial = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    phrases = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]])
    scale, temperature = 10.0, 2.0
    total = 0.0
    for s_row, i_row in zip(student.tolist(), initial.tolist()):
        s_logits = [scale * sum(a * b for a, b in zip(s_row, p)) / temperature for p in phrases.tolist()]
        i_logits = [scale * sum(a * b for a, b in zip(i_row, p)) / temperature for p in phrases.tolist()]
        q = [math.exp(x) / sum(math.exp(y) for y in s_logits) for x in s_logits]
        p = [math.exp(x) / sum(math.exp(y) for y in i_logits) for x in i_logits]
        total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    expected = temperature**2 * total / 2
    got = zscl_term(student, initial, phrases, torch.tensor(scale), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # ZSCL's code takes the cross-entropy: the same up to the initial model's entropy (no gradient).
    t_logits, s_logits = scale * initial @ phrases.T, scale * student @ phrases.T
    p = F.softmax(t_logits / temperature, dim=1)
    zscl_code = F.cross_entropy(s_logits / temperature, p) * temperature**2
    entropy = -(p * p.log()).sum(dim=1).mean() * temperature**2
    assert got.item() == pytest.approx((zscl_code - entropy).item(), rel=1e-5)
    assert zscl_term(initial, initial, phrases, torch.tensor(scale), temperature).item() == pytest.approx(
        0, abs=1e-6
    )


@pytest.fixture(scope="module")
def phrases(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phrases") / "phrases.txt"
    path.write_text("\n".join(PHRASES) + "\n")
    return path


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> Path:
    """A tiny-clip weights file unlike the student's start (another seed): the teacher."""
    seed_everything(123)
    model = build_model(ModelConfig(name="tiny-clip")).model
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


def distill_args(phrases: Path, teacher: Path, ref_batch: int) -> list[str]:
    return [
        "distill.model=tiny-clip", f"distill.pretrained={teacher}", "distill.reference_data=synthetic",
        f"distill.reference_texts={phrases}", f"distill.reference_batch_size={ref_batch}", "distill.weight=0.5",
        "train.weight_ensemble_every=2",
    ]  # fmt: skip


def parts(run_dir: Path) -> list[tuple[float, float, float]]:
    return [
        (r["loss"], r["loss_distill"], r["loss_zscl"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if "loss" in r
    ]


def assert_close_runs(a: Path, b: Path, rtol: float = 1e-4) -> None:
    """The same loss parts at every step, and the same weight ensemble at the end."""
    pa, pb = parts(a), parts(b)
    assert len(pa) == len(pb) == STEPS
    for step, (x, y) in enumerate(zip(pa, pb), 1):
        assert x == pytest.approx(y, rel=rtol), f"step {step}: {x} vs {y}"
    ea, eb = (load_file(d / f"checkpoints/step_{STEPS:08d}/ensemble.safetensors") for d in (a, b))
    worst = max((ea[k].reshape(eb[k].shape) - eb[k]).abs().max().item() for k in eb)
    assert worst < 1e-4, f"weight ensembles differ by {worst}"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, phrases, teacher_weights) -> Path:
    """1 rank x batch 16, 8 reference images per step: the reference run."""
    root = tmp_path_factory.mktemp("one-rank")
    overrides = [f"train.steps={STEPS}", "train.batch_size=16", *distill_args(phrases, teacher_weights, 8)]
    return train_in_process(root, overrides, name="one")


def test_accumulation_equals_one_batch(one_rank, tmp_path, phrases, teacher_weights):
    """2 micro-batches of 8: the teacher term over the accumulated 16, the ZSCL term once per step."""
    overrides = [f"train.steps={STEPS}", "train.batch_size=8", "train.accum_steps=2"]
    run = train_in_process(tmp_path, [*overrides, *distill_args(phrases, teacher_weights, 8)], name="accum")
    assert_close_runs(run, one_rank)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, phrases, teacher_weights) -> dict[str, Path]:
    """The 2-rank runs, in one torchrun: `ddp` and `fsdp` of 2 ranks x batch 8 (x 4 reference images), and an
    FSDP run of STEPS + 1 with checkpoints every 2 steps (`straight`) cut back after step 2 and resumed
    (`resumed`)."""
    root = tmp_path_factory.mktemp("two-ranks")
    common = [
        f"run.dir={root}",
        "train.batch_size=8",
        "log.every=1",
        *distill_args(phrases, teacher_weights, 4),
    ]
    short = [*common, f"train.steps={STEPS}"]
    resumable = [
        *common,
        f"train.steps={STEPS + 1}",
        "dist.strategy=fsdp",
        "checkpoint.every=2",
        "checkpoint.keep=5",
    ]
    train_runs([
        {"train": [*short, "run.name=ddp", "dist.strategy=ddp"]},
        {"train": [*short, "run.name=fsdp", "dist.strategy=fsdp"]},
        {"train": [*resumable, "run.name=straight"]},
        {"cut_back": [str(root / "straight"), str(root / "resumed"), 2]},
        {"train": [*resumable, "run.name=resumed", "resume=latest"]},
    ])  # fmt: skip
    return {name: root / name for name in ("ddp", "fsdp", "straight", "resumed")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank(one_rank, two_ranks, strategy):
    """2 gloo ranks x batch 8 (x 4 reference images): the same global batches as 1 rank x 16 (x 8)."""
    assert_close_runs(two_ranks[strategy], one_rank, rtol=1e-3)


@pytest.mark.slow
def test_fsdp_resume_is_exact_with_ensemble(two_ranks):
    """2 FSDP ranks: the sharded ensemble is saved whole and re-sharded on resume; resumed == straight."""
    last = f"checkpoints/step_{STEPS + 1:08d}/ensemble.safetensors"
    a, b = load_file(two_ranks["straight"] / last), load_file(two_ranks["resumed"] / last)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert parts(two_ranks["straight"])[-1] == parts(two_ranks["resumed"])[-1]


def test_zscl_without_a_teacher_starts_at_zero(tmp_path, phrases):
    """With no distill.model the initial model is a frozen copy of the starting weights: KL 0 at step 1."""
    overrides = ["train.steps=2", "distill.reference_data=synthetic", f"distill.reference_texts={phrases}"]
    rows = [r for r in read_jsonl(train_in_process(tmp_path, overrides) / "metrics.jsonl") if "loss" in r]
    assert "loss_distill" not in rows[0]
    assert rows[0]["loss_zscl"] == pytest.approx(0, abs=1e-6)
    assert rows[1]["loss_zscl"] > 0


def initial_weights() -> dict[str, torch.Tensor]:
    """tiny-clip as the trainer builds it at train.seed=0 (step 0 of the run)."""
    seed_everything(0)
    return build_model(ModelConfig(name="tiny-clip")).model.state_dict()


def test_weight_ensemble_is_the_mean_of_the_saved_weights(tmp_path):
    overrides = ["train.steps=6", "train.weight_ensemble_every=2", "checkpoint.every=2", "checkpoint.keep=5"]
    run = train_in_process(tmp_path, overrides)
    members = [initial_weights()]
    for step in (2, 4, 6):
        folder = run / f"checkpoints/step_{step:08d}"
        members.append(load_file(folder / "model.safetensors"))
        ensemble = load_file(folder / "ensemble.safetensors")
        for name, value in ensemble.items():
            mean = torch.stack([m[name] for m in members]).mean(dim=0)
            torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-6)
        assert torch.load(folder / "trainer.pt", weights_only=True)["ensemble_count"] == len(members)


def test_resume_is_exact_with_ensemble_and_reference_stream(tmp_path, demo_data, phrases):
    """Interrupted after step 3 and resumed: the same metrics, weights and ensemble, bit for bit (the ZSCL
    reference images come from shards, so their stream position is part of the resume state)."""
    overrides = [
        "train.steps=5", "checkpoint.every=2", "train.weight_ensemble_every=2",
        f"distill.reference_data={demo_data}/train/{{00000..00001}}.tar", f"distill.reference_texts={phrases}",
        "distill.reference_batch_size=4",
    ]  # fmt: skip
    straight = train_in_process(tmp_path, overrides, name="straight")
    train_in_process(tmp_path, overrides, name="resumed", until=3)
    resumed = train_in_process(tmp_path, [*overrides, "resume=latest"], name="resumed")
    keys = ("step", "loss", "loss_contrastive", "loss_zscl", "lr")
    rows = [
        [{k: r.get(k) for k in keys} for r in read_jsonl(d / "metrics.jsonl")] for d in (straight, resumed)
    ]
    assert rows[0] == rows[1]
    for file in ("model.safetensors", "ensemble.safetensors"):
        a, b = (load_file(d / f"checkpoints/step_00000005/{file}") for d in (straight, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), file


def test_export_weights_ensemble_or_final(tmp_path, capsys):
    run = train_in_process(tmp_path, ["train.steps=2", "train.weight_ensemble_every=1"])
    folder = run / "checkpoints/step_00000002"
    for weights, expected_file in (("ensemble", "ensemble.safetensors"), ("final", "model.safetensors")):
        out = tmp_path / f"export-{weights}"
        cli_output(["export", "--checkpoint", str(run), "--output", str(out), "--weights", weights], capsys)
        exported, expected = load_file(out / "open_clip_model.safetensors"), load_file(folder / expected_file)
        assert all(torch.equal(exported[k], expected[k]) for k in expected)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export-ensemble'}")
    assert torch.equal(
        model.state_dict()["logit_scale"], load_file(folder / "ensemble.safetensors")["logit_scale"]
    )


def test_export_ensemble_of_a_run_without_one_is_one_line(tmp_path, capsys):
    run = train_in_process(tmp_path, ["train.steps=1"])
    out = tmp_path / "export"
    argv = ["export", "--checkpoint", str(run), "--output", str(out), "--weights", "ensemble"]
    assert "train.weight_ensemble_every=0" in refused(argv, capsys, out)


def bad_run(tmp_path: Path, overrides: list[str], capsys) -> str:
    """`pretrain train` in this process: one line, exit 2, refused before anything is written."""
    return refused(
        ["train", "--config", str(TINY), f"run.dir={tmp_path}", *overrides], capsys, tmp_path / "tiny"
    )


def test_bad_reference_texts_and_teacher_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    zscl = ["distill.reference_data=synthetic"]
    missing = bad_run(tmp_path, [*zscl, f"distill.reference_texts={tmp_path}/none.txt"], capsys)
    assert missing == f"pretrain: error: distill.reference_texts: file not found: {tmp_path}/none.txt"
    assert bad_run(tmp_path, [*zscl, f"distill.reference_texts={empty}"], capsys) == (
        f"pretrain: error: distill.reference_texts: {empty} holds no phrases (one per line expected)"
    )
    wide = tmp_path / "tiny-clip-wide.json"
    config = json.loads((ROOT / "configs/models/tiny-clip.json").read_text())
    wide.write_text(json.dumps({**config, "embed_dim": 2 * config["embed_dim"]}))
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("a phrase\n")
    line = bad_run(tmp_path, [*zscl, f"distill.reference_texts={phrases}", f"distill.model={wide}"], capsys)
    assert line.startswith(f"pretrain: error: distill.model: {wide} has embed dim {2 * config['embed_dim']}")
    assert bad_run(tmp_path, ["distill.model=no-such-model"], capsys).startswith(
        "pretrain: error: distill.model: unknown model 'no-such-model'"
    )


def test_distill_keys_are_checked():
    with pytest.raises(ValueError, match="distill.pretrained: needs distill.model"):
        load_config(TINY, ["distill.pretrained=openai"])
    with pytest.raises(ValueError, match="distill.reference_texts: ZSCL needs both"):
        load_config(TINY, ["distill.reference_data=synthetic"])
    with pytest.raises(ValueError, match="train.weight_ensemble_every: must be >= 0"):
        load_config(TINY, ["train.weight_ensemble_every=-1"])
    with pytest.raises(
        ValueError, match="train.weight_ensemble_every: 2 is not supported with dist.strategy=deep"
    ):
        from pretrain.training.ensemble import build_weight_ensemble

        build_weight_ensemble(
            load_config(TINY, ["train.weight_ensemble_every=2", "dist.strategy=deepspeed"]), None
        )
