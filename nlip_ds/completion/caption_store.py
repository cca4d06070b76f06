"""SyntheticCaptionStore: the latest synthetic caption of every sample, keyed by sample id, shared by all ranks.

Why shared (every rank holds every caption) rather than per rank: the loader assigns shards to ranks anew each
epoch (epoch-seeded shuffle, then split by node), so a sample rarely comes back to the rank that captioned it;
a per-rank store would regenerate almost every caption. Each generating step all-gathers the new rows (one
collective, padded to the per-step budget), and every rank writes the same rows, so the store is identical on
every rank and goes into the checkpoint's shared state like the loss bank.

Storage (CPU): a dict sample id -> slot and, per slot, the caption's token ids (max_tokens int32, padded),
the epoch and step it was generated at and whether the caption filter kept it (completion.filter: a caption
the filter turned down stays in the store, so that the pair is not captioned again before its refresh, but
is never trained on). About 4 * max_tokens + 100 bytes per caption (dict overhead
included): 10M captions of 30 tokens hold about 2.2 GB per process, which a paper-scale run with a
replacement rate near 40% would reach.

Sharded (noise.state=sharded, docs/noise.md "Sharded state"): every rank keeps, from the same all-gather, only
the captions of the ids it owns (id mod world size, noise/partition.py), so its share falls as 1/world. A rank
then reads the captions of its batch with `lookup`, one exchange per call: the step's ids are all-gathered, each
owner fills the rows of its ids (presence, epoch, tokens; zeros elsewhere) and one all-reduce sums them, so
every row comes exactly from its owner. Its checkpoint state is the rank's own slice; `load_shards` re-partitions
slices saved at another world size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nlip_ds.distributed import all_gather_tensor, all_reduce_sum
from nlip_ds.noise.partition import IdPartition


class Captions(NamedTuple):
    """What the store holds for (n,) ids, on the CPU."""

    present: torch.Tensor  # (n,) bool
    epoch: torch.Tensor  # (n,) int64: the epoch each caption was generated in (0 where absent)
    tokens: torch.Tensor  # (n, max_tokens) int64
    kept: torch.Tensor  # (n,) bool: present and kept by the caption filter

    def fresh(self, epoch: int, refresh_every: int) -> list[bool]:
        """SyntheticCaptionStore.fresh of the looked-up ids."""
        return (self.present & (epoch - self.epoch < refresh_every)).tolist()


class SyntheticCaptionStore:
    def __init__(self, max_tokens: int, pad_id: int, partition: IdPartition | None = None):
        self.max_tokens = max_tokens
        self.pad_id = pad_id
        self.partition = partition or IdPartition()  # the default keeps every id
        self._slot: dict[int, int] = {}
        self.tokens = torch.full((0, max_tokens), pad_id, dtype=torch.int32)  # (S, max_tokens)
        self.epoch = torch.empty(0, dtype=torch.int32)  # (S,) epoch each caption was generated in
        self.step = torch.empty(0, dtype=torch.long)  # (S,) micro-step it was generated at
        self.kept = torch.empty(0, dtype=torch.bool)  # (S,) whether the caption filter kept it

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
        kept = torch.zeros(grown, dtype=torch.bool)
        tokens[:old], epoch[:old], step[:old], kept[:old] = self.tokens, self.epoch, self.step, self.kept
        self.tokens, self.epoch, self.step, self.kept = tokens, epoch, step, kept

    def put(self, sample_ids: torch.Tensor, tokens: torch.Tensor, epoch: int, step: int,
            kept: torch.Tensor | None = None) -> None:
        """Store (n,) ids with their (n, L) generated ids (L <= max_tokens; rows after [EOS] padded) and (n,)
        `kept` (the caption filter's verdict; all kept when None). Rows with a negative id (padding of a gathered
        batch) and, when sharded, ids of other ranks are skipped; a repeated id keeps its last row."""
        ids = sample_ids.tolist()
        tokens = tokens.to("cpu", torch.int32)[:, :self.max_tokens]
        kept = [True] * len(ids) if kept is None else kept.bool().tolist()
        rank, world = self.partition.rank, self.partition.world
        for row, sid in enumerate(ids):
            if sid < 0 or sid % world != rank:
                continue
            slot = self._slot.setdefault(sid, len(self._slot))
            self._reserve(slot + 1)
            self.tokens[slot].fill_(self.pad_id)
            self.tokens[slot, :tokens.shape[1]] = tokens[row]
            self.epoch[slot], self.step[slot], self.kept[slot] = epoch, step, kept[row]

    def get(self, sample_ids: list[int]) -> torch.Tensor:
        """(n, max_tokens) int64 token ids of ids that are in the store (KeyError otherwise)."""
        slots = torch.tensor([self._slot[sid] for sid in sample_ids], dtype=torch.long)
        return self.tokens[slots].long()

    def lookup(self, sample_ids: torch.Tensor) -> Captions:
        """(n,) ids -> their captions. Sharded: collective on every rank (same n everywhere), on the ids' device."""
        if self.partition.replicated:
            return self._owned_rows(sample_ids.cpu())
        n, rank = sample_ids.numel(), self.partition.rank
        everyone = all_gather_tensor(sample_ids.long())  # (world * n,)
        rows = self._owned_rows(everyone.cpu())
        packed = torch.cat([rows.present.long()[:, None], rows.kept.long()[:, None], rows.epoch[:, None],
                            rows.tokens], dim=1)
        total = all_reduce_sum(packed.to(sample_ids.device)).cpu()[rank * n:(rank + 1) * n]  # one owner per row
        return Captions(total[:, 0] > 0, total[:, 2], total[:, 3:], total[:, 1] > 0)

    def _owned_rows(self, ids: torch.Tensor) -> Captions:
        """Rows of the ids this store holds; zeros elsewhere."""
        slots = torch.tensor([self._slot.get(sid, -1) for sid in ids.tolist()], dtype=torch.long)
        present = slots >= 0
        tokens = torch.zeros((ids.numel(), self.max_tokens), dtype=torch.long)
        epoch = torch.zeros(ids.numel(), dtype=torch.long)
        tokens[present], epoch[present] = self.tokens[slots[present]].long(), self.epoch[slots[present]].long()
        kept = torch.zeros(ids.numel(), dtype=torch.bool)
        kept[present] = self.kept[slots[present]]
        return Captions(present, epoch, tokens, kept)

    def state_dict(self) -> dict:
        ids = torch.tensor(list(self._slot), dtype=torch.long)
        slots = torch.tensor(list(self._slot.values()), dtype=torch.long)
        return {"max_tokens": self.max_tokens, "ids": ids, "tokens": self.tokens[slots].clone(),
                "epoch": self.epoch[slots].clone(), "step": self.step[slots].clone(), "kept": self.kept[slots].clone()}

    def load_state_dict(self, state: dict) -> None:
        self.load_shards([state])

    def load_shards(self, states: list[dict]) -> None:
        """Restore from the state of one store or the slices of a sharded one (any world size): the ids this
        store owns."""
        for state in states:
            if state["max_tokens"] != self.max_tokens:
                raise ValueError(f"caption store: the checkpoint stores captions of {state['max_tokens']} tokens, "
                                 f"the run asks for completion.max_tokens={self.max_tokens}; keep the value of the run")
        # A checkpoint from before the caption filter trained on every stored caption: all kept.
        states = [s if "kept" in s else {**s, "kept": torch.ones(len(s["ids"]), dtype=torch.bool)} for s in states]
        keep = [self.partition.owns(s["ids"].long()) for s in states]
        ids, tokens, epoch, step, kept = (torch.cat([s[k][m] for s, m in zip(states, keep)])
                                          for k in ("ids", "tokens", "epoch", "step", "kept"))
        self._slot = {sid: i for i, sid in enumerate(ids.tolist())}
        self.tokens = tokens.to(torch.int32).clone()
        self.epoch = epoch.to(torch.int32).clone()
        self.step = step.long().clone()
        self.kept = kept.bool().clone()
