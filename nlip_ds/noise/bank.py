"""Cluster-wide bank of the latest per-sample loss: the input of the noise estimator.

Why it exists: ε must come from the losses of every sample of the epoch, not only those one rank saw, and every
rank must fit the same mixture. So each training step all-gathers (sample id, loss, ground-truth flag) from
every rank (one collective: a packed float64 (n, 3) tensor; ids below 2^53 are exact in float64) and every rank
writes the same rows into its own bank. `losses_since(epoch)` then returns the samples of the last epoch ordered
by id, which makes the fit input identical on every rank and for every world size.

Storage (CPU; losses float32, flags int8 with -1 = unknown, epoch of the last update int32 with -1 = never):

- dense: three arrays indexed by sample id, grown by doubling; 9 bytes per id slot in [0, max id].
- compact: the same arrays plus a sorted int64 id array, 17 bytes per stored sample. New rows go to an
  append-only log (also 17 bytes per row) that is merged by one stable sort once it reaches a quarter of the
  store (amortized O(log n) per row) and before every read.

layout="auto" starts dense and switches to compact, once and identically on every rank, when the ids stop
filling at least a quarter of [0, max id] (hashed or otherwise sparse ids).

Host syncs: none beyond the all-gather. On CUDA the gathered rows are copied to pinned host memory without
blocking and written into the bank once their copy event has completed (checked without waiting at the next
update; every read waits for all of them). Other devices copy synchronously; on the CPU (gloo) there is nothing
to wait for.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import torch

from nlip_ds.distributed import all_gather_tensor
from nlip_ds.noise.partition import IdPartition

logger = logging.getLogger(__name__)

UNKNOWN = -1  # ground-truth flag of a sample without ground truth (and id of a padding row)
MAX_EXACT_ID = 2 ** 53  # float64 represents every integer below this exactly
_DENSE_MIN_SLOTS = 1 << 20  # a dense bank this small (9 MiB) is never worth converting
_MIN_DENSITY = 4  # dense while max id + 1 <= _MIN_DENSITY * stored ids
_MERGE_MIN_ROWS = 1 << 16

Entries = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # ids, losses, flags, epochs


def _last_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Indices of the last row of each distinct id (latest wins), in ascending id order."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    last = torch.ones_like(sorted_ids, dtype=torch.bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    return order[last]


def _empty_entries(n: int = 0) -> Entries:
    return (torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.float32),
            torch.empty(n, dtype=torch.int8), torch.empty(n, dtype=torch.int32))


class _DenseStore:
    """Arrays indexed by sample id."""

    layout = "dense"

    def __init__(self, capacity: int = 0):
        _, self.loss, self.flag, self.epoch = _empty_entries(capacity)
        self.epoch.fill_(-1)
        self.count = 0

    def _reserve(self, size: int) -> None:
        if size <= self.loss.numel():
            return
        grown = _DenseStore(max(size, 2 * self.loss.numel()))
        old = self.loss.numel()
        grown.loss[:old], grown.flag[:old], grown.epoch[:old] = self.loss, self.flag, self.epoch
        self.loss, self.flag, self.epoch = grown.loss, grown.flag, grown.epoch

    def write(self, ids: torch.Tensor, losses: torch.Tensor, flags: torch.Tensor, epoch: int) -> None:
        """Rows with distinct ids, ascending."""
        self._reserve(int(ids[-1]) + 1)
        self.count += int((self.epoch[ids] < 0).sum())
        self.loss[ids], self.flag[ids], self.epoch[ids] = losses, flags, epoch

    def entries(self) -> Entries:
        return self.select(0)  # never-written slots hold epoch -1

    def select(self, min_epoch: int) -> Entries:
        ids = (self.epoch >= min_epoch).nonzero().squeeze(1)  # (k,) ascending
        return ids, self.loss[ids], self.flag[ids], self.epoch[ids]

    def __len__(self) -> int:
        return self.count

    def nbytes(self) -> int:
        return 9 * self.loss.numel()


class _CompactStore:
    """Sorted ids with aligned values, plus an append-only log of newer rows."""

    layout = "compact"

    def __init__(self, entries: Entries | None = None):
        self.main = _empty_entries() if entries is None else entries
        self.log: list[Entries] = []
        self.log_rows = 0

    def write(self, ids: torch.Tensor, losses: torch.Tensor, flags: torch.Tensor, epoch: int) -> None:
        self.log.append((ids, losses, flags, torch.full_like(ids, epoch, dtype=torch.int32)))
        self.log_rows += ids.numel()
        if self.log_rows >= max(self.main[0].numel() // 4, _MERGE_MIN_ROWS):
            self.merge()

    def merge(self) -> None:
        """Fold the log into the sorted arrays; the newest row of each id wins (log rows are newer)."""
        if not self.log:
            return
        parts = [self.main, *self.log]
        rows = tuple(torch.cat([p[i] for p in parts]) for i in range(4))
        keep = _last_occurrence(rows[0])  # stable sort: later rows win ties
        self.main = tuple(r[keep] for r in rows)
        self.log, self.log_rows = [], 0

    def entries(self) -> Entries:
        self.merge()
        return self.main

    def select(self, min_epoch: int) -> Entries:
        self.merge()
        mask = self.main[3] >= min_epoch
        return tuple(r[mask] for r in self.main)

    def __len__(self) -> int:
        self.merge()
        return self.main[0].numel()

    def nbytes(self) -> int:
        return 17 * self.main[0].numel() + 17 * self.log_rows


@dataclass
class _Inflight:
    """Gathered rows on their way to pinned host memory."""

    rows: torch.Tensor  # (m, 3) float64, pinned
    event: torch.cuda.Event
    epoch: int


def _pack(sample_ids: torch.Tensor, losses: torch.Tensor, flags: torch.Tensor | None,
          pad_to: int | None) -> torch.Tensor:
    """(n,) ids, losses, flags -> (pad_to or n, 3) float64 on the losses' device; padding rows have id -1."""
    n = losses.shape[0] if losses.dim() == 1 else -1
    if n < 0 or tuple(sample_ids.shape) != (n,) or (flags is not None and tuple(flags.shape) != (n,)):
        raise ValueError(f"LossBank.update: sample_ids, losses and flags must all be (n,), got "
                         f"{tuple(sample_ids.shape)}, {tuple(losses.shape)}, "
                         f"{None if flags is None else tuple(flags.shape)}")
    if pad_to is not None and n > pad_to:
        raise ValueError(f"LossBank.update: {n} rows exceed pad_to={pad_to}")
    rows = torch.full((pad_to or n, 3), float(UNKNOWN), dtype=torch.float64, device=losses.device)
    rows[:n, 0] = sample_ids.to(losses.device, non_blocking=True)
    rows[:n, 1] = losses.detach()
    if flags is not None:
        rows[:n, 2] = flags.to(losses.device, non_blocking=True)
    return rows


