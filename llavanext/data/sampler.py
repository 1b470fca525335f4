"""A seeded, rank-sharded sampler that can resume in the middle of an epoch.

Each epoch draws one permutation of the dataset from `seed + epoch`; rank `r` of `W` reads
positions `r, r + W, r + 2W, ...` of it, so no sample is read twice in an epoch and every rank
reads the same number (the last `len % W` samples of the permutation are left out). The
position is counted in samples of the permutation consumed by all ranks together, so a run
can resume on another number of ranks and still skip exactly what was trained on.
"""

from __future__ import annotations

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.consumed = 0  # samples of this epoch's permutation already trained on, all ranks together

    def __len__(self) -> int:
        # the whole epoch's share, also when resuming: Lightning counts batches from the restored position
        return self.size // self.world_size

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self):
        order = self.order()[: len(self) * self.world_size]
        mine = order[self.rank :: self.world_size]
        yield from mine[self.consumed // self.world_size :].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start; a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.consumed = state["seed"], state["epoch"], state["consumed"]
