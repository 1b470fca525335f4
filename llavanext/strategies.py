"""`strategy=ddp|fsdp`: Lightning strategies for several devices.

fsdp is FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy,
the way Lightning supports FSDP2: every transformer block is sharded on its own, then the rest
of the model. FSDP2 also runs on CPU with gloo, so the tests exercise the same code as the GPUs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig

from llavanext import speed
from llavanext.checkpointing import TMP, fsync_dir
from llavanext.errors import ConfigError
from llavanext.plan import world_size


def transformer_block(module: torch.nn.Module) -> bool:
    """The unit FSDP shards and gathers at a time: a transformers decoder or encoder layer."""
    return type(module).__name__.endswith(("DecoderLayer", "EncoderLayer"))


def shard_blocks(model: torch.nn.Module, mesh, *, reshard_after_forward: bool, bf16: bool) -> None:
    """FSDP2 over `mesh`: every transformer block sharded on its own, then the rest with `model` as the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if bf16:  # bf16 compute and all-gathers, float32 gradient reduction and master weights
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in [m for m in model.modules() if transformer_block(m)]:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    speed.shard_assistant_loss(model)


def make_strategy(cfg: DictConfig, precision: str):
    s = cfg.strategy
    if s.name == "ddp":
        if world_size(cfg) == 1:
            return "auto"
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=s.find_unused_parameters)
    if s.name == "fsdp":
        if s.state_dict_type not in ("sharded", "full"):
            raise ConfigError(f"strategy.state_dict_type={s.state_dict_type!r}; choose sharded or full")
        return FSDP2(reshard_after_forward=s.reshard_after_forward, bf16=precision.startswith("bf16"),
                     data_parallel_size=world_size(cfg), tensor_parallel_size=1,
                     save_distributed_checkpoint=s.state_dict_type == "sharded")
    raise ConfigError(f"strategy={s.name!r}; choose ddp or fsdp")


class FSDP2(ModelParallelStrategy):
    """Shards the model in `LightningModule.configure_model` and writes sharded checkpoints atomically:
    the folder appears under its name only once every rank has written its shard."""

    def __init__(self, *, reshard_after_forward: bool, bf16: bool, **kwargs):
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.bf16 = bf16

    def shard(self, model: torch.nn.Module) -> None:
        shard_blocks(model, self.device_mesh["data_parallel"], reshard_after_forward=self.reshard_after_forward,
                     bf16=self.bf16)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + TMP)
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while writing
        self.barrier("checkpoint_tmp_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("checkpoint_written")
        if self.global_rank == 0:
            old = path.with_name(path.name + ".old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier("checkpoint_renamed")
