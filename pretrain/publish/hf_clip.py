"""open_clip's CLIP as Hugging Face transformers' `CLIPModel`: what it cannot express, its config and weights.

The mapping follows the two models' code (open_clip's `VisionTransformer`/`TextTransformer`, transformers'
`modeling_clip.py`): open_clip packs q/k/v into one `in_proj` (split here in that order), keeps its
projections as `x @ proj` (transformers: `Linear` without bias, so the transpose) and pools the text at the
end-of-text token. open_clip's `argmax` pooling takes the first position of the highest token id, which for
its BPE is the end-of-text token 49407; transformers pools the first position of `eos_token_id`, so with
`eos_token_id=49407` (and the tokenizer padding with that token) both pick the same position.

Anything transformers cannot express is found on the built modules, not the config, so a setting applied
after the config (a forced QuickGELU, say) is seen as it is: `unsupported` names the first difference.
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer, _clean_lower
from open_clip.transformer import LayerNorm, LayerNormFp32, QuickGELU
from timm.layers.activations import GELU, GELUTanh
from torch import nn


class NotExpressible(ValueError):
    """The model has a part the transformers class it maps to (CLIPModel, SiglipModel) cannot hold (one line
    naming it)."""


LAYER_NORMS = (nn.LayerNorm, LayerNorm, LayerNormFp32)  # what CLIPModel's nn.LayerNorm computes


def hidden_act(module: nn.Module) -> str | None:
    """transformers' `hidden_act` name computing exactly what `module` does, or None."""
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(module.approximate)
    if isinstance(module, (GELU, GELUTanh)):  # timm's (its towers and `act_layer: gelu_tanh`)
        return "gelu" if isinstance(module, GELU) else "gelu_pytorch_tanh"
    return None


def blocks_problem(blocks: nn.ModuleList, tower: str) -> str | None:
    """What a tower's residual blocks have that CLIPEncoderLayer does not, or None."""
    for block in blocks:
        if type(block).__name__ != "ResidualAttentionBlock":
            return f"{tower} blocks are {type(block).__name__} (scaled cosine attention or head scaling)"
        if not isinstance(block.attn, nn.MultiheadAttention):
            return (
                f"{tower} attention is {type(block.attn).__name__} (qk norm, scaled cosine or head scaling)"
            )
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            return f"{tower} blocks have LayerScale (ls_init_value)"
        if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
            return f"{tower} blocks have a norm after attention (scale_attn)"
        if not isinstance(getattr(block.mlp, "ln", nn.Identity()), nn.Identity):
            return f"{tower} MLPs have an inner norm (scale_fc)"
        if hidden_act(block.mlp.gelu) is None:
            return f"{tower} activation {block.mlp.gelu} (transformers' hidden_act: gelu or quick_gelu)"
        if type(block.ln_1) not in LAYER_NORMS or type(block.ln_2) not in LAYER_NORMS:
            return f"{tower} norm is {type(block.ln_1).__name__} (transformers: LayerNorm)"
    if len({hidden_act(b.mlp.gelu) for b in blocks}) > 1 or len({b.ln_1.eps for b in blocks}) > 1:
        return f"{tower} blocks differ in activation or norm eps (transformers has one per tower)"
    return None


def _vision_problem(visual: nn.Module) -> str | None:
    """What the image tower has that CLIPVisionModel does not, or None."""
    if type(visual).__name__ != "VisionTransformer":
        return f"image tower {type(visual).__name__} (CLIPModel's is open_clip's VisionTransformer)"
    if getattr(visual, "attn_pool", None) is not None:
        return "attentional pooling (vision_cfg.attentional_pool; CLIPModel pools the class token)"
    if visual.pool_type != "tok" or getattr(visual, "class_embedding", None) is None:
        return f"image pooling {visual.pool_type!r} (vision_cfg.pool_type; CLIPModel pools the class token)"
    if isinstance(visual.ln_pre, nn.Identity):
        return "no norm before the image transformer (vision_cfg.no_ln_pre; CLIPModel has pre_layrnorm)"
    if visual.conv1.bias is not None or not isinstance(
        getattr(visual, "patchnorm_pre_ln", nn.Identity()), nn.Identity
    ):
        return "patch embedding with bias or patch norm (CLIPModel: a bias-free conv)"
    if not isinstance(visual.proj, nn.Parameter):
        return "image projection is not one bias-free matrix (vision_cfg.proj_type / proj_bias)"
    if len(set(visual.image_size)) > 1 or len(set(visual.patch_size)) > 1:
        return f"non-square images or patches {visual.image_size}/{visual.patch_size} (CLIPModel: square)"
    return blocks_problem(visual.transformer.resblocks, "image")


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text tower's parts: `CustomTextCLIP.text`, or the CLIP model itself."""
    return model.text if hasattr(model, "text") else model


