"""Caption decoding for CoCa models, natively: the decoding of open_clip's `CoCa.generate`, without `transformers`.

open_clip 3.3's `generate` needs `transformers` (<= 4.56, which pins `huggingface_hub < 1`) for its beam
scorer and logits processors. A captioning command should not pull in a second model library with an old hub
client, so this module decodes on its own and is tested token for token against open_clip's `generate`
(tests/pretrain/test_caption.py, in an environment the test makes with `transformers` 4.56). What it keeps
from `generate`, so that the two agree:
- beam search is *group* beam search (6 beams in 3 groups) over the raw decoder logits, without a diversity
  penalty, each group keeping its own finished hypotheses scored by sum / length; the best over the groups wins;
- `top_k` / `top_p` sample with `torch.multinomial` from the filtered softmax (seed torch for repeatable runs);
- end-of-text is barred until `min_length` tokens, and a sequence holds at most `max_length` tokens
  (start token included; the last one is end-of-text when sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pretrain.generate.decoding import DecodingConfig

NOT_FINISHED = -1e9  # the score every beam of a group but its first starts with, as in `generate`


@dataclass(frozen=True)
class SpecialTokens:
    sot: int
    eot: int
    pad: int


def special_tokens(model: torch.nn.Module, tokenizer) -> SpecialTokens:
    """Start/end-of-text ids of the tokenizer (open_clip's BPE: 49406/49407) and the model's pad id."""
    sot = getattr(tokenizer, "sot_token_id", None)
    eot = getattr(tokenizer, "eot_token_id", None)
    return SpecialTokens(49406 if sot is None else sot, 49407 if eot is None else eot, int(model.pad_id))


def check_captioner(model: torch.nn.Module, config: DecodingConfig) -> None:
    """Refuse a model without a caption decoder, or a length its decoder cannot hold."""
    if not hasattr(model, "text_decoder"):
        raise ValueError(f"{type(model).__name__} has no caption decoder: captions need a CoCa model")
    limit = int(getattr(model.text_decoder, "context_length", 0) or getattr(model, "context_length", 77))
    if config.max_length > limit:
        raise ValueError(
            f"max_length {config.max_length} is longer than the decoder's context ({limit} tokens)"
        )


@torch.no_grad()
def generate(
    model: torch.nn.Module, images: torch.Tensor, config: DecodingConfig, tokens: SpecialTokens
) -> torch.Tensor:
    """Token ids (batch, length) starting with the start token; shorter rows end with end-of-text + pad."""
    check_captioner(model, config)
    if config.method == "beam":
        return _beam_search(model, images, config, tokens)
    return _sample(model, images, config, tokens)


def _next_logits(model, images, ids, latent, embs) -> torch.Tensor:
    out = model(images, ids, image_latent=latent, image_embs=embs, output_labels=False)
    return out["logits"][:, -1]


def _process(ids: torch.Tensor, logits: torch.Tensor, config: DecodingConfig, eot: int) -> torch.Tensor:
    """Bar end-of-text before `min_length`; scale the logits of tokens already in the sequence."""
    if ids.shape[-1] < config.min_length:
        logits = logits.clone()
        logits[:, eot] = -math.inf
    if config.repetition_penalty != 1.0:
        seen = logits.gather(1, ids)
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        logits = logits.scatter(1, ids, seen)
    return logits


def _filter(logits: torch.Tensor, config: DecodingConfig) -> torch.Tensor:
    """Keep the top-k tokens, or the smallest set of most probable tokens holding `top_p` of the mass."""
    if config.method == "top_k":
        kth = logits.topk(min(config.top_k, logits.shape[-1])).values[..., -1:]
        return logits.masked_fill(logits < kth, -math.inf)
    ascending, order = logits.sort(descending=False)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - config.top_p
    drop[..., -1] = False  # the most probable token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), -math.inf)


def _sample(model, images, config: DecodingConfig, tokens: SpecialTokens) -> torch.Tensor:
    """Sampling; a row stops at end-of-text (or pad) and is padded from there."""
    was_training = model.training
    model.eval()
    latent, embs = model._encode_image(images)
    out = torch.full((images.shape[0], 1), tokens.sot, dtype=torch.long, device=images.device)
    while True:
        logits = _next_logits(model, images, out, latent, embs)
        stopped = (out[:, -1] == tokens.eot) | (out[:, -1] == tokens.pad)
        if stopped.all():
            break
        nxt = torch.full((out.shape[0], 1), tokens.pad, dtype=torch.long, device=out.device)
        live = ~stopped
        if out.shape[1] + 1 == config.max_length:
            nxt[live] = tokens.eot
        else:
            scores = _filter(_process(out[live], logits[live], config, tokens.eot), config)
            nxt[live] = torch.multinomial((scores / config.temperature).softmax(dim=-1), 1)
        out = torch.cat([out, nxt], dim=1)
        if out.shape[1] >= config.max_length:
            break
    model.train(was_training)
    return out


class _Finished:
    """The best `size` finished hypotheses of one image in one beam group, scored by sum / length."""

    def __init__(self, size: int):
        self.size, self.items, self.worst = size, [], 1e9

    def add(self, ids: torch.Tensor, total: float, length: int) -> None:
        score = total / length
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, ids))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def closed(self, best_total: float, length: int) -> bool:
        """Full, and no live beam can beat the worst kept one any more."""
        return len(self.items) >= self.size and self.worst >= best_total / length


@dataclass
class _Beams:
    """Live beams of a batch, laid out (image, group, beam in group), and each (image, group)'s finished ones."""

    ids: torch.Tensor
    scores: torch.Tensor
    finished: list[_Finished]
    done: list[bool]
    groups: int
    size: int  # beams per group

    def group_rows(self, group: int, batch: int) -> list[int]:
        width = self.groups * self.size
        return [b * width + group * self.size + i for b in range(batch) for i in range(self.size)]


def _beam_search(model, images, config: DecodingConfig, tokens: SpecialTokens) -> torch.Tensor:
    batch, n = images.shape[0], config.num_beams
    size = n // config.num_beam_groups
    images = images.repeat_interleave(n, dim=0)
    latent, embs = model._encode_image(images)
    scores = torch.full((batch, n), NOT_FINISHED, dtype=torch.float, device=images.device)
    scores[:, ::size] = 0  # one live beam per group at first, so a group's beams do not all pick the same
    beams = _Beams(
        ids=torch.full((batch * n, 1), tokens.sot, dtype=torch.long, device=images.device),
        scores=scores.view(-1),
        finished=[_Finished(size) for _ in range(batch * config.num_beam_groups)],
        done=[False] * (batch * config.num_beam_groups),
        groups=config.num_beam_groups,
        size=size,
    )
    while True:
        logits = _next_logits(model, images, beams.ids, latent, embs)
        step = torch.zeros(batch * n, dtype=torch.long, device=images.device)
        for group in range(config.num_beam_groups):
            rows = beams.group_rows(group, batch)
            step[rows] = _advance_group(beams, group, rows, logits[rows], config, tokens)
        beams.ids = torch.cat([beams.ids, step[:, None]], dim=1)
        if all(beams.done) or beams.ids.shape[1] >= config.max_length:
            break
    return _best(beams, batch, config.max_length, tokens)


def _advance_group(beams: _Beams, group: int, rows: list[int], logits, config, tokens) -> torch.Tensor:
    """One step of one beam group for every image: extend its beams, file those that ended; returns the
    group's new tokens (and reorders its rows of `beams.ids` and `beams.scores`)."""
    ids = beams.ids[rows]
    batch, vocab = len(rows) // beams.size, logits.shape[-1]
    totals = _process(ids, logits, config, tokens.eot) + beams.scores[rows][:, None]
    top, flat = totals.view(batch, beams.size * vocab).topk(2 * beams.size, dim=1)
    source, token = flat // vocab, flat % vocab
    new_scores = torch.zeros(batch, beams.size, dtype=top.dtype, device=top.device)
    new_tokens = torch.zeros(batch, beams.size, dtype=torch.long, device=top.device)
    new_rows = torch.zeros(batch, beams.size, dtype=torch.long, device=top.device)
    for b in range(batch):
        slot = b * beams.groups + group
        if beams.done[slot]:  # its rows keep running (filled with pads) until the whole batch ends
            new_tokens[b] = tokens.pad
            continue
        kept = 0
        for rank in range(2 * beams.size):
            row = b * beams.size + int(source[b, rank])
            if int(token[b, rank]) == tokens.eot:
                if rank < beams.size:  # an ending counts only among the group's best candidates
                    beams.finished[slot].add(ids[row].clone(), float(top[b, rank]), ids.shape[1] + 1)
                continue
            new_scores[b, kept], new_tokens[b, kept], new_rows[b, kept] = top[b, rank], token[b, rank], row
            kept += 1
            if kept == beams.size:
                break
        beams.done[slot] = beams.finished[slot].closed(float(top[b].max()), ids.shape[1] + 1)
    beams.scores[rows] = new_scores.view(-1)
    beams.ids[rows] = ids[new_rows.view(-1)]
    return new_tokens.view(-1)


def _best(beams: _Beams, batch: int, max_length: int, tokens: SpecialTokens) -> torch.Tensor:
    """Each image's best hypothesis over its groups (live beams count as finished at the length limit),
    padded to a common length with one end-of-text after each shorter caption."""
    length = beams.ids.shape[1]
    for slot, finished in enumerate(beams.finished):
        if not beams.done[slot]:
            for row in range(slot * beams.size, (slot + 1) * beams.size):
                finished.add(beams.ids[row], float(beams.scores[row]), length)
    best = []
    for b in range(batch):
        candidates = [h for f in beams.finished[b * beams.groups : (b + 1) * beams.groups] for h in f.items]
        best.append(sorted(candidates, key=lambda h: h[0])[-1][1])  # a tie goes to the later one
    width = min(max(len(ids) for ids in best) + 1, max_length)
    out = torch.full((batch, width), tokens.pad, dtype=torch.long, device=beams.ids.device)
    for b, ids in enumerate(best):
        out[b, : len(ids)] = ids
        if len(ids) < width:
            out[b, len(ids)] = tokens.eot
    return out


def caption_text(ids: torch.Tensor, tokenizer, tokens: SpecialTokens) -> str:
    """A generated row as text: the tokens between start and end of text, pads dropped."""
    row = ids.tolist()[1:]
    if tokens.eot in row:
        row = row[: row.index(tokens.eot)]
    while row and row[-1] == tokens.pad:
        row.pop()
    decode = getattr(tokenizer, "decode", None) or tokenizer.tokenizer.decode
    return decode(row).strip()
