"""Pretrain and finetune on the tiny model: the right parameters change, frozen ones stay
bit-identical, the loss falls, resume continues, and a config that disagrees with what trains fails."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

from conftest import compose
from llavanext import train
from llavanext.assemble import assemble
from llavanext.errors import ConfigError
from llavanext.model import check_trainable, part_of, part_table

FAST = ["trainer.progress_bar=none", "trainer.val_check_interval=1000", "trainer.print_every=0"]


def run(tmp_path, command, overrides, name="run"):
    cfg = compose(command, [*FAST, *overrides], run_dir=tmp_path / name)
    return cfg, train.run(cfg)


def initial_weights(cfg):
    L.seed_everything(cfg.seed, verbose=False)
    return {k: v.clone() for k, v in assemble(cfg).model.state_dict().items()}


def trained_weights(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k.removeprefix("model."): v for k, v in state["state_dict"].items()}


def losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def changed_parts(before, after):
    """part -> (tensors changed, tensors total)."""
    out = {}
    for name, tensor in before.items():
        changed, total = out.get(part_of(name), (0, 0))
        out[part_of(name)] = (changed + int(not torch.equal(tensor, after[name])), total + 1)
    return out


def test_pretrain_trains_only_the_projector(tmp_path):
    cfg, run_dir = run(tmp_path, "pretrain", ["trainer.max_steps=40", "trainer.log_every_n_steps=1"])
    parts = changed_parts(initial_weights(cfg), trained_weights(run_dir))
    assert parts["vision_tower"][0] == 0 and parts["language_model"][0] == 0
    assert parts["projector"][0] == parts["projector"][1]  # every projector tensor and image_newline moved
    curve = losses(run_dir)
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10


def test_full_finetune_trains_projector_and_language_model(tmp_path):
    cfg, run_dir = run(tmp_path, "finetune", ["trainer.max_steps=40", "trainer.log_every_n_steps=1",
                                              "optim.lr=1e-3", "optim.warmup_steps=5"])
    parts = changed_parts(initial_weights(cfg), trained_weights(run_dir))
    assert parts["vision_tower"][0] == 0
    assert parts["projector"][0] == parts["projector"][1]
    assert parts["language_model"][0] == parts["language_model"][1]
    curve = losses(run_dir)
    assert sum(curve[-10:]) / 10 < 0.6 * sum(curve[:10]) / 10


def test_lora_trains_adapters_and_projector_only(tmp_path):
    cfg, run_dir = run(tmp_path, "finetune", ["peft=lora", "peft.r=8", "trainer.max_steps=20",
                                              "trainer.log_every_n_steps=1", "optim.warmup_steps=2"])
    before = initial_weights(cfg)  # the LoRA-wrapped model: adapters included
    after = trained_weights(run_dir)
    parts = changed_parts(before, after)
    assert parts["vision_tower"][0] == 0 and parts["language_model"][0] == 0
    assert parts["projector"][0] == parts["projector"][1]
    lora_b = [n for n in before if "lora_B" in n]
    assert lora_b and all(not torch.equal(before[n], after[n]) for n in lora_b)
    assert all(".language_model." in n for n in lora_b)  # never the vision tower or projector


def test_resume_continues_the_step_count(tmp_path):
    overrides = ["trainer.checkpoint_every=5", "trainer.log_every_n_steps=1"]
    _, run_dir = run(tmp_path, "finetune", ["trainer.max_steps=5", *overrides])
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    _, again = run(tmp_path, "finetune", ["trainer.max_steps=8", "resume=auto", *overrides])
    assert again == run_dir and first == 5
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_lora_with_trainable_base_weights_is_refused():
    cfg = compose("finetune", ["peft=lora", "parts.language_model=full"])
    with pytest.raises(ConfigError, match="parts.language_model=lora"):
        assemble(cfg)


def test_a_part_that_trains_against_the_config_is_caught():
    cfg = compose("finetune", ["peft=lora"])
    model = assemble(cfg).model
    rows = part_table(model, cfg.parts)
    check_trainable(rows)  # as built: consistent
    for name, param in model.named_parameters():
        if ".language_model." in name and "lora_" not in name:
            param.requires_grad_(True)  # what a wrong peft flag would do
            break
    with pytest.raises(ConfigError, match="language_model is LoRA in the config but"):
        check_trainable(part_table(model, cfg.parts))


def test_everything_frozen_is_refused():
    cfg = compose("pretrain", ["parts.projector=frozen"])
    model = assemble(cfg).model
    with pytest.raises(ConfigError, match="nothing trains"):
        check_trainable(part_table(model, cfg.parts))


def test_run_folder_has_config_manifest_logs(tmp_path):
    _, run_dir = run(tmp_path, "pretrain", ["trainer.max_steps=2"])
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 1234 and "torch" in manifest["versions"] and manifest["command"] == "pretrain"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "metrics.csv").is_file()
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))


def test_lora_on_16_bit_weights_without_autocast_is_refused_before_building(tmp_path):
    cfg = compose("finetune", ["peft=lora", "model.dtype=bfloat16", "trainer.precision=32-true"],
                  run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="trainer.precision=bf16-mixed"):
        train.run(cfg)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
