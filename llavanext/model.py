"""Build a LLaVA-NeXT model from a model config, decide what trains, and prove it.

The parts of transformers' `LlavaNextForConditionalGeneration`:
  vision_tower    model.vision_tower
  projector       model.multi_modal_projector + model.image_newline
  language_model  model.language_model + lm_head
  lora            adapter weights injected by peft (only with peft=lora)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from llavanext.errors import ConfigError
from llavanext.speed import PACKED_ATTENTION

PARTS = ("vision_tower", "projector", "language_model")
PART_MODES = ("frozen", "full", "lora")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def hf_config(model_cfg: DictConfig, *, vocab_size: int | None = None,
              image_token_index: int | None = None) -> LlavaNextConfig:
    """The transformers config described by a `model/*.yaml` node."""
    text = OmegaConf.to_container(model_cfg.text, resolve=True)
    vision = OmegaConf.to_container(model_cfg.vision, resolve=True)
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    config = LlavaNextConfig(
        text_config=text,
        vision_config=vision,
        image_grid_pinpoints=OmegaConf.to_container(model_cfg.image_grid_pinpoints, resolve=True),
        vision_feature_layer=model_cfg.vision_feature_layer,
        vision_feature_select_strategy=model_cfg.vision_feature_select_strategy,
        projector_hidden_act=model_cfg.projector_hidden_act,
        multimodal_projector_bias=model_cfg.get("multimodal_projector_bias", True),
        image_token_index=image_token_index if image_token_index is not None else model_cfg.image_token_index,
        tie_word_embeddings=model_cfg.get("tie_word_embeddings", False),
    )
    return config


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not a dtype; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(model_cfg: DictConfig, config: LlavaNextConfig,
                device: torch.device | str | None = None) -> LlavaNextForConditionalGeneration:
    """A randomly initialised model (weights arrive through init_from / the checkpoint issue).

    `device`: where to initialise (a 7B model initialises in seconds on a GPU, minutes on a CPU).
    Speed levers (llavanext.speed) are switched on later, once the parts that train are set.
    """
    attn = model_cfg.get("attn_implementation", "sdpa")
    config._attn_implementation = "sdpa" if attn == PACKED_ATTENTION else attn  # speed.apply sets packed
    # no device: the caller's default device (e.g. `with torch.device("meta")` for the plan)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = LlavaNextForConditionalGeneration(config)
    model.to(torch_dtype(model_cfg.get("dtype", "auto")))
    return model


def part_of(name: str) -> str:
    """Which part a parameter name belongs to (works on plain and peft-wrapped models)."""
    if "lora_" in name:
        return "lora"
    if ".vision_tower." in f".{name}":
        return "vision_tower"
    if "multi_modal_projector" in name or "image_newline" in name:
        return "projector"
    return "language_model"


def lora_target_regex(target_modules) -> str:
    """LoRA only inside the language model: never the vision tower or the projector."""
    names = "|".join(target_modules)
    return rf".*language_model.*\.({names})$"


def apply_parts(model: torch.nn.Module, parts: DictConfig, peft_cfg: DictConfig) -> torch.nn.Module:
    """Set requires_grad per part (and inject LoRA) as the config says; returns the model to train."""
    for part in PARTS:
        mode = parts[part]
        if mode not in PART_MODES:
            raise ConfigError(f"parts.{part}={mode!r}; choose from {', '.join(PART_MODES)}")
    lora_parts = [p for p in PARTS if parts[p] == "lora"]
    if lora_parts and peft_cfg.method != "lora":
        raise ConfigError(f"parts.{lora_parts[0]}=lora needs peft=lora (peft is {peft_cfg.method!r})")
    if peft_cfg.method == "lora" and lora_parts != ["language_model"]:
        raise ConfigError(
            "peft=lora applies LoRA to the language model: set parts.language_model=lora "
            f"(now {parts.language_model!r}) and leave the other parts frozen or full")

    if peft_cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
            target_modules=lora_target_regex(peft_cfg.target_modules), bias="none")
        model = get_peft_model(model, lora)  # freezes every base weight
    for name, param in model.named_parameters():
        part = part_of(name)
        if part == "lora":
            param.requires_grad_(True)
        else:
            param.requires_grad_(parts[part] == "full")
    return model


@dataclass
class PartRow:
    part: str
    mode: str
    params: int
    trainable: int


def part_table(model: torch.nn.Module, parts: DictConfig) -> list[PartRow]:
    rows = {p: PartRow(p, parts[p], 0, 0) for p in PARTS}
    rows["lora"] = PartRow("lora adapters", "trained", 0, 0)
    for name, param in model.named_parameters():
        row = rows[part_of(name)]
        row.params += param.numel()
        row.trainable += param.numel() if param.requires_grad else 0
    return [r for r in rows.values() if r.params or r.part != "lora adapters"]


def check_trainable(rows: list[PartRow]) -> None:
    """Refuse to train when what trains disagrees with the config."""
    problems = []
    for row in rows:
        if row.mode == "frozen" and row.trainable:
            problems.append(f"{row.part} is frozen in the config but {row.trainable:,} of its parameters train")
        if row.mode == "full" and row.trainable != row.params:
            problems.append(f"{row.part} is full in the config but only {row.trainable:,} of {row.params:,} train")
        if row.mode == "lora" and row.trainable:
            problems.append(f"{row.part} is LoRA in the config but {row.trainable:,} of its base weights train")
        if row.part == "lora adapters" and row.trainable != row.params:
            problems.append("some LoRA adapter weights are frozen")
    if any(r.mode == "lora" for r in rows) and not any(r.part == "lora adapters" and r.params for r in rows):
        problems.append("LoRA is configured but no adapter was injected (check peft.target_modules)")
    if not any(r.trainable for r in rows):
        problems.append("nothing trains: every part is frozen")
    if problems:
        raise ConfigError("what trains disagrees with the config:\n  " + "\n  ".join(problems))


def render_part_table(rows: list[PartRow]):
    from rich.table import Table

    table = Table(title="What trains", title_justify="left")
    table.add_column("part")
    table.add_column("mode")
    table.add_column("parameters", justify="right")
    table.add_column("trainable", justify="right")
    for r in rows:
        table.add_row(r.part, r.mode, f"{r.params:,}", f"{r.trainable:,}")
    total = sum(r.params for r in rows)
    trainable = sum(r.trainable for r in rows)
    table.add_row("total", "", f"{total:,}", f"{trainable:,} ({100 * trainable / max(total, 1):.2f}%)",
                  style="bold")
    return table
