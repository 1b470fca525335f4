"""The train task, shared by `pretrain` and `finetune`: config in, checkpoints and logs out."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from rich.console import Console

from llavanext import model as modeling
from llavanext import speed
from llavanext.assemble import assemble
from llavanext.data.datamodule import DataModule
from llavanext.errors import ConfigError
from llavanext.module import LlavaNextModule
from llavanext.run import CHECKPOINTS, last_checkpoint, output_dir, write_run_files

log = logging.getLogger(__name__)
console = Console(stderr=False)


def quiet_lightning() -> None:
    """Lightning's start-up chatter hides the lines users need; its warnings stay."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class LossPrinter(L.Callback):
    """One plain line every `every` steps, so the loss can be read in any log (CI, Slurm, a pipe)."""

    def __init__(self, every: int):
        self.every = every
        self.started = time.perf_counter()
        self.printed = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.printed:  # gradient accumulation: several batches end on one step
            return
        if self.every and (step % self.every == 0 or step == trainer.max_steps):
            self.printed = step
            metrics = trainer.callback_metrics
            parts = [f"step {step:>5}/{trainer.max_steps}", f"loss {float(metrics['train/loss']):.4f}"]
            if "train/lr" in metrics:
                parts.append(f"lr {float(metrics['train/lr']):.2e}")
            if "train/tokens_per_s" in metrics:
                parts.append(f"{float(metrics['train/tokens_per_s']):,.0f} tok/s")
            parts.append(f"{time.perf_counter() - self.started:.0f}s")
            console.print("  ".join(parts), highlight=False)


def precision(name: str) -> str:
    if name == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return name


def warmup_steps(cfg: DictConfig) -> int:
    """The recipe's warmup, shortened to a tenth of the run when the run is shorter than it."""
    steps, warmup = cfg.trainer.max_steps, cfg.optim.warmup_steps
    if warmup >= steps:
        short = max(1, steps // 10)
        log.warning("optim.warmup_steps=%d is not shorter than trainer.max_steps=%d: warming up for %d",
                    warmup, steps, short)
        return short
    return warmup


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    resume = cfg.get("resume")
    if not resume:
        return None
    if resume == "auto":
        found = last_checkpoint(run_dir)
        if found is None:
            console.print(f"resume=auto: no checkpoint in {run_dir}, starting from step 0")
            return None
        console.print(f"resume=auto: continuing from {found}")
        return str(found)
    if not Path(resume).is_file():
        raise ConfigError(f"resume={resume!r}: no such checkpoint file (use resume=auto or a .ckpt path)")
    return resume


def gradient_accumulation(cfg: DictConfig, world_size: int) -> int:
    micro, global_batch = cfg.data.micro_batch_size, cfg.data.get("global_batch_size")
    if not global_batch:
        return 1
    per_step = micro * world_size
    if global_batch % per_step:
        raise ConfigError(f"data.global_batch_size={global_batch} is not a multiple of micro_batch_size x world "
                          f"size = {micro} x {world_size} = {per_step}")
    return global_batch // per_step


def run(cfg: DictConfig) -> Path:
    quiet_lightning()
    run_dir = output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    write_run_files(run_dir, cfg)
    console.print(f"[bold]{cfg.command}[/] model={cfg.model.name} data={cfg.data.name} peft={cfg.peft.method}"
                  f"  run folder: {run_dir}")

    built = assemble(cfg, tokenizer_needed=cfg.data.source != "mock")
    rows = modeling.part_table(built.model, cfg.parts)
    console.print(modeling.render_part_table(rows))
    modeling.check_trainable(rows)

    data = DataModule(cfg.data, cfg.model, built.tokenizer, cfg.template, built.image_token_id, built.vocab_size)
    module = LlavaNextModule(built.model, cfg.optim, cfg.trainer.max_steps, warmup_steps(cfg),
                             loss_chunk=speed.loss_chunk(cfg.model))
    trainer = make_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=data, ckpt_path=resume_path(cfg, run_dir))
    console.print(f"done: {trainer.global_step} steps, checkpoints in {run_dir / CHECKPOINTS}")
    return run_dir


def make_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.trainer
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="step-{step}", save_last=True,
                        every_n_train_steps=t.checkpoint_every, save_top_k=-1, auto_insert_metric_name=False),
        LossPrinter(t.print_every),
    ]
    if t.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    loggers = [TensorBoardLogger(run_dir, name="logs", version=""), CSVLogger(run_dir, name="logs", version="")]
    has_val = cfg.data.source != "mock" and t.val_check_interval
    return L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        precision=precision(t.precision),
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=gradient_accumulation(cfg, 1),
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=min(t.val_check_interval, t.max_steps) if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if has_val else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar == "rich",
        enable_model_summary=False,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        deterministic=t.deterministic,
    )
