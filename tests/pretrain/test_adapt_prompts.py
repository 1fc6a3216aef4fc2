"""CoOp and PRE prompt learners (pretrain/adapt/coop.py, pre.py) against outside references: with the context
initialised from "a photo of a" and no training, CoOp's logits are open_clip's zero-shot classifier of "a photo
of a {c}." times the logit scale (unified and class-specific); other class positions give open_clip's
`encode_text` of the sentence they spell; PRE's encoded context is ctx + a bidirectional LSTM written out here
from its equations; a few steps lower the loss and move only the prompt parameters."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier

from pretrain.adapt.coop import (
    CoOpConfig,
    build_coop,
    fit_prompts,
    load_prompt_state,
    parameter_counts,
    prompt_state,
)
from pretrain.adapt.pre import PREConfig, build_pre
from pretrain.config import ModelConfig
from pretrain.models.build import MODEL_CONFIG_DIR, build_model

# One-token and several-token names, and one the tokenizer splits at a hyphen.
CLASSES = ["dog", "red square", "hot air balloon", "x-ray", "blue circle"]
WIDTH = 128  # tiny-clip's text width (configs/models/tiny-clip.json)


@pytest.fixture(scope="module")
def clip():
    """tiny-clip with random weights (seed 0) and its tokenizer: the equalities hold for any weights."""
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="tiny-clip"))
    return bundle.model.eval(), bundle.tokenizer


@pytest.fixture(scope="module")
def features(clip):
    """Image features of 20 random images through the (frozen) image tower, and labels 0..4 four times."""
    model, _ = clip
    with torch.no_grad():
        images = torch.randn(20, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        return model.encode_image(images), torch.arange(20) % len(CLASSES)


@pytest.fixture(scope="module")
def custom_text_clip(tmp_path_factory):
    """tiny-clip as open_clip's `CustomTextCLIP` (`custom_text`: the text tower is a `TextTransformer` held as
    `model.text`, the layout of many open_clip models)."""
    config = json.loads((MODEL_CONFIG_DIR / "tiny-clip.json").read_text()) | {"custom_text": True}
    path = tmp_path_factory.mktemp("models") / "tiny-clip-custom-text.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name=str(path)))
    assert isinstance(bundle.model, open_clip.CustomTextCLIP)
    return bundle.model.eval(), bundle.tokenizer


def zero_shot_logits(model, tokenizer, image_features: torch.Tensor, template: str) -> torch.Tensor:
    """The reference: open_clip's zero-shot classifier of one template, times the model's logit scale."""
    classifier = build_zero_shot_classifier(model, tokenizer, CLASSES, [template])
    return model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ classifier


@pytest.mark.parametrize("class_specific", [False, True], ids=["unified", "class-specific"])
def test_coop_from_a_photo_of_a_is_the_zero_shot_classifier(clip, features, class_specific):
    model, tokenizer = clip
    learner = build_coop(
        model, tokenizer, CLASSES, CoOpConfig(ctx_init="a photo of a", class_specific=class_specific)
    )
    with torch.no_grad():
        logits = learner(features[0])
    reference = zero_shot_logits(model, tokenizer, features[0], "a photo of a {}.")
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert learner.ctx.shape == ((len(CLASSES), 4, WIDTH) if class_specific else (4, WIDTH))


def test_custom_text_towers_too(custom_text_clip, features):
    model, tokenizer = custom_text_clip
    learner = build_coop(model, tokenizer, CLASSES, CoOpConfig(ctx_init="a photo of a"))
    with torch.no_grad():
        logits = learner(features[0])
    reference = zero_shot_logits(model, tokenizer, features[0], "a photo of a {}.")
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("position", "sentence"), [("front", "{} a photo of a."), ("middle", "a photo {} of a.")]
)
def test_class_name_positions_spell_the_sentence(clip, position, sentence):
    """The name before the 4 context tokens (`front`), or after the first M/2 = 2 of them (`middle`)."""
    model, tokenizer = clip
    cfg = CoOpConfig(ctx_init="a photo of a", class_token_position=position)
    with torch.no_grad():
        ours = build_coop(model, tokenizer, CLASSES, cfg).text_features()
        reference = model.encode_text(tokenizer([sentence.format(c) for c in CLASSES]), normalize=True)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_classifier_for_novel_classes_uses_the_learned_context(clip, features):
    """Base-to-novel: the context from "a photo of a" on names it was not built with is open_clip's zero-shot
    classifier of those names; after training, the classifier of the training names gives the learner's own
    logits, and a saved prompt state put into a fresh learner gives them again."""
    model, tokenizer = clip
    novel = ["green triangle", "cat", "yellow star"]
    learner = build_coop(model, tokenizer, CLASSES[:2], CoOpConfig(ctx_init="a photo of a"))
    reference = build_zero_shot_classifier(model, tokenizer, novel, ["a photo of a {}."])
    torch.testing.assert_close(learner.classifier(novel), reference, atol=1e-6, rtol=0)
    cfg = PREConfig(lr=0.05, batch_size=20)
    torch.manual_seed(4)
    trained = build_pre(model, tokenizer, CLASSES, cfg)
    fit_prompts(trained, *features, cfg, steps=2)
    image = F.normalize(features[0], dim=-1)
    with torch.no_grad():
        logits = trained(features[0])
        torch.testing.assert_close(model.logit_scale.exp() * image @ trained.classifier(CLASSES), logits)
        fresh = build_pre(model, tokenizer, CLASSES, cfg)
        load_prompt_state(fresh, prompt_state(trained))
        torch.testing.assert_close(fresh(features[0]), logits)
    csc = build_coop(model, tokenizer, CLASSES, CoOpConfig(class_specific=True))
    with pytest.raises(ValueError, match="^class_specific: "):
        csc.classifier(novel)


def lstm_direction(x: torch.Tensor, w_ih, w_hh, b_ih, b_hh) -> torch.Tensor:
    """One LSTM direction over the rows of `x`, from the equations (gates i, f, g, o, as torch orders them)."""
    hidden = w_hh.shape[1]
    h, c, outputs = x.new_zeros(hidden), x.new_zeros(hidden), []
    for x_t in x:
        i, f, g, o = (w_ih @ x_t + b_ih + w_hh @ h + b_hh).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs)


def test_pre_at_init_is_ctx_plus_a_bidirectional_lstm(clip, features):
    """PRE's encoder is not the identity at init: context' = ctx + [forward LSTM; backward LSTM](ctx); its
    logits are CoOp's with that context (CoOp's path checked against open_clip above)."""
    model, tokenizer = clip
    torch.manual_seed(2)
    learner = build_pre(model, tokenizer, CLASSES)
    lstm, ctx = learner.encoder.lstm, learner.ctx.detach()
    weights = [getattr(lstm, f"{k}_l0") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    reverse = [getattr(lstm, f"{k}_l0_reverse") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    with torch.no_grad():
        expected = ctx + torch.cat(
            [lstm_direction(ctx, *weights), lstm_direction(ctx.flip(0), *reverse).flip(0)], dim=-1
        )
        torch.testing.assert_close(learner.context(), expected, atol=1e-6, rtol=0)
        assert (expected - ctx).abs().max() > 1e-3  # not the identity: PRE at init is not zero-shot
        coop = build_coop(model, tokenizer, CLASSES, CoOpConfig(ctx_init="a photo of a"))
        coop.ctx.copy_(expected)
        torch.testing.assert_close(learner(features[0]), coop(features[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["coop", "coop-csc", "pre"])
def test_steps_lower_the_loss_and_move_only_the_prompts(clip, features, method):
    model, tokenizer = clip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    if method == "pre":
        cfg = PREConfig(lr=0.05, batch_size=20)
        learner = build_pre(model, tokenizer, CLASSES, cfg)
    else:
        cfg = CoOpConfig(lr=0.05, batch_size=20, class_specific=method == "coop-csc")
        learner = build_coop(model, tokenizer, CLASSES, cfg)
    start = prompt_state(learner)
    image_features, labels = features
    with torch.no_grad():
        initial = F.cross_entropy(learner(image_features), labels).item()
    fit_prompts(learner, image_features, labels, cfg, steps=5)
    with torch.no_grad():
        final = F.cross_entropy(learner(image_features), labels).item()
    assert final < initial
    assert all(not p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
    assert all(not torch.equal(prompt_state(learner)[k], v) for k, v in start.items())


def test_trainable_parameter_counts(clip):
    """Unified M x width, class-specific C x M x width; PRE adds its BiLSTM: per direction 4h x width + 4h x h
    + two biases of 4h, with h = width / 2."""
    model, tokenizer = clip
    frozen = sum(p.numel() for p in model.parameters())
    h = WIDTH // 2
    lstm = 2 * (4 * h * WIDTH + 4 * h * h + 2 * 4 * h)
    cases = [
        (build_coop(model, tokenizer, CLASSES), 16 * WIDTH),
        (build_coop(model, tokenizer, CLASSES, CoOpConfig(class_specific=True)), len(CLASSES) * 16 * WIDTH),
        (build_coop(model, tokenizer, CLASSES, CoOpConfig(ctx_init="a photo of a")), 4 * WIDTH),
        (build_pre(model, tokenizer, CLASSES), 4 * WIDTH + lstm),
    ]
    for learner, trainable in cases:
        assert parameter_counts(learner) == {"trainable": trainable, "frozen": frozen}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"n_ctx": 0}, "n_ctx"), ({"class_token_position": "left"}, "class_token_position"), ({"lr": 0}, "lr")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        CoOpConfig(**kwargs)


def test_schedules_follow_the_papers():
    """CoOp: 200 epochs for 8-16 shots, 100 for 2-4, 50 for 1; PRE: 50. 16 shots x 10 classes in batches of 32
    is 5 steps an epoch."""
    assert [CoOpConfig().epochs_for(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert CoOpConfig().steps_for(160, 16) == 1000 and PREConfig().steps_for(160, 16) == 250


def test_refusals_name_the_problem(clip):
    model, tokenizer = clip
    with pytest.raises(ValueError, match="^n_ctx: 16 differs from the 4 tokens"):
        build_coop(model, tokenizer, CLASSES, CoOpConfig(n_ctx=16, ctx_init="a photo of a"))
    with pytest.raises(ValueError, match="does not fit the text context length"):
        build_coop(model, tokenizer, [" ".join(["word"] * 20)])  # 16 context + 20 words > 32 tokens
    coca = build_model(ModelConfig(name="tiny-coca")).model
    with pytest.raises(ValueError, match="CoCa-style"):
        build_coop(coca, tokenizer, CLASSES)
