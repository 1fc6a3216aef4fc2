"""Running an open_clip text tower on prompt embeddings instead of token ids, the ground prompt learning
(CoOp, PRE) stands on: some prompt positions hold learned vectors that no token id names.

open_clip's `CLIP.encode_text` (and `TextTransformer.forward`, the tower of `CustomTextCLIP`) goes token ids
-> `token_embedding` -> + `positional_embedding` -> `transformer` (causal mask) -> `ln_final` -> pool at the
end-of-text token (`text_global_pool`) -> `text_projection`. `encode_embeddings` does the same from the
embedding step on, calling the tower's own modules, so a prompt whose embeddings are those of a sentence's
tokens gives exactly `encode_text` of that sentence. Pooling reads the prompt's token ids (context slots hold
a placeholder token), so it finds the end-of-text token where `encode_text` would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

PLACEHOLDER = "X"
"""The word that holds a context slot in a tokenized prompt (CoOp's choice); its embedding is replaced."""
POSITIONS = ("end", "middle", "front")
"""Where the class name goes relative to the context: CoOp's `CLASS_TOKEN_POSITION`."""


@dataclass
class TextTower:
    """The modules of an open_clip text tower that turn token embeddings into text features (references to
    the model's own modules: nothing is copied)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    attn_mask: torch.Tensor | None
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    pool_type: str
    eos_id: int | None
    context_length: int

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim


def text_tower(model: nn.Module) -> TextTower:
    """The text tower of an open_clip `CLIP` (its parts live on the model) or `CustomTextCLIP` (a
    `TextTransformer` as `model.text`). Towers prompt learning cannot drive are a one-line ValueError: Hugging
    Face text towers (no token embedding of ours to extend) and CoCa-style towers with an appended class token
    or a padding mask (their mask depends on the token ids in a way learned slots do not follow)."""
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        if text.cls_emb is not None or text.use_pad_mask:
            raise ValueError(
                f"prompt learning: {type(model).__name__}'s text tower appends a class token or masks padding "
                "(CoCa-style); only CLIP-style towers are supported"
            )
        return TextTower(
            text.token_embedding, text.positional_embedding, text.transformer, text.attn_mask, text.ln_final,
            text.text_projection, text.pool_type, text.eos_id, text.context_length,
        )  # fmt: skip
    if not isinstance(getattr(model, "token_embedding", None), nn.Embedding):
        raise ValueError(
            f"prompt learning: {type(model).__name__} has no open_clip text transformer with a token "
            "embedding (Hugging Face text towers are not supported)"
        )
    return TextTower(
        model.token_embedding, model.positional_embedding, model.transformer, model.attn_mask, model.ln_final,
        model.text_projection, model.text_pool_type, getattr(model, "text_eos_id", None), model.context_length,
    )  # fmt: skip


def encode_embeddings(tower: TextTower, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Text features (not normalised) of prompts given as token embeddings `[N, L, width]`; `tokens` `[N, L]`
    are the prompts' token ids, read only to find the pooled (end-of-text) position."""
    cast_dtype = tower.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x if projection is None else x @ projection


@dataclass
class PromptLayout:
    """Tokenized prompts with context slots: `tokens` `[C, L]` (a placeholder word in each slot) and
    `context_index` `[C, M]`, the position of context vector m in class c's prompt."""

    tokens: torch.Tensor
    context_index: torch.Tensor


def insert_context(base: torch.Tensor, context_index: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings `[C, L, width]`: `base` (the tokens' own embeddings) with the context vectors
    (`[M, width]` shared, or `[C, M, width]` per class) in the slots `context_index` `[C, M]`."""
    classes, width = base.shape[0], base.shape[-1]
    context = context.expand(classes, -1, -1) if context.dim() == 2 else context
    index = context_index.unsqueeze(-1).expand(-1, -1, width)
    return base.scatter(1, index, context.to(base.dtype))


def name_length(tokenizer, name: str) -> int:
    """How many tokens `name` takes (open_clip's tokenizers add start and end tokens and pad with 0)."""
    return int((tokenizer([name])[0] != 0).sum()) - 2


def build_layout(tokenizer, classnames: list[str], n_ctx: int, position: str = "end") -> PromptLayout:
    """CoOp's prompts `[SOT] [X]*M name . [EOT]` (`end`), `[SOT] [X]*M/2 name [X]*(M - M/2) . [EOT]`
    (`middle`) or `[SOT] name [X]*M . [EOT]` (`front`), with the positions of the M slots. A prompt that does
    not fit the tower's context length, or a tokenizer that does not keep each placeholder one token, is a
    one-line ValueError naming the class."""
    if position not in POSITIONS:
        raise ValueError(f"class_token_position: must be one of {POSITIONS}, got {position!r}")
    half = n_ctx // 2 if position == "middle" else n_ctx
    rows, indices = [], []
    for name in classnames:
        before = 0 if position == "front" else half
        after = n_ctx - before
        words = [PLACEHOLDER] * before + [name] + [PLACEHOLDER] * after
        tokens = tokenizer([" ".join(words) + "."])[0]
        length = name_length(tokenizer, name)
        index = list(range(1, 1 + before)) + list(range(1 + before + length, 1 + before + length + after))
        _check_prompt(tokenizer, tokens, index, name)
        rows.append(tokens)
        indices.append(torch.tensor(index, dtype=torch.long))
    return PromptLayout(torch.stack(rows), torch.stack(indices))


def _check_prompt(tokenizer, tokens: torch.Tensor, index: list[int], name: str) -> None:
    """The prompt kept its end token (not truncated) and every slot holds the placeholder token."""
    if int(tokens[-1]) != 0:
        raise ValueError(
            f"prompt learning: the prompt for class {name!r} does not fit the text context length "
            f"{tokens.numel()} (fewer context tokens or a shorter class name)"
        )
    placeholder = int(tokenizer([PLACEHOLDER])[0][1])
    if any(int(tokens[i]) != placeholder for i in index):
        raise ValueError(f"prompt learning: the tokenizer merges the context placeholder with class {name!r}")


def context_from_text(tower: TextTower, tokenizer, text: str) -> torch.Tensor:
    """The token embeddings `[M, width]` of `text`'s words (start and end tokens left out): CoOp's
    initialisation of the context from words such as "a photo of a"."""
    tokens = tokenizer([text])[0]
    count = int((tokens != 0).sum()) - 2
    with torch.no_grad():
        return tower.token_embedding(tokens[1 : 1 + count].to(tower.token_embedding.weight.device)).clone()
