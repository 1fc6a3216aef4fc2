"""open_clip's SigLIP as Hugging Face transformers' `SiglipModel`: what it cannot express, its config and weights.

`SiglipModel` holds open_clip's real SigLIP architecture (configs like ViT-B-16-SigLIP): a timm SigLIP ViT
(`vision_cfg.timm_model_name`, `timm_pool: map`, `timm_proj: none`: no class token, no pre-norm, a final norm,
a MAP attention-pooling head) and a text tower attending both ways (`no_causal_mask`), pooled at the last
position (`pool_type: last`) through a projection with bias. The mapping follows the models' code (timm's
`VisionTransformer` and `AttentionPoolLatent`, open_clip's `TextTransformer`, transformers' `modeling_siglip.py`):
timm packs q/k/v into one `qkv` Linear and the MAP head's k/v into `kv`, in that order, where transformers has
q/k/v Linears in the encoder and one packed `in_proj` (q, k, v) in the head's `nn.MultiheadAttention`.
open_clip's own ViT (tiny-siglip: class token, pre-norm, causal text) is refused with what differs.
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, _clean_lower
from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from pretrain.publish.hf_clip import (
    LAYER_NORMS,
    blocks_problem,
    encoder_weights,
    hidden_act,
    qkv_weights,
    text_tower,
    weight_and_bias,
)

NORMS = (*LAYER_NORMS, TimmLayerNorm)  # each computes nn.LayerNorm's function
TIMM_HINT = (
    "timm's SigLIP ViT: vision_cfg.timm_model_name such as vit_base_patch16_siglip_224, timm_pool: map"
)


def _norm_problem(module: nn.Module, what: str) -> str | None:
    if type(module) not in NORMS:
        return f"{what} is {type(module).__name__} (SiglipModel: LayerNorm)"
    return None if module.weight is not None else f"{what} has no weights (SiglipModel: an affine LayerNorm)"


def _timm_block_problem(block: nn.Module) -> str | None:
    """What a timm ViT block has that SiglipEncoderLayer does not, or None."""
    attn = block.attn
    if type(block) is not Block or type(attn) is not Attention or not isinstance(block.mlp, Mlp):
        return (
            f"image blocks are {type(block).__name__}/{type(attn).__name__} (SiglipModel: timm's plain Block)"
        )
    if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
        return "image blocks have LayerScale (timm init_values)"
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm, block.mlp.norm)):
        return "image blocks have qk, attention or MLP norms (timm qk_norm / scale_*_norm)"
    if attn.gate is not None or attn.attn_dim != attn.proj.out_features:
        return "image attention is gated or of another width (timm gated / attn_head_dim)"
    if hidden_act(block.mlp.act) is None:
        return f"image activation {block.mlp.act} (transformers' hidden_act: gelu, gelu_pytorch_tanh)"
    return _norm_problem(block.norm1, "image norm") or _norm_problem(block.norm2, "image norm")


def _pool_problem(trunk: VisionTransformer) -> str | None:
    """What the image pooling has that SiglipMultiheadAttentionPoolingHead does not, or None."""
    pool = trunk.attn_pool
    if pool.latent_len != 1 or pool.pos_embed is not None or pool.pool != "token" or pool.mlp is None:
        return "MAP head with several latents, position embedding or no MLP (SiglipModel: one probe, an MLP)"
    if not isinstance(pool.q, nn.Linear) or not isinstance(pool.q_norm, nn.Identity):
        return "MAP head without a query projection or with qk norm (SiglipModel: nn.MultiheadAttention)"
    block = trunk.blocks[0]
    if pool.num_heads != block.attn.num_heads or pool.mlp.fc1.out_features != block.mlp.fc1.out_features:
        return "MAP head with other heads or MLP width than the blocks (SiglipModel: one of each per tower)"
    return _norm_problem(pool.norm, "MAP head norm")


def _trunk_problem(trunk: nn.Module) -> str | None:
    """What the timm trunk has that SiglipVisionModel does not, or None."""
    if not isinstance(trunk, VisionTransformer):
        return f"timm image tower {type(trunk).__name__} (SiglipModel's is {TIMM_HINT})"
    if trunk.cls_token is not None or trunk.reg_token is not None:
        return "class or register tokens in the image tower (SiglipModel has none)"
    if not isinstance(trunk.attn_pool, AttentionPoolLatent):
        return f"image pooling {trunk.global_pool!r} (vision_cfg.timm_pool; SiglipModel has a MAP head: map)"
    if not isinstance(trunk.norm_pre, nn.Identity) or not isinstance(trunk.fc_norm, nn.Identity):
        return "a norm before the image blocks or after pooling (SiglipModel: one final norm)"
    if trunk.pos_embed is None or not isinstance(trunk.head, nn.Identity):
        return "no position embedding, or a classifier head on the image tower (SiglipModel: neither)"
    patch = trunk.patch_embed
    if type(patch) is not PatchEmbed or not isinstance(patch.norm, nn.Identity) or patch.dynamic_img_pad:
        return f"patch embedding {type(patch).__name__} with norm or padding (SiglipModel: one conv)"
    if len(set(patch.img_size)) > 1 or len(set(patch.patch_size)) > 1:
        return f"non-square images or patches {patch.img_size}/{patch.patch_size} (SiglipModel: square)"
    problem = _norm_problem(trunk.norm, "final image norm") or _pool_problem(trunk)
    problem = problem or next(filter(None, map(_timm_block_problem, trunk.blocks)), None)
    return problem or _same_settings(_vision_modules(trunk), "image")


def _vision_modules(trunk: VisionTransformer) -> tuple[list[nn.Module], list[nn.Module]]:
    """The activations and norms of the image tower, which transformers sets once per tower."""
    blocks, pool = list(trunk.blocks), trunk.attn_pool
    acts = [b.mlp.act for b in blocks] + [pool.mlp.act]
    norms = [n for b in blocks for n in (b.norm1, b.norm2)] + [trunk.norm, pool.norm]
    return acts, norms


def _same_settings(modules: tuple[list[nn.Module], list[nn.Module]], tower: str) -> str | None:
    acts, norms = modules
    if len({hidden_act(a) for a in acts}) > 1 or len({n.eps for n in norms}) > 1:
        return f"{tower} tower differs in activation or norm eps (transformers has one per tower)"
    return None


def _vision_problem(visual: nn.Module) -> str | None:
    """What the image tower has that SiglipVisionModel does not, or None."""
    if type(visual).__name__ != "TimmModel":
        return (
            f"image tower is open_clip's {type(visual).__name__} (class token, pre-norm, class-token pooling); "
            f"SiglipModel's is {TIMM_HINT}, timm_proj: none"
        )
    if len(visual.head) > 0:
        return "an image projection after the timm trunk (vision_cfg.timm_proj; SiglipModel: timm_proj: none)"
    return _trunk_problem(visual.trunk)


def _tokenizer_problem(tokenizer: object, vocab: int) -> str | None:
    """What the tokenizer does that a transformers tokenizer loaded from the folder would not, or None."""
    if isinstance(tokenizer, SimpleTokenizer):
        if tokenizer.clean_fn is not _clean_lower or tokenizer.reduction_fn is not None:
            return "tokenizer cleaning other than 'lower' or a reduction mask (CLIPTokenizer lowercases only)"
        if len(tokenizer.encoder) != vocab:
            return f"tokenizer of {len(tokenizer.encoder)} tokens for {vocab} embeddings"
        return None
    if isinstance(tokenizer, HFTokenizer):
        if tokenizer.tokenizer_mode or tokenizer.strip_sep_token:
            return (
                "Hugging Face tokenizer with tokenizer_mode or strip_sep_token (done outside the tokenizer)"
            )
        return None
    return f"tokenizer {type(tokenizer).__name__} (open_clip's BPE or a Hugging Face tokenizer)"


def _text_problem(model: nn.Module, tokenizer: object) -> str | None:
    """What the text tower has that SiglipTextModel does not, or None."""
    text = text_tower(model)
    if type(text).__name__ != "TextTransformer":
        return f"text tower {type(text).__name__} (SiglipModel's is open_clip's TextTransformer)"
    if text.cls_emb is not None:
        return "text class token (text_cfg.embed_cls; SiglipModel pools the last position)"
    if text.attn_mask is not None or text.use_pad_mask:
        return "text attention is causal or masks padding (SiglipModel: text_cfg.no_causal_mask, no pad mask)"
    if text.pool_type != "last":
        return (
            f"text pooling {text.pool_type!r} (SiglipModel pools the last position: text_cfg.pool_type: last)"
        )
    if text.text_projection is None:
        return "no text projection (text_cfg.proj_type none; SiglipModel's text head is a Linear)"
    problem = blocks_problem(text.transformer.resblocks, "text") or _norm_problem(text.ln_final, "text norm")
    return problem or _tokenizer_problem(tokenizer, text.token_embedding.num_embeddings)


def unsupported(model: nn.Module, tokenizer: object) -> str | None:
    """The first part of `model` (or its tokenizer) transformers' SiglipModel cannot express, or None."""
    if type(model).__name__ not in ("CLIP", "CustomTextCLIP"):
        return f"{type(model).__name__} model (SiglipModel holds open_clip's CLIP-style SigLIP only)"
    return _vision_problem(model.visual) or _text_problem(model, tokenizer)


