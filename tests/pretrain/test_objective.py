"""The objective seam: the `loss` config section, the loss chosen from the model (a mismatch is one line,
exit 2), dict model outputs, logged loss parts, `loss.chunk_size` from config, and transformer blocks found
by walking the model (CoCa's towers included)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY, read_jsonl, refused, torchrun, train_in_process
from safetensors.torch import load_file

from pretrain.config import ConfigError, load_config
from pretrain.loss import ClipLoss
from pretrain.objectives import specs
from pretrain.objectives.objective import Objective, Term
from pretrain.objectives.registry import build_loss, choose_objective, objective_specs
from pretrain.parallel.distributed import world

TINY_CLIP = json.loads((ROOT / "configs/models/tiny-clip.json").read_text())
TINY_COCA = {  # open_clip's coca_ViT-B-32.json, shrunk like tiny-clip
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}  # fmt: skip


def tiny_coca() -> open_clip.CoCa:
    """The tiny CoCa built directly (`custom_text` is a factory key, not a constructor argument)."""
    return open_clip.CoCa(**{k: v for k, v in TINY_COCA.items() if k != "custom_text"})


def model_file(tmp: Path, name: str, cfg: dict) -> Path:
    """A model config JSON that `model.name` accepts as a path (registered under its stem)."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.name=infonce", "loss.name: must be one of ('clip', 'coca', 'siglip') or null"),
        ("loss.chunk_size=0", "loss.chunk_size: must be > 0 or null, got 0"),
        ("loss.clip_weight=-1", "loss.clip_weight: must be >= 0, got -1.0"),
        ("loss.caption_weight=-0.5", "loss.caption_weight: must be >= 0, got -0.5"),
        ("loss.ring=true", "loss.ring: needs loss.chunk_size (the ring is part of the tiled loss)"),
    ],
)
def test_bad_loss_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, override.split())
    assert message in str(err.value)


def test_loss_section_defaults_and_pretrain_config_lists_it(capsys):
    from pretrain.cli import main

    cfg = load_config(TINY, [])
    assert (cfg.loss.name, cfg.loss.clip_weight, cfg.loss.caption_weight, cfg.loss.chunk_size) == (
        None, 1.0, 2.0, None,
    )  # fmt: skip
    status = main(["config", "--config", str(TINY), "loss.chunk_size=4"])  # `pretrain config`, in-process
    out, err = capsys.readouterr()
    assert status == 0, err
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    assert lines["loss.name"].startswith("loss.name: null  # clip (InfoNCE)")
    assert lines["loss.chunk_size"].startswith("loss.chunk_size: 4  # Block size of the contrastive loss")
    assert "loss.clip_weight: 1.0  #" in lines["loss.clip_weight"]
    assert "loss.caption_weight: 2.0  #" in lines["loss.caption_weight"]


@pytest.mark.parametrize(
    "model, loss, expected",
    [
        (None, "coca", "loss.name: coca does not fit model 'tiny-clip', a CLIP model without a logit bias or "
                       "a text decoder whose loss is clip; set loss.name=clip or leave it null"),
        ("bias", "clip", "loss.name: clip does not fit model '{path}', a model with a logit bias "
                         "(init_logit_bias) whose loss is siglip; set loss.name=siglip or leave it null"),
    ],
)  # fmt: skip
def test_loss_model_mismatch_is_one_line_exit_2(tmp_path, capsys, model, loss, expected):
    args = ["train", "--config", str(TINY), f"run.dir={tmp_path}", f"loss.name={loss}"]
    path = model_file(tmp_path, "seam-tiny-bias", {**TINY_CLIP, "init_logit_bias": -10.0})
    if model:
        args.append(f"model.name={path}")
    line = refused(args, capsys, tmp_path / "tiny")  # refused before anything is written
    assert line == f"pretrain: error: {expected.format(path=path)}"


def test_a_switch_the_objective_does_not_read_is_one_line_exit_2(tmp_path, capsys):
    """siglip passes texts around the ring by itself: `loss.ring` is refused, named or chosen by the model."""
    for name in (["loss.name=siglip"], []):
        args = ["train", "--config", str(TINY), f"run.dir={tmp_path}", "model.name=tiny-siglip", *name]
        line = refused([*args, "loss.chunk_size=4", "loss.ring=true"], capsys, tmp_path / "tiny")
        assert (
            line
            == "pretrain: error: loss.ring: is for clip and coca; siglip always passes texts around the ring"
        )


