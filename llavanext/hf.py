"""Hugging Face model folders: what kind of model one holds, which model group it fits, loading it safely.

Loading goes through transformers' own `from_pretrained` (local files only, safetensors only,
no remote code), so the key renames between checkpoint layouts are the ones transformers
uses; what does not fit becomes one CheckpointError naming the tensor and both shapes.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path

from llavanext.errors import CheckpointError

KINDS = ("llava_next", "causal_lm", "clip_vision")
CAUSAL_LM_TYPES = ("llama", "mistral")
CLIP_TYPES = ("clip", "clip_vision_model")
TEXT_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size")
# The parts of a LLaVA-NeXT each kind provides, as (config attribute, model.* key of the group yaml, fields).
PART_FIELDS = {
    "llava_next": (("text_config", "text", TEXT_FIELDS), ("vision_config", "vision", VISION_FIELDS)),
    "causal_lm": ((None, "text", TEXT_FIELDS),),
    "clip_vision": (("vision_config", "vision", VISION_FIELDS),),
}


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def detect_kind(config: dict, folder: Path) -> str:
    model_type = config.get("model_type")
    if model_type == "llava_next":
        return "llava_next"
    if model_type in CAUSAL_LM_TYPES:
        return "causal_lm"
    if model_type in CLIP_TYPES:
        return "clip_vision"
    raise CheckpointError(
        f"{folder}/config.json: model_type {model_type!r} (architectures {config.get('architectures')}) is not "
        f"one llavanext imports: llava_next, a causal LM ({', '.join(CAUSAL_LM_TYPES)}) or a CLIP vision model "
        f"({', '.join(CLIP_TYPES)}); kind=llava_next|causal_lm|clip_vision forces one")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise CheckpointError(f"kind={kind!r}; choose from auto, {', '.join(KINDS)}")
    return kind


def model_class(kind: str):
    import transformers

    return {"llava_next": transformers.LlavaNextForConditionalGeneration,
            "causal_lm": transformers.AutoModelForCausalLM,
            "clip_vision": transformers.CLIPVisionModel}[check_kind(kind)]


def load_config(folder: Path, kind: str):
    """The transformers config of a folder (defaults filled in), as the class of `kind` reads it."""
    from transformers import AutoConfig, CLIPVisionConfig

    try:
        if kind == "clip_vision":
            return CLIPVisionConfig.from_pretrained(folder, local_files_only=True)
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}/config.json cannot be read as {kind}: {str(e).splitlines()[0]}") from None


# ---- which model group fits ---------------------------------------------------------------------------

def model_groups() -> dict:
    """The shipped `conf/model/*.yaml`, by name."""
    from omegaconf import OmegaConf

    folder = resources.files("llavanext.conf") / "model"
    return {f.name[:-5]: OmegaConf.load(f) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def field(config, name: str):
    if name == "head_dim":
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if name == "num_key_value_heads":
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return getattr(config, name, None)


def differences(config, kind: str, group) -> list[str]:
    """The overrides that would make `group` (a model/*.yaml node) fit a checkpoint config; [] when it fits."""
    from llavanext.model import hf_config

    ours = hf_config(group)
    out = []
    for attr, key, fields in PART_FIELDS[kind]:
        theirs = getattr(config, attr) if attr and hasattr(config, attr) else config
        mine = getattr(ours, f"{key}_config")
        for name in fields:
            want, have = field(theirs, name), field(mine, name)
            if name == "vocab_size" and kind == "causal_lm" and want <= have:
                continue  # a language model's embeddings grow to the group's vocabulary (room for <image>)
            if name == "head_dim" and want == theirs.hidden_size // theirs.num_attention_heads:
                continue  # follows hidden_size and num_attention_heads
            if want != have:
                plus = "" if name in group[key] else "+"
                out.append(f"{plus}model.{key}.{name}={want}")
    return out


def fits(config, kind: str) -> list[str]:
    """The model groups whose shapes fit this checkpoint config."""
    return [name for name, group in model_groups().items() if not differences(config, kind, group)]


def fit_hint(config, kind: str) -> str:
    """`model=13b fits it`, or the overrides that make the closest group fit."""
    groups = model_groups()
    fitting = [name for name, group in groups.items() if not differences(config, kind, group)]
    if fitting:
        return f"model={fitting[0]} fits it"
    name, diff = min(((n, differences(config, kind, g)) for n, g in groups.items()), key=lambda x: len(x[1]))
    return f"no model group fits it; the closest is model={name} with {' '.join(diff)}"


# ---- loading --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet():
    """transformers' load report and progress bars off: our own error says what is wrong."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def check_safetensors(folder: Path) -> list[Path]:
    """The model's safetensors files, each header read (a truncated file fails here, not mid-training)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e}") from None
    elif (folder / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        return []
    files = [folder / n for n in names]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{index} names {file.name}, which is missing from {folder}")
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error type for every kind of damage
            raise CheckpointError(f"{file} is damaged or cut short ({str(e).splitlines()[0]}): "
                                  "download or copy it again") from None
    return files


def pickle_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("pytorch_model*.bin"))


def load(folder: Path, kind: str, *, config=None, dtype="auto", what: str = "", hint=None,
         ignore_unexpected: bool = False):
    """`kind`'s model from `folder` (with `config` if given, else the folder's), every tensor checked.

    `hint(source_config)` adds which model group would fit to a shape error.
    """
    what = what or str(folder)
    if not check_safetensors(folder):
        found = [p.name for p in pickle_files(folder)]
        raise CheckpointError(f"{what}: no model.safetensors (or index) in {folder}"
                              + (f"; it has pickle weights {found}: import it with allow_pickle=true" if found else ""))
    kwargs = {"trust_remote_code": False} if kind == "causal_lm" else {}
    if config is not None:
        kwargs["config"] = config
    try:
        with quiet():
            model, info = model_class(kind).from_pretrained(
                folder, dtype=dtype, local_files_only=True, use_safetensors=True, ignore_mismatched_sizes=True,
                output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{what}: transformers cannot load it as {kind}: {str(e).splitlines()[0]}") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, theirs, ours = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        tail = f"; {hint(load_config(folder, kind))}" if hint else ""
        raise CheckpointError(f"{what}: tensor {name} has shape {tuple(theirs)} in the checkpoint but the model "
                              f"expects {tuple(ours)}{more}{tail}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"{what}: loaded as {kind}, the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"{', '.join(missing[:3])}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected and not ignore_unexpected:
        raise CheckpointError(f"{what}: loaded as {kind}, the checkpoint has {len(unexpected)} tensor(s) the model does not, e.g. "
                              f"{', '.join(unexpected[:3])}")
    return model


TOP_BEHAVIOUR = ("vision_feature_layer", "vision_feature_select_strategy", "image_grid_pinpoints", "projector_hidden_act")
TEXT_BEHAVIOUR = ("hidden_act", "rms_norm_eps", "rope_parameters", "sliding_window")


def behaviour_differences(theirs, ours) -> list[tuple[str, object, object]]:
    """(model.* key, our value, the checkpoint's) for settings that change what the same weights compute."""
    out = []

    def compare(prefix, other, mine, names):
        out.extend((prefix + n, getattr(mine, n, None), getattr(other, n, None)) for n in names
                   if getattr(mine, n, None) != getattr(other, n, None))

    if hasattr(theirs, "text_config"):
        compare("", theirs, ours, TOP_BEHAVIOUR)
        theirs, ours = theirs.text_config, ours.text_config
    compare("text.", theirs, ours, TEXT_BEHAVIOUR)
    return out


def shapes(kind: str, config) -> dict[str, tuple]:
    """Every tensor's shape for a config, from a model built on the meta device (no memory, no time)."""
    import torch

    with torch.device("meta"), quiet():
        cls = model_class(kind)
        model = cls.from_config(config) if kind == "causal_lm" else cls(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def first_mismatch(kind: str, theirs, ours) -> tuple[str, tuple, tuple] | None:
    """The first tensor whose shape differs between a checkpoint's config and ours: (name, theirs, ours)."""
    mine = shapes(kind, ours)
    for name, shape in shapes(kind, theirs).items():
        if name in mine and mine[name] != shape:
            return name, shape, mine[name]
    return None
