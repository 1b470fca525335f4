"""Every shipped config composes for every command it belongs to, and says what it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from conftest import REPO, compose
from llavanext.cli.overrides import config_groups
from llavanext.model import hf_config, part_of

CONF = REPO / "conf"
COMMANDS = sorted(p.stem for p in CONF.glob("*.yaml") if not p.stem.startswith("_"))


def all_yaml() -> list[Path]:
    return sorted(CONF.rglob("*.yaml"))


@pytest.mark.parametrize("path", all_yaml(), ids=lambda p: str(p.relative_to(CONF)))
def test_every_file_opens_with_what_it_is_and_a_command(path):
    lines = path.read_text().splitlines()
    if lines[0].startswith("# @package"):
        lines = lines[1:]
    assert lines[0].startswith("# "), f"{path} must open with a one-line comment"
    assert "`llavanext " in lines[0], f"{path}: the first comment names a command that uses it"


def group_options_of(command: str) -> list[tuple[str, str]]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="llavanext.conf", version_base="1.3"):
        cfg = hydra_compose(config_name=command, return_hydra_config=True)
    used = {g for g in cfg.hydra.runtime.choices if not g.startswith("hydra")}
    return [(g, o) for g, options in config_groups().items() if g in used for o in options]


CASES = [(c, g, o) for c in COMMANDS for g, o in group_options_of(c)]


@pytest.mark.parametrize("command,group,option", CASES, ids=[f"{c}-{g}={o}" for c, g, o in CASES])
def test_every_group_option_composes_and_resolves(command, group, option):
    from omegaconf import OmegaConf

    cfg = compose(command, [f"{group}={option}"])
    # values the user must give (`???`, e.g. data.path) get a stand-in; everything else must resolve
    missing = [f"{key}=stand-in" for key in OmegaConf.missing_keys(cfg)]
    cfg = compose(command, [f"{group}={option}", *missing])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_every_group_option_is_used_by_some_command():
    used = {(g, o) for _, g, o in CASES}
    unused = [f"{g}={o}" for g, options in config_groups().items() for o in options if (g, o) not in used]
    assert not unused, f"options no command composes: {unused}"


# Parameter counts of the published checkpoints' architectures: LM (with lm_head), CLIP ViT-L/14-336
# vision model, mlp2x_gelu projector + image_newline.
PUBLISHED = {
    "7b": (6_738_939_904, 303_507_456, 20_983_808),          # llava-hf/llava-v1.6-vicuna-7b-hf
    "13b": (13_016_519_680, 303_507_456, 31_472_640),        # llava-hf/llava-v1.6-vicuna-13b-hf
    "mistral_7b": (7_242_256_384, 303_507_456, 20_983_808),  # llava-hf/llava-v1.6-mistral-7b-hf
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_size_models_have_the_published_architecture(name):
    cfg = compose("finetune", [f"model={name}"])
    config = hf_config(cfg.model)
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_token_index == 32000 and config.text_config.vocab_size == 32064
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    counts = {"language_model": 0, "vision_tower": 0, "projector": 0}
    for param_name, param in model.named_parameters():
        counts[part_of(param_name)] += param.numel()
    assert (counts["language_model"], counts["vision_tower"], counts["projector"]) == PUBLISHED[name]


def test_recipe_defaults_follow_nemo():
    pre, fine, lora = compose("pretrain"), compose("finetune"), compose("finetune", ["peft=lora"])
    assert (pre.optim.lr, pre.optim.min_lr) == (1e-3, 2e-5)
    assert (fine.optim.lr, fine.optim.min_lr) == (2e-5, 2e-7)
    assert lora.optim.lr == 1e-4 and lora.parts.language_model == "lora"
    for cfg in (pre, fine):
        assert cfg.optim.warmup_steps == 150 and list(cfg.optim.betas) == [0.9, 0.95]
        assert cfg.optim.weight_decay == 0.1 and cfg.trainer.gradient_clip_val == 1.0
    assert compose("finetune", ["model=7b", "data=mock"]).data.micro_batch_size == 2
    assert dict(pre.parts) == {"vision_tower": "frozen", "projector": "full", "language_model": "frozen"}
    assert dict(fine.parts) == {"vision_tower": "frozen", "projector": "full", "language_model": "full"}
