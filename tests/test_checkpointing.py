"""Atomic checkpoint writes and finding the last complete checkpoint of a run folder."""

import os
import time

import pytest
import torch

from llavanext.checkpointing import AtomicCheckpointIO
from llavanext.run import last_checkpoint


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))

    def dies_half_way(checkpoint, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", dies_half_way)
    with pytest.raises(OSError):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.tmp"]


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert last_checkpoint(tmp_path) is None
    now = time.time()
    for age, name in [(30, "checkpoints/step-3.ckpt"), (20, "hpc_ckpt_1.ckpt"), (10, "checkpoints/step-6.ckpt"),
                      (0, "checkpoints/step-9.ckpt.tmp")]:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    (ckpts / "last.ckpt").symlink_to("step-3.ckpt")  # a link points at its target, whatever its own age
    assert last_checkpoint(tmp_path) == ckpts.resolve() / "step-6.ckpt"
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"x")  # written on Slurm's preemption signal, newest
    assert last_checkpoint(tmp_path).name == "hpc_ckpt_2.ckpt"
    sharded = ckpts / "step-12.ckpt"  # a sharded checkpoint is a folder
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"x")
    assert last_checkpoint(tmp_path).name == "step-12.ckpt"