def test_loss_is_chosen_from_the_model():
    cfg = load_config(TINY, ["loss.chunk_size=3"])
    models = {
        "clip": open_clip.CLIP(**TINY_CLIP),
        "siglip": open_clip.CLIP(**TINY_CLIP, init_logit_bias=-10.0),
        "coca": tiny_coca(),
    }
    assert {kind: choose_objective(cfg, model).name for kind, model in models.items()} == {
        "clip": "clip", "siglip": "siglip", "coca": "coca",
    }  # fmt: skip
    objective = build_loss(cfg, models["clip"])
    assert isinstance(objective.loss, ClipLoss) and objective.loss.chunk_size == 3  # reachable from config
    assert objective.parts == ("contrastive",)
    assert build_loss(cfg, models["coca"]).parts == ("contrastive", "caption")
    with pytest.raises(
        ConfigError, match=r"^loss.clip_weight: must be > 0 for loss.name=clip \(its only part\)$"
    ):
        build_loss(load_config(TINY, ["loss.clip_weight=0"]), models["clip"])
    ring = load_config(TINY, ["loss.chunk_size=3", "loss.ring=true"])
    assert build_loss(ring, models["clip"]).loss.ring and build_loss(ring, models["coca"]).loss.ring
    with pytest.raises(ConfigError, match=r"^loss.ring: is for clip and coca; siglip always passes"):
        build_loss(ring, models["siglip"])  # loss.name null: the model chose siglip


def test_each_model_has_one_default_objective_and_each_spec_its_module_name():
    models = [open_clip.CLIP(**TINY_CLIP), open_clip.CLIP(**TINY_CLIP, init_logit_bias=-10.0), tiny_coca()]
    registry = objective_specs()
    assert all(spec.name == name for name, spec in registry.items())
    assert [sum(s.default and s.fits(m) for s in registry.values()) for m in models] == [1, 1, 1]


TOY = '''"""A toy objective: InfoNCE on any CLIP model, scaled by loss.clip_weight; default for none."""

import open_clip

from pretrain.loss import ClipLoss
from pretrain.objectives.objective import Objective, ObjectiveSpec

SPEC = ObjectiveSpec(
    name="toy",
    models="a CLIP model",
    fits=lambda model: not isinstance(model, open_clip.CoCa),
    fields=("clip_weight",),
    build=lambda cfg: Objective(ClipLoss(), cfg.clip_weight),
)
'''


@pytest.fixture
def toy_objective(tmp_path, monkeypatch):
    """`toy.py` in a folder added to `pretrain.objectives.specs`: one new file, nothing else edited."""
    folder = tmp_path / "more_objectives"
    folder.mkdir()
    (folder / "toy.py").write_text(TOY)
    monkeypatch.setattr(specs, "__path__", [*specs.__path__, str(folder)])
    yield
    sys.modules.pop(f"{specs.__name__}.toy", None)


def test_one_new_file_adds_an_objective(toy_objective, tmp_path, capsys):
    """The toy module is listed by the config, chosen by loss.name on a model it fits (and never by default),
    trains, and a model it does not fit gets the one-line refusal naming the model's own objective."""
    assert "toy" in specs.objective_names()
    cfg = load_config(TINY, ["loss.name=toy", "loss.clip_weight=0.5"])
    assert choose_objective(cfg, open_clip.CLIP(**TINY_CLIP)).name == "toy"
    assert choose_objective(load_config(TINY, []), open_clip.CLIP(**TINY_CLIP)).name == "clip"
    with pytest.raises(ConfigError, match=r"^loss.name: must be one of \('clip', 'coca', 'siglip', 'toy'\)"):
        load_config(TINY, ["loss.name=toys"])
    with pytest.raises(ConfigError, match=r"^loss.ring: is for clip and coca; toy does not read it$"):
        choose_objective(
            load_config(TINY, ["loss.name=toy", "loss.chunk_size=2", "loss.ring=true"]),
            open_clip.CLIP(**TINY_CLIP),
        )
    run = train_in_process(tmp_path, ["loss.name=toy", "loss.clip_weight=0.5", "train.steps=1"], name="toy")
    row = next(r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r)
    assert row["loss"] == pytest.approx(0.5 * row["loss_contrastive"])
    coca = ["train", "--config", str(TINY), f"run.dir={tmp_path}", "model.name=tiny-coca", "loss.name=toy"]
    assert refused(coca, capsys, tmp_path / "tiny") == (
        "pretrain: error: loss.name: toy does not fit model 'tiny-coca', an open_clip CoCa model (contrastive + "
        "captioning) whose loss is coca; set loss.name=coca or leave it null"
    )


