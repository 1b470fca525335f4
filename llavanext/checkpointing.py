"""Checkpoints a killed run can resume from: atomic writes and the random number generators' state.

A checkpoint is written under a temporary name and renamed when complete, so a run killed
while writing leaves the previous checkpoint as the last complete one (`run.last_checkpoint`
never picks a `.tmp`). Sharded FSDP checkpoints are folders: `strategies.FSDP2` does the same with a folder.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP = ".tmp"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint, written aside and renamed into place."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        tmp = path.with_name(path.name + TMP)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


class RNGState(L.Callback):
    """Python, NumPy and torch generators in the checkpoint, restored before the first resumed step.

    Lightning seeds every rank alike, so rank 0's state is stored and restored on every rank.
    The dataloader draws from its own generator, so setting up data after the restore consumes
    nothing from these.
    """

    def __init__(self):
        self.pending = None

    def state_dict(self):
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # loads weights_only
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict):
        self.pending = state_dict

    def on_train_start(self, trainer, pl_module):
        if self.pending is None:
            return
        state, self.pending = self.pending, None
        random.setstate(state["python"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
