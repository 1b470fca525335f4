"""The plan (batch split, what trains, memory estimate), dry runs of every executor, and config errors."""

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

from llavanext import model as modeling
from llavanext import plan as planning
from llavanext.errors import ConfigError


def cfg_of(*overrides, command="finetune"):
    with initialize_config_module(config_module="llavanext.conf", version_base="1.3"):
        return compose(config_name=command, overrides=list(overrides))


def cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "llavanext", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)


def test_accumulation_is_derived_from_the_global_batch():
    cfg = cfg_of("executor=slurm", "executor.nodes=2", "executor.devices=4", "data.micro_batch_size=2",
                 "data.global_batch_size=64")
    plan = planning.make_plan(cfg)
    assert (plan.world, plan.accumulation, plan.global_batch) == (8, 4, 64)
    assert plan.tokens_per_step == 64 * cfg.data.seq_length
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size x world size = 2 x 8 = 16"):
        planning.make_plan(cfg_of("executor=slurm", "executor.nodes=2", "executor.devices=4",
                                  "data.micro_batch_size=2", "data.global_batch_size=40"))


def test_meta_parameter_counts_equal_the_real_models():
    cfg = cfg_of("peft=lora")
    real = modeling.apply_parts(modeling.build_model(cfg.model, modeling.hf_config(cfg.model)), cfg.parts, cfg.peft)
    assert planning.meta_part_rows(cfg) == modeling.part_table(real, cfg.parts)


def test_memory_estimate_follows_the_strategy():
    ddp = planning.make_plan(cfg_of("model=7b", "executor=local", "executor.devices=2", "model.dtype=bf16"))
    fsdp = planning.make_plan(cfg_of("model=7b", "executor=local", "executor.devices=2", "model.dtype=bf16",
                                     "strategy=fsdp"))
    params = sum(r.params for r in ddp.rows)
    assert ddp.memory["weights"] == 2 * params  # bf16, whole model on each device
    assert fsdp.memory["weights"] == params  # halved over 2 devices
    assert fsdp.memory["AdamW moments"] == ddp.memory["AdamW moments"] // 2
    lora = planning.make_plan(cfg_of("model=7b", "peft=lora", "model.dtype=bf16"))
    assert lora.memory["gradients"] < ddp.memory["gradients"] / 50
    # peft's dropout keeps a 16-bit copy of each adapted layer's input: ~7 GiB at 3.3k tokens over the 7B's
    # 32 layers; the fp32 copy peft makes without lora_autocast is gone by backward (bench/activation_probe.py)
    activations = "activations (1 micro-batch)"
    def lora_act(*over):
        return planning.make_plan(cfg_of("model=7b", "peft=lora", "data=mock", "data.seq_length=3329",
                                         "data.micro_batch_size=1", "model.dtype=bfloat16", *over)).memory[activations]
    dropout_copies = lora_act() - lora_act("peft.dropout=0")
    assert 6.5 * 2**30 < dropout_copies < 7.5 * 2**30
    assert lora_act("model.lora_autocast=false") == lora_act()
    # float32 weights are cast to 16 bits for the matmuls, and every kept layer holds its copies until backward
    cfg = cfg_of("model=7b", "peft=lora", "model.dtype=float32")
    layer_weights = sum(p.numel() for p in modeling.build_model(cfg.model, modeling.hf_config(cfg.model), device="meta")
                        .model.language_model.layers[0].parameters() if p.dim() == 2)
    assert planning.layer_bytes(cfg, 1)[1] == 2 * layer_weights
    assert planning.layer_bytes(cfg_of("model=7b", "peft=lora", "model.dtype=bfloat16"), 1)[1] == 0
    assert planning.layer_bytes(cfg_of("model=7b", "strategy=fsdp", "model.dtype=float32"), 1)[1] == 0  # gathered in bf16
    checkpointed = planning.make_plan(cfg_of("model=7b", "model.gradient_checkpointing=true"))
    half = planning.make_plan(cfg_of("model=7b", "model.gradient_checkpointing=16"))
    assert checkpointed.memory[activations] < half.memory[activations] < ddp.memory[activations]
    assert checkpointed.memory["activations (1 micro-batch)"] < ddp.memory["activations (1 micro-batch)"] / 4


