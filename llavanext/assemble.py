"""Config in, model out: tokenizer, transformers config, weights and the parts that train.

Training, generation, export and the demo all build their model here, so a run folder's
`config.yaml` rebuilds exactly the model that was trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from llavanext import model as modeling
from llavanext import speed
from llavanext.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class Assembled:
    model: torch.nn.Module
    tokenizer: object | None
    image_token_id: int
    vocab_size: int


def load_tokenizer(model_cfg: DictConfig):
    """The model's tokenizer: `demo` (bundled), a folder, or none (mock data needs none)."""
    source = model_cfg.get("tokenizer")
    if source is None:
        return None
    if source == "demo":
        from llavanext.demo.tokenizer import load_demo_tokenizer

        return load_demo_tokenizer()
    if not Path(source).is_dir():
        raise ConfigError(f"model.tokenizer={source!r} is neither 'demo' nor a folder")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def assemble(cfg: DictConfig, *, tokenizer_needed: bool = True, train: bool = True) -> Assembled:
    model_cfg = cfg.model
    tokenizer = load_tokenizer(model_cfg)
    if tokenizer is None and tokenizer_needed:
        raise ConfigError(f"data={cfg.data.name} needs a tokenizer: set model.tokenizer (e.g. model.tokenizer=demo)")
    vocab_size = model_cfg.text.vocab_size
    image_token_id = model_cfg.image_token_index
    if tokenizer is not None:
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ConfigError("the tokenizer has no <image> token")
        if len(tokenizer) > vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.text.vocab_size={vocab_size}")
    config = modeling.hf_config(model_cfg, image_token_index=image_token_id)
    model = modeling.build_model(model_cfg, config)
    if cfg.get("init_from"):
        load_weights(model, cfg.init_from)
    if train:
        model = modeling.apply_parts(model, cfg.parts, cfg.peft)
        for line in speed.apply(model, model_cfg):
            log.info("speed: %s", line)
    return Assembled(model, tokenizer, image_token_id, vocab_size)


def load_weights(model: torch.nn.Module, source: str) -> None:
    """Model weights from a run folder (its last checkpoint) or a Lightning .ckpt file."""
    from llavanext.run import resolve_checkpoint

    path = resolve_checkpoint(source)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    if any("lora_" in k for k in weights):
        raise CheckpointError(f"{path} holds LoRA adapters: export it merged, then start from the export")
    own = model.state_dict()
    for name, tensor in weights.items():
        if name in own and own[name].shape != tensor.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)} but the model "
                                  f"expects {tuple(own[name].shape)}: was it trained with another model config?")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def from_run(source: str | Path) -> tuple[DictConfig, Assembled]:
    """The model a run trained (LoRA adapters included) from its folder or one of its checkpoints."""
    from llavanext.run import load_run_config, resolve_checkpoint

    path = resolve_checkpoint(source)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else Path(source)
    cfg = load_run_config(run_dir)
    cfg.init_from = None
    built = assemble(cfg, tokenizer_needed=False)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    missing, unexpected = built.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()},
                                                      strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its run's config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    built.model.eval()
    return cfg, built
