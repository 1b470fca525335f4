"""Config in, model out: tokenizer, transformers config, weights and the parts that train.

Training, generation, export and the demo all build their model here, so a run folder's
`config.yaml` rebuilds exactly the model that was trained.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from llavanext import hf, speed, store
from llavanext import model as modeling
from llavanext.data.encoder import has_class_token
from llavanext.data.templates import IMAGE
from llavanext.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class Assembled:
    model: torch.nn.Module
    tokenizer: object | None
    image_token_id: int
    vocab_size: int


def pretrained_folder(model_cfg: DictConfig, key: str) -> Path | None:
    """The folder named by `model.<key>` (a store name, hf://org/name or a folder), or None."""
    value = model_cfg.get(key)
    if not value:
        return None
    try:
        return store.resolve(value)
    except CheckpointError as e:
        raise CheckpointError(f"model.{key}: {e}") from None


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_tokenizer(model_cfg: DictConfig):
    """The model's tokenizer: `demo` (bundled), a store name or folder, else the pretrained checkpoint's, else none.

    A tokenizer without `<image>` (a plain language model's) gets it as a new special token.
    """
    from transformers import AutoTokenizer

    source = model_cfg.get("tokenizer")
    if source == "demo":
        from llavanext.demo.tokenizer import load_demo_tokenizer

        return load_demo_tokenizer()
    if source is not None:
        try:
            folder = store.resolve(source)
        except CheckpointError as e:
            raise ConfigError(f"model.tokenizer={source!r} is neither 'demo' nor a model with a tokenizer: {e}") from None
    else:
        folders = [pretrained_folder(model_cfg, k) for k in ("from_pretrained", "language_model_from_pretrained")]
        folder = next((f for f in folders if f is not None and has_tokenizer(f)), None)
        if folder is None:
            return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer loads from {folder}: {str(e).splitlines()[0]}") from None
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE], special_tokens=True)
    return tokenizer


def checkpoint_image_token(model_cfg: DictConfig) -> int | None:
    folder = pretrained_folder(model_cfg, "from_pretrained")
    if folder is None:
        return None
    config = hf.read_config(folder)
    return config.get("image_token_index", config.get("image_token_id"))


def assemble(cfg: DictConfig, *, tokenizer_needed: bool = True, train: bool = True,
             pretrained: bool = True) -> Assembled:
    """Tokenizer + model of `cfg`; with `pretrained`, weights from the `model.*from_pretrained` checkpoints."""
    model_cfg = cfg.model
    if model_cfg.vision_feature_select_strategy == "full" and has_class_token(model_cfg):
        raise ConfigError("model.vision_feature_select_strategy=full keeps CLIP's class token, which transformers' "
                          "LLaVA-NeXT cannot lay out in its tile grid: use default (full is for towers without one, "
                          "such as SigLIP)")
    tokenizer = load_tokenizer(model_cfg)
    if tokenizer is None and tokenizer_needed:
        raise ConfigError(f"data={cfg.data.name} needs a tokenizer: set model.tokenizer (e.g. model.tokenizer=demo)")
    vocab_size = model_cfg.text.vocab_size
    from_checkpoint = checkpoint_image_token(model_cfg)
    image_token_id = from_checkpoint if from_checkpoint is not None else model_cfg.image_token_index
    if tokenizer is not None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ConfigError("the tokenizer has no <image> token")
        if from_checkpoint is not None and image_token_id != from_checkpoint:
            raise ConfigError(f"the tokenizer's <image> is token {image_token_id} but model.from_pretrained's "
                              f"config says image_token_index={from_checkpoint}: use the checkpoint's own tokenizer")
        if len(tokenizer) > vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.text.vocab_size={vocab_size}")
    config = modeling.hf_config(model_cfg, image_token_index=image_token_id)
    if pretrained:
        check_pretrained_shapes(model_cfg, config)
    if pretrained and model_cfg.get("from_pretrained"):
        model = load_pretrained(model_cfg, config)
    else:
        model = modeling.build_model(model_cfg, config)
        if pretrained:
            load_pretrained_parts(model, model_cfg)
    if cfg.get("init_from"):
        load_weights(model, cfg.init_from)
    if train:
        model = modeling.apply_parts(model, cfg.parts, cfg.peft)
        for line in speed.apply(model, model_cfg):
            log.info("speed: %s", line)
    return Assembled(model, tokenizer, image_token_id, vocab_size)


def check_pretrained_shapes(model_cfg: DictConfig, config) -> None:
    """Before any weight is read or the model built: does each pretrained checkpoint fit the model group?"""
    for key, kind, ours in (("from_pretrained", "llava_next", config),
                            ("language_model_from_pretrained", "causal_lm", config.text_config),
                            ("vision_model_from_pretrained", "clip_vision", config.vision_config)):
        value = model_cfg.get(key)
        if not value:
            continue
        folder = pretrained_folder(model_cfg, key)
        expect_kind(folder, key, value, (kind,))
        theirs = hf.load_config(folder, kind)
        grown = theirs
        if kind == "causal_lm" and theirs.vocab_size < ours.vocab_size:
            grown = copy.deepcopy(theirs)
            grown.vocab_size = ours.vocab_size  # a smaller vocabulary grows to the group's (room for <image>)
        wrong = hf.first_mismatch(kind, grown, ours)
        if wrong:
            name, their_shape, our_shape = wrong
            if grown is not theirs:
                their_shape = hf.shapes(kind, theirs)[name]  # as saved, before the vocabulary grows
            raise CheckpointError(f"model.{key}={value}: tensor {name} has shape {their_shape} in the checkpoint "
                                  f"but model={model_cfg.name} expects {our_shape}; {hf.fit_hint(theirs, kind)}")


