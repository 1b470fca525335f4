"""The export task: a run folder or training checkpoint in, a Hugging Face folder out.

The folder loads offline with `AutoModelForImageTextToText` and `AutoProcessor`: safetensors
(sharded past `max_shard_size`), the model config and a processor config that agree on
pinpoints, feature layer, select strategy and patch size, and the tokenizer with a chat
template that renders conversations exactly as the run's training template did. LoRA is
merged by default; `merge_lora=false` writes a PEFT adapter with the weights it goes onto.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from llavanext import model as modeling
from llavanext.assemble import from_run
from llavanext.data.encoder import has_class_token
from llavanext.data.images import make_image_processor
from llavanext.data.templates import IMAGE, VICUNA_SYSTEM, get_template
from llavanext.errors import ConfigError

console = Console()
BASE = "base"

# Jinja twins of llavanext.data.templates (tests render both and compare). A message's content is a
# string (with <image> markers, as in the training data) or a list of {"type": "image"|"text"} items,
# the images first, each as "<image>\n", as Hugging Face's LLaVA processors write them.
TEXT = ("{%- macro text(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
        "{%- for c in m['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
        "{%- endif -%}{%- endmacro -%}")
SYSTEM = ("{%- if messages[0]['role'] == 'system' -%}{%- set system = text(messages[0]) -%}"
          "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = DEFAULT -%}{%- set turns = messages -%}"
          "{%- endif -%}")
TURNS = {
    "vicuna_v1": ("{{ system + ' ' if loop.first else '' }}{{ 'USER: ' + text(m) + ' ASSISTANT:' }}",
                  "{{ ' ' + text(m) + EOS }}"),
    "mistral_instruct": ("{{ '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + text(m) + ' [/INST]' }}",
                         "{{ ' ' + text(m) + EOS }}"),
    "chatml": ("{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' if loop.first and system else '' }}"
               "{{ '<|im_start|>user\\n' + text(m) + '<|im_end|>\\n<|im_start|>assistant\\n' }}",
               "{{ text(m) + EOS + '\\n' }}"),
    "plain": ("{{ '<image>' * (m['content'].count('<image>') if m['content'] is string else "
              "(m['content'] | selectattr('type', 'equalto', 'image') | list | length)) }}",
              "{{ text(m) + '\\n' }}"),
}


def chat_template(name: str, bos: str | None = None) -> str:
    """The Jinja chat template of training template `name`; `bos` first when the tokenizer adds none itself."""
    template = get_template(name)
    default = json.dumps(VICUNA_SYSTEM if name == "vicuna_v1" else "")
    user, assistant = TURNS[name]
    return ((f"{{{{ {json.dumps(bos)} }}}}" if bos else "") + TEXT
            + SYSTEM.replace("DEFAULT", default)
            + "{%- for m in turns -%}{%- if m['role'] == 'user' -%}" + user + "{%- else -%}"
            + assistant.replace("EOS", json.dumps(template.eos)) + "{%- endif -%}{%- endfor -%}")


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def make_processor(run_cfg: DictConfig, tokenizer):
    """transformers' LlavaNextProcessor for this model: the same tiling as training, the run's chat template."""
    from transformers import LlavaNextProcessor

    model_cfg = run_cfg.model
    image_processor = make_image_processor(model_cfg)
    image_processor.do_pad = True  # batches of images with different tile counts; padded tiles are ignored
    bos = None if adds_bos(tokenizer) else tokenizer.bos_token  # our encoder always starts with BOS
    template = chat_template(run_cfg.template, bos)
    tokenizer.chat_template = template
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=model_cfg.vision.patch_size,
        vision_feature_select_strategy=model_cfg.vision_feature_select_strategy, chat_template=template,
        image_token=IMAGE, num_additional_image_tokens=1 if has_class_token(model_cfg) else 0)


def write_model_folder(model, folder: Path, run_cfg: DictConfig, tokenizer, max_shard_size: str) -> None:
    if tokenizer is not None:
        eos = tokenizer.convert_tokens_to_ids(get_template(run_cfg.template).eos)
        if eos is not None and eos != tokenizer.unk_token_id:
            model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is None:
        make_image_processor(run_cfg.model).save_pretrained(folder)
        console.print("[yellow]the run has no tokenizer (model.tokenizer is null): AutoProcessor will not load "
                      "this folder; the model and the image processor will[/]")
    else:
        make_processor(run_cfg, tokenizer).save_pretrained(folder)


def write_adapter(model, folder: Path, out: Path, run_cfg: DictConfig, tokenizer, max_shard_size: str) -> None:
    """adapter_config.json + adapter_model.safetensors, and under base/ the weights they go onto as trained."""
    model.peft_config["default"].base_model_name_or_path = str((out / BASE).resolve())
    model.save_pretrained(folder)
    base = model.unload()  # the base weights without LoRA, the projector as trained
    write_model_folder(base, folder / BASE, run_cfg, tokenizer, max_shard_size)
    if tokenizer is not None:
        make_processor(run_cfg, tokenizer).save_pretrained(folder)


def check_out(out: Path, force: bool) -> None:
    if out.is_file():
        raise ConfigError(f"out={out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"out={out} already holds files; choose another folder or force=true to replace it")


def run(cfg: DictConfig) -> Path:
    missing = [k for k in ("checkpoint", "out") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ConfigError(f"give {' and '.join(f'{k}=...' for k in missing)}: checkpoint= a run folder, .ckpt file "
                          "or sharded checkpoint folder; out= the folder to write")
    out = Path(cfg.out)
    check_out(out, cfg.force)
    run_cfg, built = from_run(cfg.checkpoint)
    model, tokenizer = built.model, built.tokenizer
    from peft import PeftModel

    lora = isinstance(model, PeftModel)
    if cfg.dtype:
        model.to(modeling.torch_dtype(cfg.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if lora and not cfg.merge_lora:
            write_adapter(model, temp, out, run_cfg, tokenizer, cfg.max_shard_size)
            what = f"LoRA adapter (peft) with the weights it goes onto in {out / BASE}"
        else:
            if lora:
                model = model.merge_and_unload()
            write_model_folder(model, temp, run_cfg, tokenizer, cfg.max_shard_size)
            what = "model, LoRA merged" if lora else "model"
        if out.exists():
            shutil.rmtree(out)
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if not lora and not cfg.merge_lora:
        console.print("merge_lora=false: the run has no LoRA adapters, so the whole model was written")
    console.print(f"exported the {what} of {cfg.checkpoint} to {out}")
    return out

