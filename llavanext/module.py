"""The Lightning module: loss on assistant tokens, AdamW with warmup + cosine, the logs users read."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from omegaconf import DictConfig

from llavanext import speed


def cosine_with_warmup(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """NeMo's schedule: linear warmup to `lr`, cosine down to `min_lr` at `total`, flat after."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class LlavaNextModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optim: DictConfig, max_steps: int, warmup_steps: int,
                 loss_chunk: int | None = None):
        super().__init__()
        self.model = model
        self.loss_chunk = loss_chunk
        self.optim = optim
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self._step_started = None
        self._sharded = False

    def configure_model(self):
        """strategy=fsdp shards the model here, once the process group exists (Lightning's FSDP2 hook)."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None and not self._sharded:
            shard(self.model)
            self._sharded = True

    def forward(self, **batch):
        return self.model(**batch)

    def loss(self, batch) -> torch.Tensor:
        """transformers' loss; with `loss_chunk`, through the assistant-only chunked head (same value)."""
        if self.loss_chunk:
            return speed.assistant_loss(self.model, batch, self.loss_chunk)
        return self.model(**batch, **speed.packed_inputs(self.model, batch), use_cache=False).loss

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens", float(tokens), reduce_fx="sum", batch_size=1)
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True, batch_size=1)
        self._step_started = time.perf_counter()
        return loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch, **speed.packed_inputs(self.model, batch), use_cache=False)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_before_optimizer_step(self, optimizer):
        params = [p for p in self.model.parameters() if p.grad is not None]
        if params:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
            self.log("train/grad_norm", norm, batch_size=1)
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True, batch_size=1)

    def fused(self) -> bool:
        """The fused AdamW kernel, where Lightning allows it: on CUDA, and without gradient clipping (a
        fused optimizer unscales gradients itself, so Lightning refuses to clip them under mixed precision)."""
        clipping = self._trainer is not None and bool(self.trainer.gradient_clip_val)
        return bool(self.optim.get("fused", False)) and torch.cuda.is_available() and not clipping

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)  # no decay on norms and biases
        o = self.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=self.fused())
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, warmup=self.warmup_steps, total=self.max_steps,
                                                       lr=o.lr, min_lr=o.min_lr) / o.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
