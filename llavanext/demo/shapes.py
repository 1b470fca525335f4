"""The demo dataset: pictures of coloured shapes with questions a tiny model can learn.

Drawn from a seed at first use and written as LLaVA conversation JSON plus an image folder,
so the demo runs through the same `llava_json` reader as real data:
  captions.json  stage 1 (pretrain): "<image>" -> "two red circles"
  train.json     stage 2 (finetune): questions about colour, shape, count and position
  val.json       held-out questions from images the model never saw
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 50, 170), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {
    "color": "What color are the shapes?",
    "shape": "What shape do you see?",
    "count": "How many shapes are there?",
    "position": "Is the shape on the left or on the right?",
}
VERSION = 1  # bump when drawing or wording changes: the cache key includes it


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def draw_scene(rng: random.Random):
    """One picture and its facts: 1-3 shapes of one colour and kind on a dark background."""
    from PIL import Image, ImageDraw

    width, height = rng.choice([(64, 64), (96, 64), (64, 96), (112, 112), (128, 64), (80, 120)])
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    count = rng.choice([1, 2, 3])
    background = tuple(rng.randint(0, 40) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    size = min(width, height) // 3
    # one shape: left or right half; several: spread along the long side without overlap
    if count == 1:
        side = rng.choice(["left", "right"])
        cx = width // 4 if side == "left" else 3 * width // 4
        centers = [(cx, rng.randint(size // 2 + 2, height - size // 2 - 2))]
    else:
        side = None
        horizontal = width >= height
        long_side = width if horizontal else height
        step = long_side // count
        centers = []
        for i in range(count):
            along = step * i + step // 2
            across = (height if horizontal else width) // 2
            centers.append((along, across) if horizontal else (across, along))
    r = max(4, min(size, min(width, height) // (2 * count if count > 1 else 2)) // 2)
    for cx, cy in centers:
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    facts = {"color": color, "shape": shape, "count": count, "position": side}
    return image, facts


def caption(facts) -> str:
    return f"{COUNT_WORDS[facts['count']]} {facts['color']} {plural(facts['shape'], facts['count'])}"


def answer(kind: str, facts) -> str:
    if kind == "count":
        return COUNT_WORDS[facts["count"]]
    if kind == "shape":
        return plural(facts["shape"], facts["count"])
    return facts[kind]


def question_kinds(facts):
    return [k for k in QUESTIONS if k != "position" or facts["count"] == 1]


def records_for(image_name: str, facts, rng: random.Random, idx: str):
    kinds = question_kinds(facts)
    rng.shuffle(kinds)
    turns = []
    for i, kind in enumerate(kinds[: rng.choice([1, 1, 2])]):
        question = QUESTIONS[kind]
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer(kind, facts)})
    qa = {"id": f"{idx}", "image": image_name, "conversations": turns, "kind": kinds[0]}
    cap = {"id": f"{idx}", "image": image_name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture."},
        {"from": "gpt", "value": caption(facts)}]}
    return qa, cap


def corpus() -> list[str]:
    """Every string the demo can produce: the demo tokenizer is trained on these."""
    words = list(COLORS) + [plural(s, n) for s in SHAPES for n in (1, 2)] + list(COUNT_WORDS.values())
    words += ["left", "right"]
    return list(QUESTIONS.values()) + words + ["Describe the picture."] + [
        f"{n} {c} {s}" for n in COUNT_WORDS.values() for c in COLORS for s in SHAPES]


def default_root() -> Path:
    home = Path(os.environ.get("LLAVANEXT_HOME", Path.home() / ".cache" / "llavanext"))
    return home / "data"


def ensure_dataset(num_train: int, num_val: int, seed: int, root: str | os.PathLike | None = None) -> Path:
    """Draw the dataset once into the cache (atomically) and return its folder."""
    key = hashlib.sha1(f"{VERSION}-{num_train}-{num_val}-{seed}".encode()).hexdigest()[:10]
    root = Path(root) if root else default_root()
    folder = root / f"demo-{key}"
    if (folder / "val.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        (tmp / "images").mkdir()
        rng = random.Random(seed)
        splits = {"train": [], "captions": [], "val": []}
        for i in range(num_train + num_val):
            image, facts = draw_scene(rng)
            name = f"images/{i:05d}.png"
            image.save(tmp / name)
            qa, cap = records_for(name, facts, rng, f"shape-{i:05d}")
            if i < num_train:
                splits["train"].append(qa)
                splits["captions"].append(cap)
            else:
                qa["conversations"] = qa["conversations"][:2]  # one question each, scored alone
                splits["val"].append(qa)
        for split, records in splits.items():
            (tmp / f"{split}.json").write_text(json.dumps(records, indent=0))
        try:
            tmp.rename(folder)
        except OSError:  # another process drew it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