def final_params(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"checkpoints/step_{step:08d}/model.safetensors")


def test_chunk_size_from_config_equals_unchunked(tmp_path):
    """loss.chunk_size tiles the loss inside a run: same logged losses and same weights as no tiling."""
    common = ["train.steps=2", "train.batch_size=8", "train.accum_steps=2"]
    runs = [train_in_process(tmp_path, [*common, *extra], name=name)
            for name, extra in (("full", []), ("tiled", ["loss.chunk_size=3"]))]  # fmt: skip
    rows = [[r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in runs]
    for full, tiled in zip(*rows):
        assert tiled["loss"] == pytest.approx(full["loss"], rel=1e-5)
        assert full["loss_contrastive"] == full["loss"]  # clip: loss = 1.0 x contrastive
    a, b = (final_params(run, 2) for run in runs)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_trainer_calls_the_model_for_a_dict(tmp_path, monkeypatch):
    """The trainer asks for dict outputs and reads them by name."""
    from pretrain.training.trainer import Trainer

    seen = []
    forward = open_clip.CLIP.forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen.append(type(out))
        return out

    monkeypatch.setattr(open_clip.CLIP, "forward", recording)
    trainer = Trainer(load_config(TINY, [f"run.dir={tmp_path}", "train.steps=1", "train.batch_size=4"]))
    try:
        trainer.train()
    finally:
        trainer.close()
    assert seen == [dict]


class CaptionTestTerm(Term):
    """A stand-in for CoCa's caption term, to exercise the seam: the caption cross-entropy over the step's
    global target-token count (pad id 0)."""

    name, when = "caption", "micro"

    def begin_step(self, micro):
        count = torch.stack([(t[:, 1:] != 0).sum() for _, t in micro]).sum()
        if world()[1] > 1:
            torch.distributed.all_reduce(count)
        self.token_count = count

    def __call__(self, step):
        logits = step.output["logits"].float().permute(0, 2, 1)
        ce_sum = F.cross_entropy(logits, step.output["labels"], ignore_index=0, reduction="sum")
        # This rank's share of the global mean, times the world size: strategies average over ranks.
        return world()[1] * ce_sum / self.token_count


def caption_objective(cfg, *model_and_ranks) -> Objective:
    """`build_objective` for the stand-in, with the weights of `loss.*` (open_clip's CoCa defaults)."""
    return Objective(ClipLoss(), cfg.loss.clip_weight, [CaptionTestTerm(cfg.loss.caption_weight)])


def coca_run(tmp: Path, name: str, batch: int, accum: int = 1, nproc: int = 1) -> Path:
    """Two steps of the tiny CoCa with the stand-in objective, in this process or under torchrun."""
    path = model_file(tmp, "seam-tiny-coca", TINY_COCA)
    overrides = [
        f"model.name={path}",
        "train.steps=2",
        f"train.batch_size={batch}",
        f"train.accum_steps={accum}",
    ]
    if nproc == 1:
        return train_in_process(tmp, overrides, name=name)
    worker = Path(__file__).with_name("objective_worker.py")
    args = [
        str(worker),
        "--config",
        str(TINY),
        f"run.dir={tmp}",
        f"run.name={name}",
        "log.every=1",
        *overrides,
    ]
    proc = torchrun(nproc, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / name


def reference_coca_step(run_dir: Path) -> dict[str, float]:
    """Step 1 recomputed with open_clip's own CoCaLoss on the seeded model and the full synthetic batch."""
    from pretrain.data.synthetic import SyntheticSource
    from pretrain.models.build import build_model, context_length, image_size

    cfg = load_config(run_dir / "config.yaml", [])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).model
    batch = cfg.train.batch_size * cfg.train.accum_steps
    source = SyntheticSource(cfg.train.seed, batch, 0, 1, image_size(model), context_length(model))
    images, texts = source.next_batch()
    out = model(images, texts)
    loss = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=0)
    contrastive, caption = loss(**out, output_dict=False)
    return {"loss_contrastive": contrastive.item(), "loss_caption": caption.item()}