def _text_problem(model: nn.Module, tokenizer: object) -> str | None:
    """What the text tower or its tokenizer has that CLIPTextModel and CLIPTokenizer do not, or None."""
    text = text_tower(model)
    if not hasattr(text, "token_embedding"):
        return f"text tower {type(text).__name__} (a Hugging Face text model: text_cfg.hf_model_name)"
    pool = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
    eos = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
    if getattr(text, "cls_emb", None) is not None:
        return "text class token (text_cfg.embed_cls; CLIPModel pools the end-of-text token)"
    if text.attn_mask is None:
        return "text attention is not causal (text_cfg.no_causal_mask)"
    if not isinstance(text.text_projection, nn.Parameter):
        return "text projection is not one bias-free matrix (text_cfg.proj_type / proj_bias)"
    if not isinstance(tokenizer, SimpleTokenizer):
        return f"tokenizer {type(tokenizer).__name__} (CLIPTokenizer is open_clip's own BPE)"
    if pool not in ("argmax", "eos") or (pool == "eos" and eos != tokenizer.eot_token_id):
        return f"text pooling {pool!r} (text_cfg.pool_type; CLIPModel pools the end-of-text token)"
    if tokenizer.clean_fn is not _clean_lower or tokenizer.reduction_fn is not None:
        return "tokenizer cleaning other than 'lower' or a reduction mask (CLIPTokenizer lowercases only)"
    if len(tokenizer.encoder) != text.token_embedding.num_embeddings:
        return f"tokenizer of {len(tokenizer.encoder)} tokens for {text.token_embedding.num_embeddings} embeddings"
    return blocks_problem(text.transformer.resblocks, "text")


def unsupported(model: nn.Module, tokenizer: object) -> str | None:
    """The first part of `model` (or its tokenizer) transformers' CLIPModel cannot express, or None."""
    kind = type(model).__name__
    if kind not in ("CLIP", "CustomTextCLIP"):
        return f"{kind} model (transformers has CLIPModel for open_clip's CLIP; no {kind} counterpart)"
    if getattr(model, "logit_bias", None) is not None:
        return (
            "SigLIP logit bias (CLIPModel has none; SigLIP models are exported as SiglipModel, hf_siglip.py)"
        )
    return _vision_problem(model.visual) or _text_problem(model, tokenizer)


def _tower_config(blocks: nn.ModuleList, width: int) -> dict:
    """The encoder settings transformers reads per tower."""
    first = blocks[0]
    return {
        "hidden_size": width,
        "intermediate_size": first.mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads,
        "hidden_act": hidden_act(first.mlp.gelu),
        "layer_norm_eps": first.ln_1.eps,
    }


def clip_config(model: nn.Module, tokenizer: SimpleTokenizer) -> dict:
    """transformers' `config.json` for `model` (checked by `unsupported` first)."""
    visual, text = model.visual, text_tower(model)
    embed_dim = visual.proj.shape[1]
    eot = tokenizer.eot_token_id
    text_cfg = _tower_config(text.transformer.resblocks, text.token_embedding.embedding_dim)
    text_cfg.update(
        model_type="clip_text_model",
        vocab_size=text.token_embedding.num_embeddings,
        max_position_embeddings=text.positional_embedding.shape[0],
        projection_dim=embed_dim,
        bos_token_id=tokenizer.sot_token_id,
        eos_token_id=eot,  # pooling at the first end-of-text token, as open_clip's argmax (module docstring)
        pad_token_id=eot,
    )
    vision_cfg = _tower_config(visual.transformer.resblocks, visual.conv1.out_channels)
    vision_cfg.update(
        model_type="clip_vision_model",
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        num_channels=visual.conv1.in_channels,
        projection_dim=embed_dim,
    )
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed_dim,
        "logit_scale_init_value": float(model.logit_scale.detach()),
        "dtype": "float32",
        "text_config": text_cfg,
        "vision_config": vision_cfg,
    }


def encoder_weights(blocks: nn.ModuleList, prefix: str) -> dict[str, torch.Tensor]:
    """CLIPEncoder's weights from open_clip's residual blocks; the packed in_proj split into q, k, v."""
    out = {}
    for i, block in enumerate(blocks):
        layer = f"{prefix}.encoder.layers.{i}"
        attn = block.attn
        out.update(qkv_weights(attn.in_proj_weight, attn.in_proj_bias, f"{layer}.self_attn"))
        parts = {"self_attn.out_proj": attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}  # fmt: skip
        for name, module in parts.items():
            out.update(weight_and_bias(module, f"{layer}.{name}"))
    return out


def qkv_weights(weight: torch.Tensor, bias: torch.Tensor | None, prefix: str) -> dict[str, torch.Tensor]:
    """A packed (q, k, v) projection split into transformers' `q_proj`, `k_proj`, `v_proj` under `prefix`
    (zero biases where it has none)."""
    bias = bias if bias is not None else torch.zeros(weight.shape[0])
    out = {}
    for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3), bias.chunk(3), strict=True):
        out.update({f"{prefix}.{name}.weight": w, f"{prefix}.{name}.bias": b})
    return out


def weight_and_bias(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A Linear's, convolution's or LayerNorm's weight and bias (zeros where it has none) under `name`."""
    bias = module.bias if module.bias is not None else torch.zeros(module.weight.shape[0])
    return {f"{name}.weight": module.weight, f"{name}.bias": bias}


def clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel state dict (its names) from open_clip's `model`, as contiguous CPU tensors."""
    visual, text = model.visual, text_tower(model)
    state = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        **weight_and_bias(visual.ln_pre, "vision_model.pre_layrnorm"),  # transformers' spelling
        **encoder_weights(visual.transformer.resblocks, "vision_model"),
        **weight_and_bias(visual.ln_post, "vision_model.post_layernorm"),
        "visual_projection.weight": visual.proj.T,
        "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": text.positional_embedding,
        **encoder_weights(text.transformer.resblocks, "text_model"),
        **weight_and_bias(text.ln_final, "text_model.final_layer_norm"),
        "text_projection.weight": text.text_projection.T,
        "logit_scale": model.logit_scale.reshape(()),
    }
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
