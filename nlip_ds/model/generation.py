"""Caption generation loops for C_d: greedy, nucleus sampling and beam search with length normalization.

The loops see the decoder only through `step(last_tokens (N, 1)) -> logits (N, V)` (which owns the key/value
cache) and, for beams, `reorder(parent_rows (N,))`, so they can be tested without a model.

Lockstep (`sync_fn`): under ZeRO-3 every decoder call gathers parameters collectively, so all ranks must call
the decoder the same number of times or the run deadlocks. When `sync_fn(local_unfinished) -> any rank
unfinished` is given, a rank whose sequences are all done keeps calling `step` (outputs ignored, no sampling
and no random numbers drawn) until no rank needs another step; `max_tokens` bounds every rank alike. The
returned captions are the ones the rank would have produced alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nlip_ds.choices import STRATEGIES

logger = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor], torch.Tensor]
SyncFn = Callable[[bool], bool]


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode: the one options type of NLIPModel.generate, noise-completion, `nlip-ds caption` and the
    caption evaluation task. The defaults are noise-completion's sampling; evaluation decodes greedily
    (eval.strategy and its siblings in config.py)."""

    strategy: str = "nucleus"
    max_tokens: int = 30          # generated tokens at most, [EOS] included
    min_tokens: int = 5           # [EOS] is forbidden before this many tokens
    top_p: float = 0.9            # nucleus mass
    num_beams: int = 3
    repetition_penalty: float = 1.0  # CTRL's: > 1 discourages tokens already generated
    length_penalty: float = 1.0   # beam score = sum log p / length ** length_penalty

    def validate(self) -> "GenerationOptions":
        checks = [(self.strategy in STRATEGIES, f"strategy {self.strategy!r} is not one of {tuple(STRATEGIES)}"),
                  (self.max_tokens >= 1, f"max_tokens {self.max_tokens} < 1"),
                  (0 <= self.min_tokens, f"min_tokens {self.min_tokens} < 0"),
                  (0 < self.top_p <= 1, f"top_p {self.top_p} not in (0, 1]"),
                  (self.num_beams >= 1, f"num_beams {self.num_beams} < 1"),
                  (self.repetition_penalty > 0, f"repetition_penalty {self.repetition_penalty} <= 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"generate: {message}")
        return self


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    banned: tuple = ()  # never generated (pad, bos, sep)


def repetition_penalty(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL: the logit of every token already in the row is divided by `penalty` if positive, else multiplied."""
    if penalty == 1.0 or generated.shape[1] == 0:
        return logits
    seen = logits.gather(1, generated)  # (N, t)
    return logits.scatter(1, generated, torch.where(seen > 0, seen / penalty, seen * penalty))


def process_logits(logits: torch.Tensor, generated: torch.Tensor, step: int, opts: GenerationOptions,
                   ids: SpecialIds) -> torch.Tensor:
    """A float32 copy of the logits (N, V) with the repetition penalty, banned tokens and minimum length applied."""
    logits = repetition_penalty(logits.float(), generated, opts.repetition_penalty)
    banned = list(ids.banned) + ([ids.eos] if step < opts.min_tokens else [])
    return logits.index_fill(1, torch.tensor(banned, dtype=torch.long, device=logits.device), float("-inf"))


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches `top_p` (always the first); -inf elsewhere."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def choose_next(logits: torch.Tensor, opts: GenerationOptions,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """(N, V) processed logits -> (N,) next tokens; sampling draws on the generator's device."""
    if opts.strategy == "greedy":
        return logits.argmax(-1)
    probs = nucleus_filter(logits, opts.top_p).softmax(-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def _keep_stepping(local_unfinished: bool, step: int, opts: GenerationOptions, sync_fn: Optional[SyncFn]) -> bool:
    """Whether any rank needs step `step + 1`. Every rank stops at max_tokens without asking."""
    if step + 1 >= opts.max_tokens:
        return False
    return sync_fn(local_unfinished) if sync_fn is not None else local_unfinished


def trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing columns that are padding in every row."""
    used = (tokens != pad_id).any(0).nonzero()
    return tokens[:, : int(used.max()) + 1] if used.numel() else tokens[:, :0]


def sample_loop(step: StepFn, batch: int, device: torch.device, opts: GenerationOptions, ids: SpecialIds,
                generator: Optional[torch.Generator] = None, sync_fn: Optional[SyncFn] = None) -> torch.Tensor:
    """Greedy or nucleus decoding -> (B, L) ids after [BOS]: each row ends at its [EOS], then pad_id."""
    last = torch.full((batch, 1), ids.bos, dtype=torch.long, device=device)
    generated = last[:, :0]  # (B, 0)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    active = True
    for t in range(opts.max_tokens):
        logits = step(last)  # (B, V); called on every iteration, also when this rank is done
        if active:
            token = choose_next(process_logits(logits, generated, t, opts, ids), opts, generator)
            token = token.masked_fill(finished, ids.pad)  # (B,)
            generated = torch.cat([generated, token.unsqueeze(1)], dim=1)  # (B, t + 1)
            finished |= token == ids.eos
            last = token.unsqueeze(1)
            active = not bool(finished.all())
        if not _keep_stepping(active, t, opts, sync_fn):
            break
    return generated


def _beam_candidates(logits, generated, finished, scores, lengths, t, opts, ids):
    """Scores of every (beam, token) continuation: raw total log-prob and length-normalized rank, (N, V) each.

    A finished beam continues only with pad at no cost, so it keeps its score and length and competes with
    the live beams on its normalized score until the search ends.
    """
    logp = process_logits(logits, generated, t, opts, ids).log_softmax(-1)  # (N, V)
    frozen = torch.full_like(logp[0], float("-inf"))
    frozen[ids.pad] = 0.0
    logp = torch.where(finished.unsqueeze(1), frozen, logp)
    total = scores.unsqueeze(1) + logp  # (N, V)
    new_lengths = lengths + (~finished).float()  # (N,)
    return total, total / new_lengths.unsqueeze(1) ** opts.length_penalty, new_lengths


def beam_loop(step: StepFn, reorder: Callable[[torch.Tensor], None], batch: int, device: torch.device,
              opts: GenerationOptions, ids: SpecialIds, sync_fn: Optional[SyncFn] = None) -> torch.Tensor:
    """Beam search (N = B * num_beams rows, batch-major); returns each sample's best beam (B, L)."""
    nb = opts.num_beams
    rows = batch * nb
    scores = torch.zeros(batch, nb, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    scores, lengths = scores.view(-1), torch.zeros(rows, device=device)  # (N,), (N,)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    last = torch.full((rows, 1), ids.bos, dtype=torch.long, device=device)
    generated = last[:, :0]  # (N, 0)
    offsets = (torch.arange(batch, device=device) * nb).unsqueeze(1)  # (B, 1)
    active = True
    for t in range(opts.max_tokens):
        logits = step(last)  # (N, V)
        if active:
            total, ranked, new_lengths = _beam_candidates(logits, generated, finished, scores, lengths, t,
                                                          opts, ids)
            vocab = total.shape[1]
            _, index = ranked.view(batch, nb * vocab).topk(nb, dim=1)  # (B, nb)
            parent = (index // vocab + offsets).view(-1)  # (N,) row each new beam extends
            token = (index % vocab).view(-1)  # (N,)
            scores = total.view(batch, -1).gather(1, index).view(-1)
            lengths = new_lengths[parent]
            finished = finished[parent] | (token == ids.eos)
            generated = torch.cat([generated[parent], token.unsqueeze(1)], dim=1)  # (N, t + 1)
            reorder(parent)
            last = token.unsqueeze(1)
            active = not bool(finished.all())
        if not _keep_stepping(active, t, opts, sync_fn):
            break
    final = (scores / lengths.clamp(min=1) ** opts.length_penalty).view(batch, nb)
    best = final.argmax(1) + offsets.squeeze(1)  # (B,) row of each sample's best beam
    return trim_padding(generated[best], ids.pad)