def test_a_captioning_objective_plugs_in_and_accumulates_exactly(tmp_path, monkeypatch):
    """An objective with a per-micro-batch part normalised by the step's token count (CoCa's shape) on an
    open_clip CoCa model: both parts are logged and equal open_clip's CoCaLoss at step 1, and 1 rank x 4
    accum 2 and 2 ranks x 4 equal 1 rank x 8 (parts at every step, weights at the end)."""
    monkeypatch.setattr("pretrain.training.trainer.build_objective", caption_objective)
    full = coca_run(tmp_path, "full", 8)
    split = [coca_run(tmp_path, "accum", 4, accum=2), coca_run(tmp_path, "two-ranks", 4, nproc=2)]
    rows = [[r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (full, *split)]
    reference = reference_coca_step(full)
    for key in ("loss_contrastive", "loss_caption"):
        assert rows[0][0][key] == pytest.approx(reference[key], rel=1e-5)
    for a, *others in zip(*rows):
        assert a["loss"] == pytest.approx(a["loss_contrastive"] + 2.0 * a["loss_caption"], rel=1e-6)
        for b, key in itertools.product(others, ("loss", "loss_contrastive", "loss_caption")):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (b["step"], key)
    pa = final_params(full, 2)
    for run in split:
        pb = final_params(run, 2)
        assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5, run.name


def coca_blocks_by_path(model: open_clip.CoCa) -> list[torch.nn.Module]:
    """CoCa's blocks listed by hand: both encoder towers, the decoder's self- and cross-attention."""
    return [
        *model.visual.transformer.resblocks,
        *model.text.transformer.resblocks,
        *model.text_decoder.resblocks,
        *model.text_decoder.cross_attn,
    ]


def test_transformer_blocks_are_found_by_walking_the_model():
    from pretrain.parallel.base import transformer_blocks

    coca = tiny_coca()
    found = transformer_blocks(coca)
    assert len(found) == len({id(b) for b in found}) == 8  # each block once
    assert {id(b) for b in found} == {id(b) for b in coca_blocks_by_path(coca)}
    clip = open_clip.CLIP(**TINY_CLIP)
    expected = [*clip.visual.transformer.resblocks, *clip.transformer.resblocks]
    assert [id(b) for b in transformer_blocks(clip)] == [id(b) for b in expected]


def test_a_block_inside_a_block_is_not_wrapped_twice():
    """Members of a `resblocks` list that themselves hold open_clip blocks are taken once, as a whole."""
    from open_clip.transformer import ResidualAttentionBlock

    from pretrain.parallel.base import transformer_blocks

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ResidualAttentionBlock(16, 2)

    model = torch.nn.Module()
    model.resblocks = torch.nn.ModuleList([Outer(), Outer()])
    model.extra = ResidualAttentionBlock(16, 2)
    assert [id(b) for b in transformer_blocks(model)] == [id(b) for b in (*model.resblocks, model.extra)]


def test_coca_without_weights_starts_from_the_seed(tmp_path):
    """open_clip leaves CoCa's decoder projection as uninitialised memory; build_model initialises it from
    the seeded generator, so two builds with one seed are equal and its scale is the text tower's."""
    from pretrain.config import ModelConfig
    from pretrain.models.build import build_model

    name = str(model_file(tmp_path, "seam-tiny-coca", TINY_COCA))
    projections = []
    for _ in range(2):
        torch.manual_seed(0)
        projections.append(build_model(ModelConfig(name=name)).model.text_decoder.text_projection.detach())
    assert torch.equal(*projections)
    assert projections[0].std().item() == pytest.approx(64**-0.5, rel=0.05)