def _check_ids(ids: torch.Tensor) -> None:
    """Gathered float64 ids (padding removed) must be integers in [0, 2^53)."""
    lo, hi = (float(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= MAX_EXACT_ID or bool((ids != ids.floor()).any()):
        raise ValueError(f"LossBank: sample ids must be integers in [0, 2^53) (-1 marks padding); "
                         f"got values in [{lo}, {hi}]")


class LossBank:
    """Latest loss (and ground-truth flag) per sample id, for every sample seen by any rank.

    Sample ids are integers in [0, 2^53); -1 is reserved for padding rows and ignored.

    Args:
        capacity: expected number of distinct ids (dense ids 0..capacity-1); the dense arrays start this big.
        layout: "auto" (dense, compact once ids turn sparse), "dense" or "compact".
        pad_to: pad every rank's rows to this many before the all-gather, so ranks whose last batch is short
            still pass equal shapes; without it every rank must pass the same n at every step.
        partition: keep only the ids this rank owns (noise.state=sharded), stored under their local index
            (partition.py); the default owns every id. The all-gather is the same either way.
    """

    def __init__(self, capacity: int = 0, *, layout: str = "auto", pad_to: int | None = None,
                 partition: IdPartition | None = None):
        if layout not in ("auto", "dense", "compact"):
            raise ValueError(f"LossBank: layout must be 'auto', 'dense' or 'compact', got {layout!r}")
        self.capacity, self.requested_layout, self.pad_to = capacity, layout, pad_to
        self.partition = partition or IdPartition()
        self._store = _CompactStore() if layout == "compact" else _DenseStore(capacity)
        self._inflight: collections.deque[_Inflight] = collections.deque()
        self.epoch = 0

    @property
    def layout(self) -> str:
        return self._store.layout

    def set_epoch(self, epoch: int) -> None:
        """Stamp later updates with `epoch` (any non-decreasing round counter >= 0, e.g. the refit index for
        streaming data)."""
        if epoch < 0:
            raise ValueError(f"LossBank.set_epoch: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def update(self, sample_ids: torch.Tensor, losses: torch.Tensor, flags: torch.Tensor | None = None) -> None:
        """Add this rank's (n,) rows and every other rank's: one all-gather, collective on every rank."""
        gathered = all_gather_tensor(_pack(sample_ids, losses, flags, self.pad_to))  # (world * n, 3)
        if gathered.device.type != "cuda":
            self._ingest(gathered.cpu(), self.epoch)
            return
        host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        host.copy_(gathered, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._inflight.append(_Inflight(host, event, self.epoch))
        self._drain(block=False)

    def flush(self) -> None:
        """Wait for rows still being copied from the accelerator and write them."""
        self._drain(block=True)

    def _drain(self, block: bool) -> None:
        while self._inflight and (block or self._inflight[0].event.query()):
            item = self._inflight.popleft()
            item.event.synchronize()
            self._ingest(item.rows, item.epoch)

    def _ingest(self, rows: torch.Tensor, epoch: int) -> None:
        """Write gathered (m, 3) float64 CPU rows; a later row of the same id wins."""
        rows = rows[rows[:, 0] != UNKNOWN]  # drop padding
        if rows.shape[0] == 0:
            return
        _check_ids(rows[:, 0])
        ids = rows[:, 0].long()
        if not self.partition.replicated:
            mine = self.partition.owns(ids)
            rows, ids = rows[mine], self.partition.local(ids[mine])
            if ids.numel() == 0:
                return
        keep = _last_occurrence(ids)  # (k,) ascending ids
        ids = ids[keep]
        self._fit_layout(ids)
        self._store.write(ids, rows[keep, 1].float(), rows[keep, 2].to(torch.int8), epoch)

    def _fit_layout(self, ids: torch.Tensor) -> None:
        """Switch an auto bank to compact when ids (ascending) would leave the dense arrays mostly empty."""
        if self.requested_layout != "auto" or self.layout != "dense":
            return
        slots = int(ids[-1]) + 1
        if slots <= max(self._store.loss.numel(), _DENSE_MIN_SLOTS, _MIN_DENSITY * (len(self) + ids.numel())):
            return
        logger.info("LossBank: sample ids up to %d for about %d samples; switching to the compact layout",
                    slots - 1, len(self) + ids.numel())
        self._store = _CompactStore(self._store.entries())

    def losses_since(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids int64, losses float32, flags int8), each (k,), of samples last updated at `epoch` or later,
        in ascending id order."""
        self.flush()
        ids, losses, flags, _ = self._store.select(int(epoch))
        return self.partition.to_global(ids), losses, flags

    def __len__(self) -> int:
        """Number of distinct sample ids stored (rows still in flight not counted; call flush() first)."""
        return len(self._store)

    def nbytes(self) -> int:
        """Bytes held by the storage arrays."""
        return self._store.nbytes()

    def state_dict(self) -> dict:
        """Stored samples in ascending (global) id order, as plain tensors (torch.load(weights_only=True) loads
        it); a sharded bank's holds its own ids only."""
        self.flush()
        ids, losses, flags, epochs = self._store.entries()
        return {"ids": self.partition.to_global(ids), "losses": losses.clone(), "flags": flags.clone(),
                "epochs": epochs.clone(), "epoch": self.epoch, "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        self.load_shards([state])

    def load_shards(self, states: list[dict]) -> None:
        """Restore from the state dicts of one bank or of the shards of a sharded one (saved at any world size):
        the ids this bank owns, which re-partitions a sharded state for another world size."""
        self.flush()
        parts = [self._owned(s) for s in states]
        entries = tuple(torch.cat(column) for column in zip(*parts))
        if len(parts) > 1:
            order = torch.argsort(entries[0])  # ids are distinct across shards
            entries = tuple(column[order] for column in entries)
        state = states[0]
        layout = state["layout"] if self.requested_layout == "auto" else self.requested_layout
        self._store = _CompactStore(entries) if layout == "compact" else self._dense_from(entries)
        self.epoch = int(state["epoch"])

    def _owned(self, state: dict) -> Entries:
        """A state dict's entries of the ids this bank owns, under their local index."""
        ids = state["ids"].long()
        entries = (ids, state["losses"].float(), state["flags"].to(torch.int8), state["epochs"].to(torch.int32))
        if self.partition.replicated:
            return entries
        mine = self.partition.owns(ids)
        return (self.partition.local(ids[mine]), *(column[mine] for column in entries[1:]))

    def _dense_from(self, entries: Entries) -> _DenseStore:
        ids, losses, flags, epochs = entries
        store = _DenseStore(max(self.capacity, int(ids[-1]) + 1 if ids.numel() else 0))
        store.loss[ids], store.flag[ids], store.epoch[ids] = losses, flags, epochs
        store.count = ids.numel()
        return store
