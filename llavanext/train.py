"""The train task, shared by `pretrain` and `finetune`: config in, checkpoints and logs out."""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, open_dict
from rich.console import Console

from llavanext import model as modeling
from llavanext import plan as planning
from llavanext import speed
from llavanext.assemble import assemble
from llavanext.checkpointing import AtomicCheckpointIO, RNGState
from llavanext.data.datamodule import DataModule
from llavanext.errors import ConfigError
from llavanext.module import LlavaNextModule
from llavanext.run import CHECKPOINTS, is_checkpoint, last_checkpoint, output_dir, write_run_files
from llavanext.strategies import make_strategy

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
        if trainer.is_global_zero and self.every and (step % self.every == 0 or step == trainer.max_steps):
            self.printed = step
            metrics = trainer.callback_metrics
            parts = [f"step {step:>5}/{trainer.max_steps}", f"loss {float(metrics['train/loss']):.4f}"]
            if "train/lr" in metrics:
                parts.append(f"lr {float(metrics['train/lr']):.2e}")
            if "train/tokens_per_s" in metrics:
                parts.append(f"{float(metrics['train/tokens_per_s']):,.0f} tok/s")
            if torch.cuda.is_available():
                parts.append(f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            parts.append(f"{time.perf_counter() - self.started:.0f}s")
            console.print("  ".join(parts), highlight=False)


def precision(name: str) -> str:
    if name == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return name


def check_precision(cfg: DictConfig) -> None:
    """LoRA under autocast (model.lora_autocast) needs autocast when the base weights are 16-bit:
    without it the fp32 adapters meet bf16 activations deep inside the first layer."""
    mixed = precision(cfg.trainer.precision).endswith("-mixed")
    sixteen_bit = cfg.model.get("dtype", "float32") not in ("float32", "fp32", "auto")
    if cfg.peft.method == "lora" and cfg.model.get("lora_autocast", False) and sixteen_bit and not mixed:
        raise ConfigError(f"peft=lora with model.dtype={cfg.model.dtype} needs autocast: set "
                          "trainer.precision=bf16-mixed (or model.lora_autocast=false, or model.dtype=float32)")


def warmup_steps(cfg: DictConfig) -> int:
    warmup = planning.warmup_steps(cfg)
    if warmup != cfg.optim.warmup_steps:
        log.warning("optim.warmup_steps=%d is not shorter than trainer.max_steps=%d: warming up for %d",
                    cfg.optim.warmup_steps, cfg.trainer.max_steps, warmup)
    return warmup


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    resume = cfg.get("resume")
    if not resume:
        return None
    if resume == "auto":
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        found = last_checkpoint(run_dir)
        if rank_zero_only.rank == 0:
            console.print(f"resume=auto: continuing from {found}" if found else
                          f"resume=auto: no checkpoint in {run_dir}, starting from step 0", soft_wrap=True)
        return str(found) if found else None
    if not is_checkpoint(Path(resume)):
        raise ConfigError(f"resume={resume!r}: no such checkpoint (use resume=auto or a .ckpt path)")
    return resume


def run(cfg: DictConfig) -> Path:
    """Where the run happens: here (`direct`, or a process a launcher started), or through a launcher."""
    quiet_lightning()
    ex = cfg.executor
    if ex.name != "direct" and not ex.launched:
        from llavanext.executors import launch

        return launch(cfg)
    if ex.name == "direct" and planning.world_size(cfg) > 1:
        raise ConfigError(f"executor=direct runs one process; for {planning.world_size(cfg)} devices use "
                          "executor=local (torchrun on this node) or executor=slurm")
    if ex.dry_run:
        print_plan(cfg, with_config=True)
        return output_dir(cfg)
    return train(cfg)


def print_plan(cfg: DictConfig, rows=None, with_config: bool = False) -> planning.Plan:
    from omegaconf import OmegaConf

    plan = planning.make_plan(cfg, rows)
    if with_config:
        console.print(OmegaConf.to_yaml(cfg, resolve=True), highlight=False, markup=False)
    console.print(planning.render(plan))
    return plan


def train(cfg: DictConfig) -> Path:
    check_precision(cfg)
    run_dir = output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = make_trainer(cfg, run_dir)
    zero = trainer.is_global_zero
    resolve_checkpointing(cfg, trainer.strategy.root_device, zero)
    if zero:
        write_run_files(run_dir, cfg)
        console.print(f"[bold]{cfg.command}[/] model={cfg.model.name} data={cfg.data.name} peft={cfg.peft.method}"
                      f"  run folder: {run_dir}")

    with model_device(trainer):
        built = assemble(cfg, tokenizer_needed=cfg.data.source != "mock")
    rows = modeling.part_table(built.model, cfg.parts)
    modeling.check_trainable(rows)
    if zero:
        print_plan(cfg, rows)

    data = DataModule(cfg.data, cfg.model, built.tokenizer, cfg.template, built.image_token_id, built.vocab_size,
                      seed=cfg.seed)
    module = LlavaNextModule(built.model, cfg.optim, cfg.trainer.max_steps, warmup_steps(cfg),
                             loss_chunk=speed.loss_chunk(cfg.model))
    trainer.fit(module, datamodule=data, ckpt_path=resume_path(cfg, run_dir))
    if zero:
        console.print(f"done: {trainer.global_step} steps, checkpoints in {run_dir / CHECKPOINTS}")
    return run_dir


def resolve_checkpointing(cfg: DictConfig, device: torch.device, verbose: bool) -> None:
    """model.gradient_checkpointing=auto becomes a layer count for this device, before anything is built
    (the run folder's config.yaml records the count)."""
    if cfg.model.get("gradient_checkpointing") != "auto":
        return
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    layers = planning.resolve_checkpointing(cfg, total)
    with open_dict(cfg):
        cfg.model.gradient_checkpointing = layers
    if verbose and total:
        console.print(f"activation checkpointing (auto): {layers} of {cfg.model.text.num_hidden_layers} decoder "
                      f"layers, for the plan's estimate to fit 85% of {total / planning.GiB:.0f} GiB on {device}",
                      highlight=False)
    elif verbose:
        console.print(f"activation checkpointing (auto): none on {device} (no GPU memory to fit)", highlight=False)


def model_device(trainer: L.Trainer):
    """Build the weights straight on this rank's GPU (a 7B in float32 is 28 GB of host memory per rank)."""
    device = trainer.strategy.root_device
    return torch.device(device) if device.type == "cuda" else nullcontext()


def make_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    t = cfg.trainer
    callbacks = [LossPrinter(t.print_every), RNGState()]
    if t.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="step-{step}", save_last=True,
                                         every_n_train_steps=t.checkpoint_every, save_top_k=-1,
                                         auto_insert_metric_name=False))
    if t.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    metrics = run_dir / "logs" / "metrics.csv"
    if metrics.exists() and rank_zero_only.rank == 0:
        # a resumed run: Lightning's CSVLogger would delete the earlier part of the curve
        metrics.rename(metrics.with_name(f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.csv"))
    loggers = [TensorBoardLogger(run_dir, name="logs", version=""), CSVLogger(run_dir, name="logs", version="")]
    has_val = cfg.data.source != "mock" and t.val_check_interval
    return L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=cfg.executor.devices,
        num_nodes=cfg.executor.nodes,
        strategy=make_strategy(cfg, precision(t.precision)),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the datamodule's ResumableSampler shards by rank itself
        precision=precision(t.precision),
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=planning.gradient_accumulation(cfg, planning.world_size(cfg)),
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=min(t.val_check_interval, t.max_steps) if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if has_val else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar == "rich",
        enable_model_summary=False,
        callbacks=callbacks,
        enable_checkpointing=bool(t.checkpoint_every),
        logger=loggers,
        default_root_dir=run_dir,
        deterministic=t.deterministic,
    )
