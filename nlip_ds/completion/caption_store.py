"""SyntheticCaptionStore: the latest synthetic caption of every sample, keyed by sample id, shared by all ranks.

Why shared (every rank holds every caption) rather than per rank: the loader assigns shards to ranks anew each
epoch (epoch-seeded shuffle, then split by node), so a sample rarely comes back to the rank that captioned it;
a per-rank store would regenerate almost every caption. Each generating step all-gathers the new rows (one
collective, padded to the per-step budget), and every rank writes the same rows, so the store is identical on
every rank and goes into the checkpoint's shared state like the loss bank.

Storage (CPU): a dict sample id -> slot and, per slot, the caption's token ids (max_tokens int32, padded),
the epoch and step it was generated at. About 4 * max_tokens + 100 bytes per caption (dict overhead
included): 10M captions of 30 tokens hold about 2.2 GB per process, which a paper-scale run with a
replacement rate near 40% would reach. A sorted-array store like the loss bank's compact layout is the
follow-up if that matters.
"""
from __future__ import annotations

import torch


class SyntheticCaptionStore:
    def __init__(self, max_tokens: int, pad_id: int):
        self.max_tokens = max_tokens
        self.pad_id = pad_id
        self._slot: dict[int, int] = {}
        self.tokens = torch.full((0, max_tokens), pad_id, dtype=torch.int32)  # (S, max_tokens)
        self.epoch = torch.empty(0, dtype=torch.int32)  # (S,) epoch each caption was generated in
        self.step = torch.empty(0, dtype=torch.long)  # (S,) micro-step it was generated at

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, sample_id: int) -> bool:
        return int(sample_id) in self._slot

    def fresh(self, sample_ids: list[int], epoch: int, refresh_every: int) -> list[bool]:
        """Whether each id has a caption generated less than `refresh_every` epochs before `epoch`."""
        out = []
        for sid in sample_ids:
            slot = self._slot.get(sid)
            out.append(slot is not None and epoch - int(self.epoch[slot]) < refresh_every)
        return out

    def _reserve(self, size: int) -> None:
        if size <= self.tokens.shape[0]:
            return
        grown = max(size, 2 * self.tokens.shape[0], 64)
        old = self.tokens.shape[0]
        tokens = torch.full((grown, self.max_tokens), self.pad_id, dtype=torch.int32)
        epoch, step = torch.full((grown,), -1, dtype=torch.int32), torch.full((grown,), -1, dtype=torch.long)
        tokens[:old], epoch[:old], step[:old] = self.tokens, self.epoch, self.step
        self.tokens, self.epoch, self.step = tokens, epoch, step

    def put(self, sample_ids: torch.Tensor, tokens: torch.Tensor, epoch: int, step: int) -> None:
        """Store (n,) ids with their (n, L) generated ids (L <= max_tokens; rows after [EOS] padded). Rows with
        a negative id (padding of a gathered batch) are skipped; a repeated id keeps its last row."""
        ids = sample_ids.tolist()
        tokens = tokens.to("cpu", torch.int32)[:, :self.max_tokens]
        for row, sid in enumerate(ids):
            if sid < 0:
                continue
            slot = self._slot.setdefault(sid, len(self._slot))
            self._reserve(slot + 1)
            self.tokens[slot].fill_(self.pad_id)
            self.tokens[slot, :tokens.shape[1]] = tokens[row]
            self.epoch[slot], self.step[slot] = epoch, step

    def get(self, sample_ids: list[int]) -> torch.Tensor:
        """(n, max_tokens) int64 token ids of ids that are in the store (KeyError otherwise)."""
        slots = torch.tensor([self._slot[sid] for sid in sample_ids], dtype=torch.long)
        return self.tokens[slots].long()

    def state_dict(self) -> dict:
        ids = torch.tensor(list(self._slot), dtype=torch.long)
        slots = torch.tensor(list(self._slot.values()), dtype=torch.long)
        return {"max_tokens": self.max_tokens, "ids": ids, "tokens": self.tokens[slots].clone(),
                "epoch": self.epoch[slots].clone(), "step": self.step[slots].clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["max_tokens"] != self.max_tokens:
            raise ValueError(f"caption store: the checkpoint stores captions of {state['max_tokens']} tokens, the "
                             f"run asks for completion.max_tokens={self.max_tokens}; keep the value of the run")
        ids = state["ids"].tolist()
        self._slot = {sid: i for i, sid in enumerate(ids)}
        self.tokens = state["tokens"].to(torch.int32).clone()
        self.epoch = state["epoch"].to(torch.int32).clone()
        self.step = state["step"].long().clone()