def _token_ids(tokenizer: object) -> dict:
    """The special token ids transformers' config records (padding is what open_clip pads with)."""
    if isinstance(tokenizer, SimpleTokenizer):  # open_clip pads with 0
        return {
            "pad_token_id": 0,
            "bos_token_id": tokenizer.sot_token_id,
            "eos_token_id": tokenizer.eot_token_id,
        }
    hf = tokenizer.tokenizer
    return {"pad_token_id": hf.pad_token_id, "bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id}


def _text_projection(text: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's text projection as a Linear's weight and bias: a `Linear` (proj_bias) as it is, a bare
    matrix used as `x @ proj` transposed, with a zero bias where it has none."""
    proj = text.text_projection
    weight = proj.weight if isinstance(proj, nn.Linear) else proj.T
    bias = proj.bias if isinstance(proj, nn.Linear) and proj.bias is not None else None
    return weight, bias if bias is not None else torch.zeros(weight.shape[0])


def siglip_config(model: nn.Module, tokenizer: object) -> dict:
    """transformers' `config.json` for `model` (checked by `unsupported` first)."""
    trunk, text = model.visual.trunk, text_tower(model)
    block, resblock = trunk.blocks[0], text.transformer.resblocks[0]
    text_cfg = {
        "model_type": "siglip_text_model",
        "vocab_size": text.token_embedding.num_embeddings,
        "hidden_size": text.token_embedding.embedding_dim,
        "intermediate_size": resblock.mlp.c_fc.out_features,
        "num_hidden_layers": len(text.transformer.resblocks),
        "num_attention_heads": resblock.attn.num_heads,
        "max_position_embeddings": text.positional_embedding.shape[0],
        "hidden_act": hidden_act(resblock.mlp.gelu),
        "layer_norm_eps": resblock.ln_1.eps,
        "projection_size": _text_projection(text)[0].shape[0],
        **_token_ids(tokenizer),
    }
    vision_cfg = {
        "model_type": "siglip_vision_model",
        "hidden_size": trunk.embed_dim,
        "intermediate_size": block.mlp.fc1.out_features,
        "num_hidden_layers": len(trunk.blocks),
        "num_attention_heads": block.attn.num_heads,
        "num_channels": trunk.patch_embed.proj.in_channels,
        "image_size": trunk.patch_embed.img_size[0],
        "patch_size": trunk.patch_embed.patch_size[0],
        "hidden_act": hidden_act(block.mlp.act),
        "layer_norm_eps": block.norm1.eps,
        "vision_use_head": True,
    }
    return {"architectures": ["SiglipModel"], "model_type": "siglip", "dtype": "float32",
            "text_config": text_cfg, "vision_config": vision_cfg}  # fmt: skip


def _vision_layers(trunk: VisionTransformer) -> dict[str, torch.Tensor]:
    """SiglipEncoder's layers from timm's blocks; the packed `qkv` split into q, k, v (timm's order)."""
    out = {}
    for i, block in enumerate(trunk.blocks):
        layer = f"vision_model.encoder.layers.{i}"
        out.update(qkv_weights(block.attn.qkv.weight, block.attn.qkv.bias, f"{layer}.self_attn"))
        parts = {"self_attn.out_proj": block.attn.proj, "layer_norm1": block.norm1, "layer_norm2": block.norm2,
                 "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}  # fmt: skip
        for name, module in parts.items():
            out.update(weight_and_bias(module, f"{layer}.{name}"))
    return out


def _vision_head(pool: AttentionPoolLatent) -> dict[str, torch.Tensor]:
    """SiglipMultiheadAttentionPoolingHead from timm's MAP head: its latent is the probe; the query and the
    packed key/value Linears make nn.MultiheadAttention's packed in_proj (q, k, v)."""
    q, kv = weight_and_bias(pool.q, "q"), weight_and_bias(pool.kv, "kv")
    head = "vision_model.head"
    return {
        f"{head}.probe": pool.latent,
        f"{head}.attention.in_proj_weight": torch.cat([q["q.weight"], kv["kv.weight"]]),
        f"{head}.attention.in_proj_bias": torch.cat([q["q.bias"], kv["kv.bias"]]),
        **weight_and_bias(pool.proj, f"{head}.attention.out_proj"),
        **weight_and_bias(pool.norm, f"{head}.layernorm"),
        **weight_and_bias(pool.mlp.fc1, f"{head}.mlp.fc1"),
        **weight_and_bias(pool.mlp.fc2, f"{head}.mlp.fc2"),
    }


def siglip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' SiglipModel state dict (its names) from open_clip's `model`, as contiguous CPU tensors."""
    trunk, text = model.visual.trunk, text_tower(model)
    weight, bias = _text_projection(text)
    state = {
        **weight_and_bias(trunk.patch_embed.proj, "vision_model.embeddings.patch_embedding"),
        "vision_model.embeddings.position_embedding.weight": trunk.pos_embed[0],
        **_vision_layers(trunk),
        **weight_and_bias(trunk.norm, "vision_model.post_layernorm"),
        **_vision_head(trunk.attn_pool),
        "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": text.positional_embedding,
        **encoder_weights(text.transformer.resblocks, "text_model"),
        **weight_and_bias(text.ln_final, "text_model.final_layer_norm"),
        "text_model.head.weight": weight,
        "text_model.head.bias": bias,
        "logit_scale": model.logit_scale.reshape(1),
        "logit_bias": model.logit_bias.reshape(1),
    }
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