def expect_kind(folder: Path, key: str, value: str, kinds: tuple[str, ...]) -> None:
    kind = hf.detect_kind(hf.read_config(folder), folder)
    if kind not in kinds:
        right = {"llava_next": "model.from_pretrained", "causal_lm": "model.language_model_from_pretrained",
                 "clip_vision": "model.vision_model_from_pretrained"}[kind]
        raise ConfigError(f"model.{key}={value} is a {kind} checkpoint: give it as {right}")


def warn_differences(key: str, theirs, ours) -> None:
    for name, mine, other in hf.behaviour_differences(theirs, ours):
        log.warning("model.%s=%s but the checkpoint of model.%s has %s", name, mine, key, other)


def load_pretrained(model_cfg: DictConfig, config) -> torch.nn.Module:
    """A whole LLaVA-NeXT from `model.from_pretrained`, with the model group's config (shapes checked)."""
    if model_cfg.get("language_model_from_pretrained") or model_cfg.get("vision_model_from_pretrained"):
        raise ConfigError("model.from_pretrained loads every part: leave model.language_model_from_pretrained and "
                          "model.vision_model_from_pretrained null")
    value = model_cfg.from_pretrained
    folder = pretrained_folder(model_cfg, "from_pretrained")
    warn_differences("from_pretrained", hf.load_config(folder, "llava_next"), config)
    attn = model_cfg.get("attn_implementation", "sdpa")
    config._attn_implementation = "sdpa" if attn == speed.PACKED_ATTENTION else attn  # speed.apply sets packed
    return hf.load(folder, "llava_next", config=config, dtype=modeling.torch_dtype(model_cfg.get("dtype", "auto")),
                   what=f"model.from_pretrained={value}", hint=lambda c: hf.fit_hint(c, "llava_next"))


def load_pretrained_parts(model: torch.nn.Module, model_cfg: DictConfig) -> None:
    """Stage 1: the language model and/or the vision tower from their own checkpoints; the projector stays fresh."""
    dtype = next(model.parameters()).dtype
    value = model_cfg.get("language_model_from_pretrained")
    if value:
        folder = pretrained_folder(model_cfg, "language_model_from_pretrained")
        theirs = hf.load_config(folder, "causal_lm")
        text = copy.deepcopy(model.config.text_config)
        warn_differences("language_model_from_pretrained", theirs, text)
        if theirs.vocab_size < text.vocab_size:  # room for <image> (and padding) on top of the LM's vocabulary
            text.vocab_size = theirs.vocab_size
        lm = hf.load(folder, "causal_lm", config=text, dtype=dtype, what=f"model.language_model_from_pretrained={value}",
                     hint=lambda c: hf.fit_hint(c, "causal_lm"))
        if lm.config.vocab_size < model.config.text_config.vocab_size:
            lm.resize_token_embeddings(model.config.text_config.vocab_size, mean_resizing=True)
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
        del lm
    value = model_cfg.get("vision_model_from_pretrained")
    if value:
        folder = pretrained_folder(model_cfg, "vision_model_from_pretrained")
        vision_config = copy.deepcopy(model.config.vision_config)
        vision = hf.load(folder, "clip_vision", config=vision_config, dtype=dtype,
                         what=f"model.vision_model_from_pretrained={value}", hint=lambda c: hf.fit_hint(c, "clip_vision"),
                         ignore_unexpected=hf.read_config(folder).get("model_type") == "clip")  # CLIP's text half
        model.model.vision_tower.load_state_dict(vision.state_dict())
        del vision


def load_weights(model: torch.nn.Module, source: str) -> None:
    """Model weights from a run folder (its last checkpoint) or a Lightning checkpoint (file or sharded folder)."""
    from llavanext.run import read_weights, resolve_checkpoint

    path = resolve_checkpoint(source)
    own = model.state_dict()
    weights = read_weights(path, own)
    if any("lora_" in k for k in weights):
        raise CheckpointError(f"{path} holds LoRA adapters: export it merged, then start from the export")
    for name, tensor in weights.items():
        if name in own and own[name].shape != tensor.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)} but the model "
                                  f"expects {tuple(own[name].shape)}: was it trained with another model config?")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def from_run(source: str | Path) -> tuple[DictConfig, Assembled]:
    """The model a run trained (LoRA adapters included) from its folder or one of its checkpoints."""
    from llavanext.run import load_run_config, read_weights, resolve_checkpoint

    path = resolve_checkpoint(source)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else Path(source)
    cfg = load_run_config(run_dir)
    cfg.init_from = None
    built = assemble(cfg, tokenizer_needed=False, pretrained=False)  # the checkpoint holds every weight
    own = built.model.state_dict()
    weights = read_weights(path, own)
    shaped = {k: v for k, v in weights.items() if k not in own or v.shape == own[k].shape}
    if len(shaped) < len(weights):
        wrong = next(k for k in weights if k not in shaped)
        raise CheckpointError(f"{path}: {wrong} has shape {tuple(weights[wrong].shape)} but its run's config builds "
                              f"{tuple(own[wrong].shape)}")
    missing, unexpected = built.model.load_state_dict(shaped, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its run's config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    built.model.eval()
    return cfg, built
