"""Which sample ids a rank owns under noise.state=sharded: id mod world size (docs/noise.md, "Sharded state").

Why modulo rather than id ranges: ids may be hashed or otherwise sparse and their range unknown up front, and
dense ids 0..N-1 then give every rank the dense local index id // world in [0, N / world), so a dense loss bank
keeps its 9 bytes per slot over 1/world of the slots. The partition with world size 1 owns every id: the
replicated state of noise.state=replicated, and of every single-process run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nlip_ds.distributed import get_rank, get_world_size


@dataclass(frozen=True)
class IdPartition:
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"IdPartition: need 0 <= rank < world, got rank {self.rank} of {self.world}")

    @classmethod
    def of_process_group(cls) -> "IdPartition":
        return cls(get_rank(), get_world_size())

    @property
    def replicated(self) -> bool:
        return self.world == 1

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which of the (n,) non-negative ids this rank owns."""
        return ids.remainder(self.world) == self.rank

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Owned global ids -> their dense local index (order-preserving)."""
        return ids.div(self.world, rounding_mode="floor")

    def to_global(self, local: torch.Tensor) -> torch.Tensor:
        return local * self.world + self.rank
