"""Tiny Hugging Face folders for the checkpoint tests, written by hand (not from our model groups)
so that a test comparing our model with transformers' own compares two independent paths."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

TINY_VISION = dict(model_type="clip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, image_size=56, patch_size=14, projection_dim=48, hidden_act="quick_gelu")
# "full" keeps every vision token: transformers lays that out only for towers without a class token
SIGLIP_VISION = dict(TINY_VISION, model_type="siglip_vision_model")
SIGLIP_OVERRIDES = ["model.vision.model_type=siglip_vision_model"]
VICUNA_TEXT = dict(model_type="llama", vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   rope_theta=10000.0, pad_token_id=3)
MISTRAL_TEXT = dict(model_type="mistral", vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_theta=1000000.0, sliding_window=None, pad_token_id=3)
# model=tiny overrides that describe the mistral-like text config
MISTRAL_OVERRIDES = ["model.text.model_type=mistral", "model.text.num_key_value_heads=2",
                     "model.text.rope_theta=1000000.0", "+model.text.sliding_window=null"]
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
IMAGE_TOKEN = 4  # <image> in the demo tokenizer


def llava_config(text=VICUNA_TEXT, strategy="default", vision=TINY_VISION):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(text_config=dict(text), vision_config=dict(vision), image_grid_pinpoints=PINPOINTS,
                           vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                           image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu")


def save_llava(folder: Path, config=None, seed: int = 0) -> Path:
    """A randomly initialised LLaVA-NeXT with the demo tokenizer, saved the way transformers saves it."""
    from transformers import LlavaNextForConditionalGeneration

    from llavanext.demo.tokenizer import load_demo_tokenizer

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config or llava_config())
    with torch.no_grad():  # transformers initialises image_newline to zeros-ish; make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    load_demo_tokenizer().save_pretrained(folder)
    return folder


def save_clip(folder: Path, seed: int = 1) -> Path:
    """A full CLIP (text + vision), as openai/clip-vit-* are published."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, projection_dim=48)
    vision = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=48)).save_pretrained(folder)
    return folder


def word_tokenizer(vocab: int):
    """A plain language model's tokenizer: no <image> token (the import has to add one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_lm(folder: Path, text=VICUNA_TEXT, vocab: int = 300, seed: int = 2) -> Path:
    """A causal LM like lmsys/vicuna-7b-v1.5: a smaller vocabulary than the LLaVA model's, no <image>."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**{**text, "vocab_size": vocab, "pad_token_id": None})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer(vocab).save_pretrained(folder)
    return folder


def fake_hf_cache(cache: Path, repo: str, source: Path, revision: str = "main") -> str:
    """`source` laid out as huggingface_hub caches a download: blobs, snapshots/<commit> symlinks, refs."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}{sorted(os.listdir(source))}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo_dir / "blobs" / digest
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return commit


def images():
    return [Image.new("RGB", (100, 60), (200, 30, 30)), Image.new("RGB", (50, 120), (30, 30, 200))]


def batch(model_cfg, tokenizer, image_token_id: int, template: str = "vicuna_v1"):
    """Two conversations with differently shaped images, through our own task encoder and collate."""
    from llavanext.data.encoder import TaskEncoder, collate
    from llavanext.data.templates import get_template

    encoder = TaskEncoder(tokenizer, get_template(template), model_cfg, 512, image_token_id)
    samples = [encoder.encode([{"from": "human", "value": f"<image>\nWhat colour is shape {i}?"},
                               {"from": "gpt", "value": "red" if i == 0 else "a blue square"}], [image])
               for i, image in enumerate(images())]
    return collate(samples, tokenizer.pad_token_id)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time: equal trees mean no file was touched."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
