"""LLaVA-NeXT image preprocessing per core: transformers' LlavaNextImageProcessorPil vs llavanext's.

`python bench/image_bench.py [--model 7b] [--repeat 5]` prints two tables, one thread:
1. ms per image for transformers and both of our resizers (`model.image_resize`), and each one's largest
   pixel difference from transformers in 1/255 steps (before normalisation). Images are uniform noise,
   the worst case for the difference.
2. one LLaVA record end to end as a dataloader worker encodes it (JPEG decode, chat template, tokens,
   pixels), in records/s, and how many cores keep one GPU fed at --gpu-tokens-per-s (default: the 7B
   LoRA rate measured on an H100, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from importlib import resources

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console
from rich.table import Table

from llavanext.data.encoder import TaskEncoder
from llavanext.data.images import CLIP_STD, ImageProcessor, make_image_processor
from llavanext.data.sources import open_image
from llavanext.data.templates import get_template
from llavanext.demo.tokenizer import load_demo_tokenizer

SIZES = [(480, 640), (768, 1024), (336, 1008), (500, 500), (720, 1280), (1080, 1920), (224, 224)]


def best_ms(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def byte_steps(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """|ours - theirs| in 1/255 steps of the uint8 pixels both were normalised from."""
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((ours - theirs) * std * 255).abs().round()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="7b")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gpu-tokens-per-s", type=float, default=12_800)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = OmegaConf.load(resources.files("llavanext.conf") / "model" / f"{args.model}.yaml")
    theirs = make_image_processor(cfg)
    ours = {name: ImageProcessor(OmegaConf.merge(cfg, {"image_resize": name})) for name in ("pil", "torch")}
    table = Table(title=f"image preprocessing, model={args.model}, 1 thread, {platform.processor() or platform.machine()}"
                        f" ({os.cpu_count()} cores), best of {args.repeat}; diff: max |ours - theirs| in 1/255")
    for column in ("image (h x w)", "tiles", "transformers ms", "pil ms", "speed-up", "diff",
                   "torch ms", "speed-up", "diff"):
        table.add_column(column, justify="right")
    totals = {"transformers": 0.0, "pil": 0.0, "torch": 0.0}
    for h, w in SIZES:
        image = Image.fromarray(np.random.RandomState(h * w).randint(0, 256, (h, w, 3), dtype=np.uint8))
        want = theirs([image], return_tensors="pt")["pixel_values"][0]
        t = best_ms(lambda im=image: theirs([im], return_tensors="pt"), args.repeat)
        totals["transformers"] += t
        row = [f"{h} x {w}", str(want.shape[0]), f"{t:.1f}"]
        for name, processor in ours.items():
            steps = float(byte_steps(processor(image), want).max())
            ms = best_ms(lambda im=image, p=processor: p(im), args.repeat)
            totals[name] += ms
            row += [f"{ms:.1f}", f"{t / ms:.2f}x", f"{steps:g}"]
        table.add_row(*row)
    t = totals["transformers"]
    table.add_row("all", "", f"{t:.1f}", f"{totals['pil']:.1f}", f"{t / totals['pil']:.2f}x", "",
                  f"{totals['torch']:.1f}", f"{t / totals['torch']:.2f}x", "", style="bold")
    Console(width=140).print(table)
    Console(width=140).print(records_table(cfg, args))


def photo_like_jpeg(height: int, width: int, seed: int) -> bytes:
    """A smooth image with some grain, as JPEG (quality 90): closer to a photo's decode cost than noise."""
    rng = np.random.RandomState(seed)
    coarse = Image.fromarray(rng.randint(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    pixels = np.clip(pixels + rng.randint(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def records_table(cfg, args) -> Table:
    tokenizer = load_demo_tokenizer()
    conversation = [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                    {"from": "gpt", "value": "A wide street with trees on both sides, parked cars and a bus in "
                                           "the distance, under a grey sky; two people cross at the lights."}]
    table = Table(title=f"one LLaVA record end to end (JPEG decode + template + tokens + pixels), model={args.model}, "
                        f"1 thread; cores to feed a GPU at {args.gpu_tokens_per_s:,.0f} tok/s")
    for column in ("image (h x w)", "tokens", "pil records/s", "torch records/s", "GPU needs records/s",
                   "cores (pil)", "cores (torch)"):
        table.add_column(column, justify="right")
    for h, w in SIZES:
        data = photo_like_jpeg(h, w, h * w)
        rates = {}
        for name in ("pil", "torch"):
            encoder = TaskEncoder(tokenizer, get_template("vicuna_v1"), OmegaConf.merge(cfg, {"image_resize": name}),
                                  10**6, tokenizer.convert_tokens_to_ids("<image>"))
            ms = best_ms(lambda e=encoder, d=data: e.encode(conversation, [open_image(d, "bench.jpg")]), args.repeat)
            rates[name] = 1000 / ms
            tokens = len(encoder.encode(conversation, [open_image(data, "bench.jpg")]).input_ids)
        need = args.gpu_tokens_per_s / tokens
        table.add_row(f"{h} x {w}", f"{tokens:,}", f"{rates['pil']:.0f}", f"{rates['torch']:.0f}", f"{need:.1f}",
                      f"{need / rates['pil']:.2f}", f"{need / rates['torch']:.2f}")
    return table


if __name__ == "__main__":
    main()
