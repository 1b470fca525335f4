"""Helpers for the data tests: the tiny model config, the demo tokenizer, toy LLaVA datasets on disk."""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from llavanext.data.encoder import TaskEncoder
from llavanext.data.templates import get_template


def model_cfg(name: str = "tiny"):
    return OmegaConf.load(resources.files("llavanext.conf") / "model" / f"{name}.yaml")


def tokenizer():
    from llavanext.demo.tokenizer import load_demo_tokenizer

    return load_demo_tokenizer()


def encoder(template: str = "vicuna_v1", seq_length: int = 2048, cfg=None):
    tok = tokenizer()
    return TaskEncoder(tok, get_template(template), cfg or model_cfg(), seq_length,
                       tok.convert_tokens_to_ids("<image>"))


def image(height: int, width: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def toy_records(n: int = 12, seed: int = 0):
    """LLaVA records with single, several and no images, multi-turn; images as (name, height, width)."""
    rng = random.Random(seed)
    records, images = [], {}
    for i in range(n):
        kind = i % 4
        names = [f"img/{i}_{k}.{'png' if k % 2 == 0 else 'jpg'}" for k in range({0: 1, 1: 2, 2: 0, 3: 1}[kind])]
        for k, name in enumerate(names):
            images[name] = (rng.randint(20, 200), rng.randint(20, 200), i * 10 + k)
        marks = "".join("<image>\n" for _ in names)
        turns = [{"from": "human", "value": f"{marks}What color are the shapes?"},
                 {"from": "gpt", "value": rng.choice(["red", "blue", "two red circles"])}]
        if kind == 3:
            turns += [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}]
        rec = {"id": f"toy.{i}", "conversations": turns}
        if names:
            rec["image"] = names[0] if len(names) == 1 else names
        records.append(rec)
    return records, images


def write_images(root: Path, images: dict) -> None:
    for name, (h, w, seed) in images.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        im = image(h, w, seed)
        im.save(path, quality=95) if name.endswith(".jpg") else im.save(path)


def write_llava(root: Path, records, images, name: str = "data.json") -> Path:
    write_images(root, images)
    path = root / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path
