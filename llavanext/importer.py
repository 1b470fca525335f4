"""The import task: a Hugging Face folder (or `hf://org/name`) in, a validated model store entry out.

Everything that can be checked before writing is (config, kind, weight files); the entry is
then written into a hidden folder, loaded back with transformers, and only then renamed into
place. A failure or a kill at any point leaves the store as it was.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from llavanext import hf, store
from llavanext.errors import CheckpointError, ConfigError

console = Console()
# Files of a model folder worth keeping besides the weights: configs, tokenizer, processor, card.
EXTRAS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json",
        "chat_template.jinja", "preprocessor_config.json", "processor_config.json", "README.md", "LICENSE",
        "LICENSE.txt")
KEEP = ("config.json", "generation_config.json", "model.safetensors.index.json", *EXTRAS)
USE = {"llava_next": "llavanext finetune model={group} model.from_pretrained={name}",
       "causal_lm": "llavanext pretrain model={group} model.language_model_from_pretrained={name}",
       "clip_vision": "llavanext pretrain model={group} model.vision_model_from_pretrained={name}"}


def default_name(source: str, folder: Path) -> str:
    if source.startswith(store.HF_PREFIX):
        return store.split_hf(source)[0]
    return f"local/{folder.resolve().name}"


def copy_files(folder: Path, temp: Path, weights: list[Path], names=KEEP) -> None:
    for path in [*weights, *(folder / name for name in names)]:
        if path.is_file():
            shutil.copyfile(path, temp / path.name)  # follows the HF cache's symlinks into its blobs


def convert_pickle(folder: Path, temp: Path) -> None:
    """pytorch_model*.bin -> model*.safetensors, read with torch.load(weights_only=True): no code runs."""
    import torch
    from safetensors.torch import save_file

    renamed = {}
    for path in hf.pickle_files(folder):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # weights_only refuses anything but tensors; say so plainly
            raise CheckpointError(f"{path} cannot be read with torch.load(weights_only=True): "
                                  f"{str(e).splitlines()[0]}") from None
        seen, tensors = set(), {}
        for key, tensor in state.items():  # safetensors stores no shared storage: copy tied tensors apart
            ptr = tensor.untyped_storage().data_ptr()
            tensors[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
            seen.add(ptr)
        renamed[path.name] = path.name.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file(tensors, temp / renamed[path.name], metadata={"format": "pt"})
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: renamed[v] for k, v in data["weight_map"].items()}
        (temp / "model.safetensors.index.json").write_text(json.dumps(data, indent=2))


def write_entry(folder: Path, temp: Path, kind: str, source_type: str, allow_pickle: bool):
    """Fill `temp` with a loadable HF folder; returns the model loaded back from it."""
    weights = hf.check_safetensors(folder)
    if kind == "clip_vision" and source_type == "clip":
        # a full CLIP (text + vision): keep the vision half only, written by transformers itself
        model = hf.load(folder, kind, ignore_unexpected=True)
        model.save_pretrained(temp)
        copy_files(folder, temp, [], EXTRAS)
        return model
    if weights:
        copy_files(folder, temp, weights)
    elif allow_pickle:
        copy_files(folder, temp, [])
        convert_pickle(folder, temp)
    return hf.load(temp, kind, what=f"{folder} (as imported)")


def check_source(folder: Path, allow_pickle: bool) -> None:
    if hf.check_safetensors(folder):
        return
    found = [p.name for p in hf.pickle_files(folder)]
    if not found:
        raise CheckpointError(f"{folder} has no model.safetensors (or model.safetensors.index.json) to import")
    if not allow_pickle:
        raise CheckpointError(
            f"{folder} has only pickle weights ({', '.join(found)}), which can run code when loaded: "
            "import it with allow_pickle=true to convert them with torch.load(weights_only=True)")


def run(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "source"):
        raise ConfigError("give source=hf://org/name[@revision] or source=/path/to/a/hf/folder "
                          "(`llavanext import --list` shows what is imported)")
    source = str(cfg.source)
    if source.startswith(store.HF_PREFIX):  # pickles are fetched only when they may be converted
        folder = store.hf_snapshot(source, store.DOWNLOAD + (["pytorch_model*.bin"] if cfg.allow_pickle else []))
    else:
        folder = store.resolve(source)
    config = hf.read_config(folder)
    kind = hf.detect_kind(config, folder) if cfg.kind == "auto" else hf.check_kind(cfg.kind)
    name = store.check_name(cfg.name or default_name(source, folder))
    target = store.entry_dir(name)
    if target.is_dir() and not cfg.force:
        console.print(f"{name} is already in the store ({target}); nothing done (force=true replaces it)")
        return target
    check_source(folder, cfg.allow_pickle)

    console.print(f"importing {source} ({kind}) as {name}")
    temp = store.new_temp_entry(name)
    try:
        model = write_entry(folder, temp, kind, config.get("model_type"), cfg.allow_pickle)
        fitting = hf.fits(model.config, kind)
        meta = {
            "name": name,
            "kind": kind,
            "model_group": fitting[0] if fitting else None,
            "fits": fitting,
            "source": source if source.startswith(store.HF_PREFIX) else str(folder.resolve()),
            "revision": folder.name if source.startswith(store.HF_PREFIX) else None,
            "imported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (temp / store.META).write_text(
            f"# Model store entry written by `llavanext import source={source}`\n" + OmegaConf.to_yaml(meta))
        target = store.commit_entry(temp, name)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if not any(temp.parent.iterdir()):
            temp.parent.rmdir()  # an org folder made for this import only
        raise
    if fitting:
        console.print(f"done: {target}\n  fits model={', '.join(fitting)}; use it with:\n  "
                      + USE[kind].format(group=fitting[0], name=name))
    else:
        console.print(f"done: {target}\n  {hf.fit_hint(model.config, kind)}")
    return target