def test_auto_checkpointing_recomputes_the_fewest_layers_that_fit():
    cfg = cfg_of("model=7b", "strategy=fsdp", "executor=local", "executor.devices=2", "data=mock",
                 "data.micro_batch_size=1")
    assert cfg.model.gradient_checkpointing == "auto"
    rows = planning.meta_part_rows(cfg)
    layers = cfg.model.text.num_hidden_layers

    def total(n):
        cfg.model.gradient_checkpointing = n
        return planning.make_plan(cfg, rows).memory_total

    for gib in (40, 80, 141):
        cfg.model.gradient_checkpointing = "auto"
        n = planning.resolve_checkpointing(cfg, gib * 2**30, rows)
        if n < layers:  # fits with n, not with one layer fewer
            assert total(n) <= 0.85 * gib * 2**30 and (n == 0 or total(n - 1) > 0.85 * gib * 2**30), gib
    cfg.model.gradient_checkpointing = "auto"
    assert planning.resolve_checkpointing(cfg, 10 * 2**30, rows) == layers  # nothing fits: recompute all
    assert planning.resolve_checkpointing(cfg, None, rows) == 0  # off a GPU
    cfg.model.gradient_checkpointing = "auto"
    assert 0 < planning.resolve_checkpointing(cfg, 80 * 2**30, rows) < layers  # 2 x 80 GB: some layers
    assert planning.resolve_checkpointing(cfg, 141 * 2**30, rows) == 0  # 2 x 141 GB: none


def test_slurm_dry_run_prints_script_and_plan_and_submits_nothing(tmp_path):
    out = cli(tmp_path, "finetune", "executor=slurm", "executor.dry_run=true", "executor.nodes=2",
              "executor.devices=8", "executor.partition=gpu", "executor.account=abc", "executor.time=04:00:00",
              "executor.setup=['module load cuda']", "executor.sbatch_args=['--qos=high']", "model=7b", "data=mock",
              "strategy=fsdp", "data.global_batch_size=128", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=abc", "#SBATCH --time=04:00:00",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --qos=high", "module load cuda",
                 "world size 16", "accumulation 4", "global 128", "not submitted"]:
        assert line in out.stdout, line
    script = (tmp_path / "run" / "sbatch.sh").read_text()
    assert "executor.launched=true" in script and "resume=auto" in script and "executor.dry_run" not in script
    assert not (tmp_path / "run" / "slurm_job_id").exists()


def test_local_dry_run_prints_the_torchrun_command(tmp_path):
    out = cli(tmp_path, "pretrain", "executor=local", "executor.devices=4", "executor.dry_run=true",
              f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--nproc-per-node=4" in out.stdout and "executor.launched=true" in out.stdout
    assert "world size 4" in out.stdout and not (tmp_path / "run" / "checkpoints").exists()


def test_impossible_batch_and_direct_on_many_devices_are_one_line_errors(tmp_path):
    out = cli(tmp_path, "finetune", "executor.dry_run=true", "data.micro_batch_size=3", "data.global_batch_size=8")
    assert out.returncode == 1 and "not a multiple" in out.stderr and "Traceback" not in out.stderr
    out = cli(tmp_path, "finetune", "executor.devices=2")
    assert out.returncode == 1 and "executor=local" in out.stderr and "Traceback" not in out.stderr


def test_fused_adamw_only_without_gradient_clipping(monkeypatch):
    import lightning as L

    from llavanext.module import LlavaNextModule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = LlavaNextModule(torch.nn.Linear(2, 2), cfg_of().optim, 10, 1)
    for clip, fused in [(1.0, False), (None, True)]:
        module.trainer = L.Trainer(gradient_clip_val=clip, accelerator="cpu", logger=False)
        assert module.fused() is fused
